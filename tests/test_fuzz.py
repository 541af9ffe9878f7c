"""Generated bad input: every loader either succeeds or raises a one-line DistillError, never
anything else. (Property-based, with hypothesis; a start on issue 6's systematic bad input.)"""

import copy
import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.config import ExperimentConfig, load_config, parse_config
from distill.data import DataSpec, load_data, read_idx
from distill.errors import DistillError

from conftest import tiny_config

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
def test_any_value_anywhere_in_a_config(path, value):
    raw = copy.deepcopy(BASE)
    node = raw
    for part in path[0].split("."):
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
    node[path[1]] = value
    one_line_or_config(lambda: parse_config(raw, "fuzz.yaml"))


@FAST
@given(text=st.text(max_size=200))
def test_any_text_as_a_config_file(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    one_line_or_config(lambda: load_config(path))


@FAST
@given(key=st.text(max_size=20), value=st.text(max_size=20))
def test_any_override(key, value):
    one_line_or_config(lambda: parse_config(copy.deepcopy(BASE), "fuzz.yaml", [f"{key}={value}"]))


@FAST
@given(
    header=st.binary(max_size=20),
    body=st.binary(max_size=200),
    magic=st.sampled_from([b"", b"\x00\x00\x08\x01", b"\x00\x00\x08\x03", b"\x00\x00\x09\x03"]),
    compress=st.booleans(),
)
def test_any_bytes_as_an_idx_file(tmp_path, header, body, magic, compress):
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


arrays = st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64]).flatmap(
    lambda dtype: st.lists(st.integers(0, 6), min_size=0, max_size=4).map(
        lambda shape: (np.random.default_rng(0).integers(-3, 12, size=shape)).astype(dtype)
    )
)


@FAST
@given(x=arrays, y=arrays, include_y=st.booleans())
def test_any_arrays_as_an_npz_dataset(tmp_path, x, y, include_y):
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
def test_any_bytes_as_image_files(tmp_path, files):
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
