"""Generated bad input (issue 6), property-based with hypothesis.

The loaders, in-process: every loader either succeeds or raises a one-line DistillError, never anything
else. The command line (``distill.cli.main``): generated bad configs, ``--set`` overrides, data files,
teacher checkpoints and arguments each end in exit code 2, exactly one line on stderr starting with
``distill: error:``, and nothing written (no run directory, no ``.partial``, no teacher cache).

The number of generated cases each test ran is reported at the end of the module (a line in pytest's
output; also as JSON in the file named by $DISTILL_FUZZ_REPORT, if set). The bugs found this way are
fixed; each keeps a minimal reproduction at the end of the module.
"""

import copy
import gzip
import inspect
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import distill.pipeline.experiment as experiment
from distill.cli import main
from distill.core.errors import DistillError
from distill.pipeline.config import (
    DistillSpec,
    EvalSpec,
    ExperimentConfig,
    OutputSpec,
    TrainedTeacher,
    TrainSpec,
    load_config,
    parse_config,
)
from distill.tasks.image_data import DataSpec, load_data, read_idx
from distill.tasks.models import MLP, CNNSpec, MLPSpec

from conftest import decode, recorded, recorded_regressions, tiny_config, write_idx

CASES: Counter = Counter()  # generated cases each test ran to an outcome
VALID: Counter = Counter()  # generated inputs that turned out valid: discarded before any run starts


FIXTURES = ("cli", "tmp_path")  # arguments that are pytest fixtures, not generated


@pytest.fixture(scope="module", autouse=True)
def _under_a_memory_limit(memory_limit):
    """Generated configs run where an allocation beyond the limit fails instead of filling the machine."""
    yield


@pytest.fixture(scope="module", autouse=True)
def _report_the_number_of_cases(request):
    yield
    total = sum(CASES.values())
    line = (
        f"test_fuzz: {total} generated cases tried ({', '.join(f'{k}: {v}' for k, v in sorted(CASES.items()))}); "
        f"{sum(VALID.values())} generated inputs were valid and discarded"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # on the terminal, not in a captured section
            reporter.write_line(line)
    if os.environ.get("DISTILL_FUZZ_REPORT"):
        Path(os.environ["DISTILL_FUZZ_REPORT"]).write_text(
            json.dumps({"total": total, "cases": CASES, "valid": VALID}, indent=2)
        )


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
BASE = tiny_config(Path("/nonexistent"))
PATHS = [(section, key) for section, node in BASE.items() if isinstance(node, dict) for key in node] + [
    ("teacher.model", "channels"),
    ("teacher.train", "lr"),
    ("distill", "terms"),
    ("student", "arch"),
]


def one_line_or_config(call) -> None:
    try:
        result = call()
    except DistillError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert isinstance(result, ExperimentConfig)


@FAST
@given(path=st.sampled_from(PATHS), value=values)
@recorded(*FIXTURES)
def test_any_value_anywhere_in_a_config(path, value):
    CASES["loader: any value anywhere"] += 1
    raw = copy.deepcopy(BASE)
    node = raw
    for part in path[0].split("."):
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
    node[path[1]] = value
    one_line_or_config(lambda: parse_config(raw, "fuzz.yaml"))


@FAST
@given(text=st.text(max_size=200))
@recorded(*FIXTURES)
def test_any_text_as_a_config_file(tmp_path, text):
    CASES["loader: any text as a config"] += 1
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    one_line_or_config(lambda: load_config(path))


@FAST
@given(key=st.text(max_size=20), value=st.text(max_size=20))
@recorded(*FIXTURES)
def test_any_override(key, value):
    CASES["loader: any override"] += 1
    one_line_or_config(lambda: parse_config(copy.deepcopy(BASE), "fuzz.yaml", [f"{key}={value}"]))


@FAST
@given(
    header=st.binary(max_size=20),
    body=st.binary(max_size=200),
    magic=st.sampled_from([b"", b"\x00\x00\x08\x01", b"\x00\x00\x08\x03", b"\x00\x00\x09\x03"]),
    compress=st.booleans(),
)
@recorded(*FIXTURES)
def test_any_bytes_as_an_idx_file(tmp_path, header, body, magic, compress):
    CASES["loader: any bytes as IDX"] += 1
    raw = magic + header + body
    path = tmp_path / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    try:
        array = read_idx(path)
    except DistillError as err:
        assert "\n" not in str(err)
        return
    assert array.dtype == np.uint8 and array.ndim in (1, 3)
    assert struct.unpack(">HBB", raw[:4])[2] == array.ndim


def _text_tokenizer(tmp_path: Path) -> Path:
    from tiny_text import tokenizer

    directory = tmp_path / "tokenizer"
    if not (directory / "tokenizer_config.json").exists():
        tokenizer(directory)
    return directory


@FAST
@given(content=st.binary(max_size=300), source=st.sampled_from(["jsonl", "csv", "text_folder"]))
@recorded(*FIXTURES)
def test_any_bytes_as_text_data(tmp_path, content, source):
    pytest.importorskip("transformers")
    from distill.tasks.text_data import TextDataSpec, load_text_data

    CASES["loader: any bytes as text data"] += 1
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    if source == "text_folder":
        for name, body in (("a", content), ("b", b"cat dog")):
            (root / name).mkdir()
            (root / name / "0.txt").write_bytes(body)
        path = root
    else:
        path = root / f"d.{source}"
        path.write_bytes(content)
    try:
        load_text_data(TextDataSpec(source=source, path=path, tokenizer=_text_tokenizer(tmp_path), max_length=8))
    except DistillError as err:
        assert "\n" not in str(err)


records = st.lists(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=12), "label": st.sampled_from(["a", "b", "c"])})
    | st.dictionaries(
        st.sampled_from(["text", "label", "other"]),
        st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=12) | st.lists(st.integers(0, 2), max_size=2),
        max_size=3,
    ),
    max_size=12,
)


