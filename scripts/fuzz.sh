#!/usr/bin/env bash
# `make fuzz MINUTES=N`: fresh hypothesis cases for N minutes (default 10), round after round of
# tests/test_fuzz.py with new random draws. Each failure hypothesis finds is shrunk and written to
# tests/fuzz_regressions.json, which `make test` replays from then on: fix it, then commit the file.
set -uo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
deadline=$(( $(date +%s) + minutes * 60 ))
rounds=0
failed=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  rounds=$((rounds + 1))
  echo "fuzz: round $rounds"
  DISTILL_FUZZ=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py -k "not recorded" \
    || failed=$((failed + 1))
done
echo "fuzz: $rounds round(s) in $minutes minute(s), $failed with failures (recorded in tests/fuzz_regressions.json)"
[ "$failed" -eq 0 ]