@FAST
@given(rows=records, unlabeled=st.lists(st.text(max_size=8), max_size=3), val=st.sampled_from([0.0, 0.1, 0.3]))
@recorded(*FIXTURES)
def test_any_records_as_jsonl_text_data(tmp_path, rows, unlabeled, val):
    pytest.importorskip("transformers")
    from distill.tasks.text_data import TextDataSpec, load_text_data

    CASES["loader: any records as JSONL"] += 1
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    (root / "d.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (root / "u.txt").write_text("\n".join(unlabeled))
    spec = TextDataSpec(
        source="jsonl", path=root / "d.jsonl", tokenizer=_text_tokenizer(tmp_path), max_length=8, val_fraction=val,
        unlabeled=root / "u.txt" if unlabeled else None,
    )  # fmt: skip
    try:
        data = load_text_data(spec)
    except DistillError as err:
        assert "\n" not in str(err)
        return
    assert data.num_classes >= 2 and len(data.train) > 0 and len(data.test) > 0
    assert data.train.x["input_ids"].shape == data.train.x["attention_mask"].shape


arrays = st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64]).flatmap(
    lambda dtype: st.lists(st.integers(0, 6), min_size=0, max_size=4).map(
        lambda shape: (np.random.default_rng(0).integers(-3, 12, size=shape)).astype(dtype)
    )
)


@FAST
@given(x=arrays, y=arrays, include_y=st.booleans())
@recorded(*FIXTURES)
def test_any_arrays_as_an_npz_dataset(tmp_path, x, y, include_y):
    CASES["loader: any arrays as npz"] += 1
    path = tmp_path / "d.npz"
    np.savez(path, **({"x": x, "y": y} if include_y else {"x": x}))
    try:
        bundle = load_data(DataSpec(source="npz", path=path))
    except DistillError as err:
        assert "\n" not in str(err)
        return
    assert len(bundle.train) > 0 and bundle.num_classes > 0


@FAST
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.binary(max_size=64)), min_size=0, max_size=4))
@recorded(*FIXTURES)
def test_any_bytes_as_image_files(tmp_path, files):
    CASES["loader: any bytes as images"] += 1
    root = Path(tempfile.mkdtemp(dir=tmp_path)) / "imgs"  # a fresh folder for every generated case
    for i, (cls, content) in enumerate(files):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{i}.png").write_bytes(content)
    root.mkdir(exist_ok=True)
    try:
        load_data(DataSpec(source="folder", path=root))
    except DistillError as err:
        assert "\n" not in str(err)


def test_yaml_round_trip_of_the_base_config_is_valid():
    assert isinstance(parse_config(yaml.safe_load(yaml.safe_dump(BASE))), ExperimentConfig)


# ---------------------------------------------------------------------------- the command line


class PassedEveryCheck(Exception):
    """Raised where distill would create the run directory: the generated input was valid, and a run would start."""


def tree(*roots: Path) -> set[str]:
    return {str(p) for root in roots if root.exists() for p in [root, *root.rglob("*")]}


class CLI:
    """``distill.cli.main`` on generated input, and what it must do with bad input."""

    def __init__(self, capfd, root: Path) -> None:
        self.capfd, self.root, self.stderr = capfd, root, ""

    def case(self) -> Path:
        """A fresh directory for one generated case (hypothesis reuses the test's tmp_path)."""
        return Path(tempfile.mkdtemp(dir=self.root))

    def write_config(self, case: Path, config: dict | str | bytes, name: str = "exp.yaml") -> Path:
        path = case / name
        if isinstance(config, bytes):
            path.write_bytes(config)
        else:
            path.write_text(config if isinstance(config, str) else yaml.safe_dump(config), encoding="utf-8")
        return path

    def run(self, test: str | None, argv: list[str], case: Path) -> str:
        """Run the CLI: "valid" if the input passed every check (nothing is started), else assert a clean failure:
        exit code 2, one line on stderr, nothing written; any exception fails the test. ``test`` names the generated
        cases to count (None: a hand-written case, not counted)."""
        cases, valid = (CASES, VALID) if test is not None else (Counter(), Counter())
        self.capfd.readouterr()
        cache = Path(os.environ["DISTILL_CACHE_DIR"])
        before = tree(case, cache)
        try:
            code = main(argv)
        except PassedEveryCheck:
            self.capfd.readouterr()
            valid[test] += 1
            return "valid"
        except SystemExit as exit:  # argparse: usage errors
            code = exit.code
        out, err = self.capfd.readouterr()
        self.stderr = err
        cases[test] += 1
        context = f"argv={argv}\nstdout={out[-2000:]}\nstderr={err}"
        assert code == 2, context
        assert "Traceback" not in out + err, context
        if err.startswith("usage: "):  # argparse's own format (its message quotes the arguments as they are)
            assert "\ndistill run: error: " in err or "\ndistill: error: " in err, context
        else:
            lines = err.splitlines()
            assert err.endswith("\n") and len(lines) == 1 and lines[0].startswith("distill: error: "), context
        assert tree(case, cache) == before, f"something was written\n{context}"  # no run dir, .partial or cache
        return "error"


@pytest.fixture
def cli(monkeypatch, capfd, tmp_path) -> CLI:
    def refuse(*args, **kwargs):
        raise PassedEveryCheck

    # the first thing a run writes: a generated input that gets this far is valid, and nothing trains
    monkeypatch.setattr(experiment, "_prepare_run_dir", refuse)
    return CLI(capfd, tmp_path)


CLI_FAST = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much, HealthCheck.too_slow],
)
finite = st.recursive(  # like `values`, without NaN and infinity (accepted where they should not be: see below)
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
SECTIONS = {  # the base config's sections and the models that check them
    "": ExperimentConfig,
    "data": DataSpec,
    "teacher": TrainedTeacher,
    "teacher.model": CNNSpec,
    "teacher.train": TrainSpec,
    "student": MLPSpec,
    "distill": DistillSpec,
    "train": TrainSpec,
    "eval": EvalSpec,
    "output": OutputSpec,
}
FIELDS = sorted(
    f"{section}.{name}".lstrip(".") for section, model in SECTIONS.items() for name in model.model_fields
) + ["student.factory", "student.kwargs", "teacher.path", "distill.terms.0", "eval.latency_batch_sizes.0"]


def set_path(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = config
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    if isinstance(node, list):
        node[:] = [value]
    else:
        node[last] = value


def base_config(case: Path, **changes) -> dict:
    """The tiny digits experiment, valid: bad input is what a case adds to it."""
    config = tiny_config(case, **changes)
    config["distill"] = {"terms": [{"type": "kd", "weight": 0.7, "temperature": 2.0}, {"type": "ce", "weight": 0.3}]}
    return config


NASTY_YAML = [
    "",
    "~",
    "[]",
    "- data\n- teacher\n",
    "a: 1\n---\nb: 2\n",  # two documents
    "data: &a [*a]\n",  # a recursive structure
    "data: !!python/object/apply:os.system ['true']\n",  # a tag that safe_load refuses
    "data: {source: digits\n",  # unclosed
    "\tdata: 1\n",  # a tab
    "data: {source: digits}\nteacher: {kind: train, model: {arch: mlp}}\nstudent: {arch: mlp}\nseed: -1\n",
    "data: {source: digits}\nteacher: {kind: train, model: {arch: mlp}}\nstudent: {arch: mlp}\nbaseline: maybe\n",
    "data: {source: digits}\nteacher: {kind: checkpoint, model: {arch: mlp}}\nstudent: {arch: mlp}\n",
    "data: {source: digits}\nteacher: {kind: train, model: {arch: mlp}}\nstudent: {arch: factory, factory: x}\n",
]


@CLI_FAST
@given(
    text=st.text(max_size=300)
    | finite.map(yaml.safe_dump)
    | st.dictionaries(st.sampled_from(list(SECTIONS)[1:]) | st.text(max_size=8), finite, max_size=6).map(yaml.safe_dump)
    | st.sampled_from(NASTY_YAML)
    | st.binary(max_size=200)
)
@recorded(*FIXTURES)
def test_cli_any_text_as_a_config_file(cli, text):
    case = cli.case()
    if cli.run("cli: any text as a config", ["run", str(cli.write_config(case, text))], case) == "valid":
        reject()


@CLI_FAST
@given(path=st.sampled_from(FIELDS), value=finite)
@recorded(*FIXTURES)
def test_cli_any_value_anywhere_in_a_config(cli, path, value):
    case = cli.case()
    config = base_config(case)
    set_path(config, path, value)
    if cli.run("cli: any value anywhere", ["run", str(cli.write_config(case, config))], case) == "valid":
        reject()  # e.g. seed: 3, or a data.path that digits ignores


@CLI_FAST
@given(section=st.sampled_from(list(SECTIONS)), key=st.text(min_size=1, max_size=12), value=finite)
@recorded(*FIXTURES)
def test_cli_unknown_keys(cli, section, key, value):
    known = set(SECTIONS[section].model_fields) | {"kind", "arch"}
    if key in known:
        reject()
    case = cli.case()
    config = base_config(case)
    node = config
    for part in filter(None, section.split(".")):
        node = node[part]
    node[key] = value
    assert cli.run("cli: unknown keys", ["run", str(cli.write_config(case, config))], case) == "error"


overrides = (
    st.one_of(
        st.tuples(st.sampled_from(FIELDS) | st.text(max_size=15), finite.map(lambda v: yaml.safe_dump(v).strip())),
        st.tuples(st.sampled_from(FIELDS) | st.text(max_size=15), st.text(max_size=20)),
    ).map(lambda kv: f"{kv[0]}={kv[1]}")
    | st.text(max_size=20)
    | st.sampled_from(
        ["=", "=1", "train.lr", "train=[1", "data.source.x=1", "train.lr=!!python/name:os.system", "a..b=1", ".=1"]
    )
)


@CLI_FAST
@given(assignments=st.lists(overrides, min_size=1, max_size=3))
@recorded(*FIXTURES)
def test_cli_bad_overrides(cli, assignments):
    case = cli.case()
    argv = ["run", str(cli.write_config(case, base_config(case)))] + [f"--set={a}" for a in assignments]
    if cli.run("cli: --set overrides", argv, case) == "valid":
        reject()


@settings(CLI_FAST, max_examples=60)
@given(
    tokens=st.lists(
        st.sampled_from(["--resume", "--overwrite", "--quiet", "--set", "--set=", "--bogus", "-x", "--", "run"])
        | st.text(max_size=10),
        max_size=5,
    )
)
@recorded(*FIXTURES)
def test_cli_bad_arguments(cli, tokens):
    case = cli.case()
    if any(t.startswith("-h") or (t.startswith("--h") and "--help".startswith(t)) for t in tokens):
        reject()  # help is not an error
    assert cli.run("cli: arguments", ["run", *tokens], case) == "error"


# ------------------------------------------------------------------ data files through the command line

UNREADABLE = "/proc/self/mem"  # a regular file that no one can read from its start (EIO), root included


def bad_path(case: Path, kind: str, name: str) -> str:
    """A path a loader cannot read, root or not."""
    if kind == "missing":
        return str(case / "missing" / name)
    if kind == "directory":
        (case / name).mkdir()
        return str(case / name)
    if kind == "dangling symlink":
        (case / name).symlink_to(case / "nowhere")
        return str(case / name)
    if kind == "symlink loop":
        (case / name).symlink_to(case / name)
        return str(case / name)
    if kind == "through a file":
        (case / "file").write_text("x")
        return str(case / "file" / name)
    assert kind == "unreadable"
    (case / name).symlink_to(UNREADABLE)
    return str(case / name)


BAD_PATHS = ["missing", "directory", "dangling symlink", "symlink loop", "through a file", "unreadable"]


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD_X, GOOD_Y = np.random.default_rng(0).normal(size=(24, 6)).astype(np.float32), np.arange(24) % 3


@st.composite
def bad_npz(draw) -> tuple[str, object]:
    """(what is wrong, file content: bytes, or a path kind)."""
    kind = draw(
        st.sampled_from(["bytes", "truncated", "flipped", "labels", "lengths", "values", "keys", "dtypes", "path"])
    )
    good = npz_bytes(x=GOOD_X, y=GOOD_Y)
    x, y = GOOD_X.copy(), GOOD_Y.copy()
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300))
    if kind == "truncated":
        return kind, good[: draw(st.integers(0, len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for index in draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4)):
            data[index] ^= draw(st.integers(1, 255))
        return kind, bytes(data)
    if kind == "labels":  # negative, or implausibly many classes
        y[draw(st.integers(0, len(y) - 1))] = draw(st.sampled_from([-1, -(2**40), 100_000, 2**40]))
    elif kind == "lengths":
        y = y[: draw(st.sampled_from([0, 5, len(y) - 1]))] if draw(st.booleans()) else np.concatenate([y, y[:3]])
        x = x[:0] if len(y) == 0 else x
    elif kind == "values":
        x[draw(st.integers(0, len(x) - 1)), 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "keys":
        arrays = draw(st.sampled_from([{"x": x}, {"y": y}, {"X": x, "Y": y}, {}]))
        return kind, npz_bytes(**arrays)
    elif kind == "dtypes":
        x, y = draw(
            st.sampled_from(
                [(x, y.astype(np.float32)), (x.astype(np.complex64), y), (x.astype(str), y), (x, y.astype(str)),
                 (x[:, 0], y), (x, np.stack([y, y], 1)), (np.float32(1.0), y), (x, np.int64(1))]
            )
        )  # fmt: skip
    else:
        return kind, draw(st.sampled_from(BAD_PATHS))
    return kind, npz_bytes(x=x, y=y)


def place(case: Path, content: object, name: str) -> str:
    if isinstance(content, bytes):
        (case / name).write_bytes(content)
        return str(case / name)
    return bad_path(case, content, name)


@CLI_FAST
@given(train=bad_npz(), test=st.none() | bad_npz() | st.sampled_from(["more classes", "other shape"]))
@recorded(*FIXTURES)
def test_cli_bad_npz_data(cli, train, test):
    case = cli.case()
    if test in ("more classes", "other shape"):  # a good training file, and a test file that does not match it
        data = {"source": "npz", "path": place(case, npz_bytes(x=GOOD_X, y=GOOD_Y), "train.npz")}
        x, y = (GOOD_X, GOOD_Y + 1) if test == "more classes" else (GOOD_X[:, :4], GOOD_Y)
        data["test_path"] = place(case, npz_bytes(x=x, y=y), "test.npz")
    else:
        data = {"source": "npz", "path": place(case, train[1], "train.npz")}
        if test is not None:
            data["test_path"] = place(case, test[1], "test.npz")
    config = base_config(case, data=data, teacher={"kind": "train", "model": {"arch": "mlp", "hidden": [8]}})
    if cli.run("cli: npz data", ["run", str(cli.write_config(case, config))], case) == "valid":
        assert train[0] == "flipped" and (test is None or test[0] == "flipped"), (train, test)
        reject()  # a flipped byte in the array data: still a valid file


def image_bytes(fmt: str, size: int = 8, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 7).save(buffer, fmt)
    return buffer.getvalue()


IMAGE_FORMATS = ["PNG", "GIF", "BMP", "TIFF", "JPEG"]
# Pillow reports some corrupt files with other exceptions than OSError (ValueError, SyntaxError, a decompression
# bomb); data.py turns each into a one-line error (test_corrupt_images_are_one_line_errors below)


@st.composite
def image_file(draw) -> object:
    kind = draw(st.sampled_from(["good", "other size", "corrupt", "bytes", "empty", "path"]))
    if kind == "good":
        return image_bytes(draw(st.sampled_from(IMAGE_FORMATS)))
    if kind == "other size":
        return image_bytes("PNG", size=draw(st.sampled_from([4, 9])))
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "empty":
        return b""
    if kind == "path":
        return draw(st.sampled_from(["directory", "dangling symlink", "symlink loop", "unreadable"]))
    data = bytearray(image_bytes(draw(st.sampled_from(IMAGE_FORMATS))))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data) - 1))]
    for index in draw(st.lists(st.integers(0, max(len(data) - 1, 0)), max_size=4)) if data else []:
        data[index] = draw(st.integers(0, 255))
    return bytes(data)


def image_folder(case: Path, name: str, classes: dict[str, list]) -> str:
    root = case / name
    root.mkdir()
    for label, files in classes.items():
        (root / label).mkdir()
        for i, content in enumerate(files):
            place(root / label, content, f"{i}.png")
    return str(root)


folders = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.lists(image_file(), max_size=3), max_size=3)


@CLI_FAST
@given(train=folders, test=st.none() | folders, root=st.sampled_from(["folder"] * 4 + BAD_PATHS))
@recorded(*FIXTURES)
def test_cli_bad_image_folders(cli, train, test, root):
    case = cli.case()
    path = image_folder(case, "train", train) if root == "folder" else bad_path(case, root, "train")
    data = {"source": "folder", "path": path}
    if test is not None:
        data["test_path"] = image_folder(case, "test", test)
    config = base_config(case, data=data)
    if cli.run("cli: image folders", ["run", str(cli.write_config(case, config))], case) == "valid":
        reject()  # every file was a good image of one size (or a corruption Pillow does not notice)


@settings(CLI_FAST, max_examples=60)
@given(
    part=st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]),
    defect=st.sampled_from(["missing", "truncated", "magic", "count", "labels", "flipped", "path", "empty"]),
    cut=st.integers(0, 400),
    compress=st.booleans(),
)
@recorded(*FIXTURES)
def test_cli_bad_idx_files(cli, part, defect, cut, compress):
    case = cli.case()
    directory = case / "fmnist"
    directory.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 255, (30, 8, 8)),
        "train-labels-idx1-ubyte": np.arange(30) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 255, (10, 8, 8)),
        "t10k-labels-idx1-ubyte": np.arange(10) % 10,
    }
    if defect == "count":
        arrays[part] = arrays[part][:-1]
    if defect == "labels":
        arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"] + 10  # classes 10..19 of 10
    for stem, array in arrays.items():
        write_idx(directory / stem, array, compress=compress)
    target = directory / (part + (".gz" if compress else ""))
    raw = target.read_bytes()
    if defect == "missing":
        target.unlink()
    elif defect == "truncated":
        target.write_bytes(raw[: cut % len(raw)])
    elif defect == "magic":
        target.write_bytes(b"\x00\x00\x0d\x03" + raw[4:] if not compress else gzip.compress(b"\x01\x02\x08\x03"))
    elif defect == "flipped":
        data = bytearray(raw)
        data[cut % len(data)] ^= 0xFF
        target.write_bytes(bytes(data))
    elif defect == "empty":
        target.write_bytes(b"")
    elif defect == "path":
        target.unlink()
        bad_path(directory, BAD_PATHS[cut % len(BAD_PATHS)], target.name)
    config = base_config(case, data={"source": "fashion_mnist", "path": str(directory)})
    if cli.run("cli: IDX files", ["run", str(cli.write_config(case, config))], case) == "valid":
        assert defect == "flipped", defect  # a flipped pixel is still a valid file
        reject()


# ------------------------------------------------------------------ teacher checkpoints through the command line

TEACHER = {"kind": "checkpoint", "path": "teacher.safetensors", "model": {"arch": "mlp", "hidden": [12]}}


def teacher_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10, MLPSpec(hidden=[12])).state_dict()


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        save_file(state, f"{directory}/t.safetensors")
        return Path(f"{directory}/t.safetensors").read_bytes()


@st.composite
def bad_teacher(draw) -> object:
    kind = draw(
        st.sampled_from(["mutated", "pickle", "torch.save", "bytes", "truncated", "header", "npz", "empty", "path"])
    )
    state = teacher_state()
    if kind == "mutated":  # the right format, the wrong tensors: at least one missing, extra or misshapen
        keys = sorted(state)
        for mutation in draw(st.lists(st.sampled_from(["drop", "add", "shape", "classes", "dtype"]), min_size=1)):
            key = draw(st.sampled_from(keys))
            if mutation == "drop" and len(state) > 1:
                state.pop(key, None)
            elif mutation == "add":
                state[draw(st.sampled_from(["extra", "features.3.weight", "head.extra"]))] = torch.zeros(2)
            elif mutation in ("shape", "classes") and key in state:
                tensor = state[key]
                shape = [n + draw(st.integers(1, 3)) for n in tensor.shape] or [2]
                state[key] = torch.zeros(shape) if mutation == "shape" else tensor[: max(len(tensor) - 3, 1)].clone()
            elif mutation == "dtype" and key in state:
                state[key] = state[key].to(draw(st.sampled_from([torch.float16, torch.int64, torch.float64])))
        if set(state) == set(teacher_state()) and all(
            state[k].shape == v.shape for k, v in teacher_state().items()
        ):  # only dtypes changed: a loadable file
            state.pop(keys[0])
        return safetensors_bytes(state)
    if kind == "pickle":
        return pickle.dumps(state)
    if kind == "torch.save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    good = safetensors_bytes(state)
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "header":  # a header length or header that lies
        length = draw(st.sampled_from([0, 1, 2**40, 2**64 - 1, len(good)]))
        return struct.pack("<Q", length) + good[8:]
    if kind == "npz":
        return npz_bytes(**{k: v.numpy() for k, v in state.items()})
    if kind == "empty":
        return b""
    return draw(st.sampled_from(BAD_PATHS))


@CLI_FAST
@given(teacher=bad_teacher())
@recorded(*FIXTURES)
def test_cli_bad_teacher_checkpoints(cli, teacher):
    case = cli.case()
    path = place(case, teacher, "teacher.safetensors")
    config = base_config(case, teacher={**TEACHER, "path": path})
    assert cli.run("cli: teacher checkpoints", ["run", str(cli.write_config(case, config))], case) == "error"


@settings(CLI_FAST, max_examples=40)
@given(
    metrics=st.binary(max_size=50)
    | finite.map(json.dumps)
    | st.fixed_dictionaries({"models": finite, "latency_batch_sizes": finite}).map(json.dumps),
    second=st.booleans(),
)
@recorded(*FIXTURES)
def test_cli_compare_bad_run_directories(cli, metrics, second):
    case = cli.case()
    run = case / "run"
    run.mkdir()
    if isinstance(metrics, bytes):
        (run / "metrics.json").write_bytes(metrics)
    else:
        (run / "metrics.json").write_text(metrics)
    runs = [str(run)] + ([bad_path(case, "missing", "other")] if second else [])
    outcome = cli.run("cli: compare", ["compare", *runs, "--out", str(case / "compare.html")], case)
    assert outcome == "error"


# ------------------------------------------------------------------ unreadable paths (chmod 000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("target", ["config", "npz", "folder", "image", "idx", "teacher"])
def test_cli_unreadable_paths(cli, target, fake_fashion):
    case = cli.case()
    config = base_config(case)
    if target == "npz":
        config["data"] = {"source": "npz", "path": place(case, npz_bytes(x=GOOD_X, y=GOOD_Y), "d.npz")}
        locked = Path(config["data"]["path"])
    elif target in ("folder", "image"):
        config["data"] = {"source": "folder", "path": image_folder(case, "imgs", {"a": [image_bytes("PNG")] * 2})}
        locked = Path(config["data"]["path"]) / ("a/0.png" if target == "image" else "")
    elif target == "idx":
        config["data"] = {"source": "fashion_mnist", "path": str(fake_fashion)}
        locked = fake_fashion / "train-labels-idx1-ubyte.gz"
    elif target == "teacher":
        config["teacher"] = {**TEACHER, "path": place(case, safetensors_bytes(teacher_state()), "t.safetensors")}
        locked = Path(config["teacher"]["path"])
    path = cli.write_config(case, config)
    locked = path if target == "config" else locked
    locked.chmod(0)
    try:
        assert cli.run(None, ["run", str(path)], case) == "error"
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("target", ["config", "npz", "image", "teacher"])
def test_cli_unreadable_files_as_root_too(cli, target):
    """/proc/self/mem is a regular file whose start cannot be read (EIO), whoever reads it; the one-line error names
    the file."""
    case = cli.case()
    config = base_config(case)
    if target == "config":
        path = case / "exp.yaml"
        path.symlink_to(UNREADABLE)
    else:
        if target == "npz":
            config["data"] = {"source": "npz", "path": bad_path(case, "unreadable", "d.npz")}
        elif target == "image":
            folder = image_folder(case, "imgs", {"a": [image_bytes("PNG"), "unreadable"], "b": [image_bytes("PNG")]})
            config["data"] = {"source": "folder", "path": folder}
        else:
            config["teacher"] = {**TEACHER, "path": bad_path(case, "unreadable", "t.safetensors")}
        path = cli.write_config(case, config)
    assert cli.run(None, ["run", str(path)], case) == "error"
    named = {"config": "exp.yaml", "npz": "d.npz", "image": "1.png", "teacher": "t.safetensors"}[target]
    assert named in cli.stderr, cli.stderr


# ------------------------------------------------------------------ bugs the fuzzing found (fixed; kept as regressions)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


SMALL_PNG = image_bytes("PNG")
CORRUPT_IMAGES = {
    # a PNG header announcing 30000×30000 pixels: PIL.Image.DecompressionBombError (not an OSError)
    "decompression bomb": b"\x89PNG\r\n\x1a\n"
    + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
    + png_chunk(b"IEND", b""),
    # the start of a PPM header, named .png: ValueError("Reached EOF while reading header")
    "truncated PPM header": b"P6\n",
    # a PNG whose IHDR chunk claims 0 bytes: ValueError("Truncated IHDR chunk")
    "empty IHDR": SMALL_PNG[:8] + b"\x00\x00\x00\x00" + SMALL_PNG[12:],
}


@pytest.mark.parametrize("content", list(CORRUPT_IMAGES))
def test_corrupt_images_are_one_line_errors(cli, content):
    case = cli.case()
    folder = image_folder(case, "imgs", {"a": [SMALL_PNG, CORRUPT_IMAGES[content]], "b": [SMALL_PNG]})
    config = base_config(case, data={"source": "folder", "path": folder})
    assert cli.run(None, ["run", str(cli.write_config(case, config))], case) == "error"


DEEP = 10_000


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        ("[" * DEEP + "]" * DEEP, []),
        ("data:\n" + "".join(" " * i + "a:\n" for i in range(1, 3000)), []),
        ("seed: " + "1" * 4301 + "\n", []),
        (None, ["seed=" + "1" * 4301]),
        (None, ["data=" + "[" * DEEP + "]" * DEEP]),
    ],
    ids=["nested sequences", "nested mappings", "long integer", "long integer in --set", "nested --set"],
)
def test_yaml_that_the_parser_cannot_handle_is_one_line(cli, text, overrides):
    case = cli.case()
    path = cli.write_config(case, text if text is not None else base_config(case))
    argv = ["run", str(path)] + [f"--set={o}" for o in overrides]
    assert cli.run(None, argv, case) == "error"


@pytest.mark.parametrize(
    "override",
    ["train.lr=.inf", "train.weight_decay=.inf", "distill.terms.0.weight=.inf", "teacher.train.lr=.inf"],
)
def test_infinite_numbers_in_a_config_are_rejected(cli, override):
    case = cli.case()
    config = base_config(case)
    set_path(config, override.split("=")[0], float("inf"))
    assert cli.run(None, ["run", str(cli.write_config(case, config))], case) == "error"


def test_inputs_beyond_float32_are_rejected_before_the_run(cli):
    case = cli.case()
    x = GOOD_X.astype(np.float64)
    x[0, 0] = 1e300
    data = {"source": "npz", "path": place(case, npz_bytes(x=x, y=GOOD_Y), "d.npz")}
    config = base_config(case, data=data, teacher={"kind": "train", "model": {"arch": "mlp", "hidden": [8]}})
    assert cli.run(None, ["run", str(cli.write_config(case, config))], case) == "error"


def test_a_teacher_checkpoint_with_nan_weights_is_rejected_before_the_run(cli):
    case = cli.case()
    state = teacher_state()
    state["head.weight"][0, 0] = float("nan")
    path = place(case, safetensors_bytes(state), "teacher.safetensors")
    config = base_config(case, teacher={**TEACHER, "path": path})
    assert cli.run(None, ["run", str(cli.write_config(case, config))], case) == "error"


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[" * DEEP + b"]" * DEEP], ids=["not UTF-8", "nested"])
def test_compare_a_corrupt_metrics_file_is_one_line(cli, content):
    case = cli.case()
    (case / "run").mkdir()
    (case / "run" / "metrics.json").write_bytes(content)
    argv = ["compare", str(case / "run"), "--out", str(case / "compare.html")]
    assert cli.run(None, argv, case) == "error"


def test_a_corrupt_image_gives_only_the_one_line_error_on_stderr(tmp_path):
    """A real process: pytest would record the warnings that the command line prints."""
    folder = {"a": [image_bytes("TIFF")[:8], SMALL_PNG], "b": [SMALL_PNG]}  # the first 8 bytes of a TIFF, named .png
    config = base_config(tmp_path, data={"source": "folder", "path": image_folder(tmp_path, "imgs", folder)})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "distill", "run", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and "cannot read image" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ failures `make fuzz` found, replayed


@pytest.mark.parametrize(
    "case", recorded_regressions(), ids=lambda case: f"{case['test']}-{json.dumps(case['args'], sort_keys=True)[:60]}"
)
def test_recorded_fuzz_failures(case, request):
    """Each failing case `make fuzz` found (tests/fuzz_regressions.json), called as the test it failed in."""
    test = globals()[case["test"]].hypothesis.inner_test
    fixtures = {name: request.getfixturevalue(name) for name in FIXTURES if name in inspect.signature(test).parameters}
    test(**fixtures, **decode(case["args"]))
