"""The offline teacher-signal cache: store round trips, integrity checks, resume, and training from it."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from distill.cache import CachedTeacher, write_cache
from distill.cli import main
from distill.core.data import DataBundle, Split
from distill.core.distiller import Distiller
from distill.core.errors import DistillError
from distill.core.losses import SoftTargetKD, soft_target_kl
from distill.core.signals import TopKLogits
from distill.pipeline.config import parse_config
from distill.pipeline.experiment import cache_teacher, run_experiment
from distill.tasks.image_data import load_data

from conftest import tiny_config


def _bundle(n: int = 50, classes: int = 7, seq: int | None = None, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    shape = (n, seq) if seq else (n, 6)

    def split(m: int) -> Split:
        return Split(torch.randn(*shape[:1], *shape[1:], generator=g)[:m], torch.randint(0, classes, (m,), generator=g))

    return DataBundle("synthetic", split(n), split(n), split(n), classes, [str(i) for i in range(classes)])


class _TokenTeacher(nn.Module):
    """A stand-in language model: [batch, seq] inputs to [batch, seq, vocab] logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x.unsqueeze(-1)))) * 3


def _teacher(classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, classes))


def _write(tmp_path, teacher, data, name="cache", **options):
    options = {"identity": {"teacher": "t", "data": data.fingerprint}, "k": 3, "dtype": "float16"} | options
    return write_cache(teacher, data, tmp_path / name, **options)


def _dense(teacher, x):
    with torch.no_grad():
        return teacher(x)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 2e-2), ("int8", None)]
)
def test_store_round_trip_per_dtype(tmp_path, dtype, tolerance):
    data, teacher = _bundle(), _teacher()
    path = _write(tmp_path, teacher, data, dtype=dtype, shard_rows=16)  # 4 shards: lookups cross shards
    cache = CachedTeacher(path)
    index = torch.tensor([49, 0, 17, 16, 33, 2])
    got = cache.lookup(index).logits
    want = TopKLogits.from_dense(_dense(teacher, data.train.x[index]), 3)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.logsumexp, want.logsumexp) and torch.equal(got.tail, want.tail)  # stored in float32
    error = (got.values - want.values).abs()
    if dtype == "int8":  # half a quantisation step of each row's range
        step = (want.values.amax(-1) - want.values.amin(-1)) / 255
        assert bool((error <= step.unsqueeze(-1) / 2 + 1e-5).all())
    else:
        assert float((error / want.values.abs().clamp_min(1)).max()) <= tolerance
    assert cache.split_logits("test").values.shape == (50, 3)


def test_bytes_per_row_match_the_format(tmp_path):
    data = _bundle(n=64)
    for dtype, expected in (("float16", 3 * 2 + 3 * 1 + 4 + 4), ("int8", 3 * 1 + 3 * 1 + 4 + 4 + 8)):
        cache = CachedTeacher(_write(tmp_path, _teacher(), data, name=dtype, dtype=dtype))
        header = 128 * len(cache.manifest["splits"]["train"]["shards"][0]["files"]) / 64  # one .npy header per file
        assert cache.bytes_per_row() == pytest.approx(expected + header)


def test_sparse_kd_from_the_store_equals_dense_kd_when_k_covers_every_class(tmp_path):
    data, teacher = _bundle(), _teacher()
    cache = CachedTeacher(_write(tmp_path, teacher, data, k=7, dtype="float32"))
    student_logits = torch.randn(10, 7, requires_grad=True)
    index = torch.arange(10)
    sparse = soft_target_kl(student_logits, cache.lookup(index).logits, temperature=4.0)
    dense = soft_target_kl(student_logits, _dense(teacher, data.train.x[:10]), temperature=4.0)
    assert float(sparse.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
    (g_sparse,) = torch.autograd.grad(sparse, student_logits)
    (g_dense,) = torch.autograd.grad(dense, student_logits)
    assert torch.allclose(g_sparse, g_dense, atol=1e-6)


def test_confident_rows_keep_their_tail_and_their_gradient():
    """A tail far below float32's resolution next to 1 is still stored exactly, and an overconfident
    student is still pushed back (the tail is a log-sum-exp, not log(1 - head mass))."""
    teacher = torch.tensor([[20.0] + [0.0] * 9])
    signals = TopKLogits.from_dense(teacher, 1)
    want = math.log(9) - float(torch.tensor([20.0] + [0.0] * 9, dtype=torch.float64).logsumexp(0))
    assert float(signals.tail) == pytest.approx(want, rel=1e-6)  # about -17.80, not -inf
    student = torch.tensor([[40.0] + [0.0] * 9], requires_grad=True)
    signals = TopKLogits.from_dense(torch.tensor([[5.0] + [0.0] * 9]), 1)
    loss = soft_target_kl(student, signals, temperature=1.0)
    (grad,) = torch.autograd.grad(loss, student)
    p_top = math.exp(5) / (math.exp(5) + 9)
    assert float(grad[0, 0]) == pytest.approx(1.0 - p_top, rel=1e-4)  # q_top - p_top, about 0.057
    assert float(loss.detach()) == pytest.approx(
        p_top * math.log(p_top) + (1 - p_top) * (math.log(1 - p_top) - (math.log(9) - 40)), rel=1e-4
    )


def test_token_level_rows(tmp_path):
    """[batch, seq, vocab] teachers store one row per token position."""
    data, teacher = _bundle(n=12, seq=5), _TokenTeacher(vocab=300)
    cache = CachedTeacher(_write(tmp_path, teacher, data, k=4, shard_rows=20))  # 4 samples (20 tokens) per shard
    assert cache.manifest["row_shape"] == [5] and cache.manifest["index_dtype"] == "uint16"
    got = cache.lookup(torch.tensor([11, 3])).logits
    want = TopKLogits.from_dense(_dense(teacher, data.train.x[[11, 3]]), 4)
    assert got.values.shape == (2, 5, 4) and torch.equal(got.indices, want.indices)
    student = torch.randn(2, 5, 300)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert float(soft_target_kl(student, got, 2.0, mask)) == pytest.approx(
        float(soft_target_kl(student, want, 2.0, mask)), rel=1e-2
    )


def test_a_damaged_shard_is_refused(tmp_path):
    path = _write(tmp_path, _teacher(), _bundle(), shard_rows=16)
    victim = path / "shards" / "train-00001" / "values.npy"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match=r"train-00001/values.npy is missing or damaged"):
        CachedTeacher(path)
    CachedTeacher(path, verify=False)  # the user may opt out of the check


def test_a_cache_for_other_data_or_settings_is_refused(tmp_path):
    data, teacher = _bundle(), _teacher()
    path = _write(tmp_path, teacher, data)
    with pytest.raises(DistillError, match="made for different data"):
        CachedTeacher(path).check_data(_bundle(seed=1))
    with pytest.raises(DistillError, match="different teacher; pass --overwrite"):
        _write(tmp_path, teacher, data, identity={"teacher": "another", "data": data.fingerprint})
    with pytest.raises(DistillError, match="different k"):
        _write(tmp_path, teacher, data, k=5)
    _write(tmp_path, teacher, data, k=5, overwrite=True)
    assert CachedTeacher(path).k == 5
    with pytest.raises(DistillError, match="no manifest.json"):
        CachedTeacher(tmp_path)


def test_an_up_to_date_cache_is_reused_and_overwrite_repairs_a_damaged_one(tmp_path):
    data, teacher = _bundle(), _teacher()
    path = _write(tmp_path, teacher, data, shard_rows=16)
    done = []
    _write(tmp_path, teacher, data, shard_rows=16, on_shard=lambda split, shard: done.append(split))
    assert done == []  # nothing recomputed
    (path / "shards" / "val-00002" / "indices.npy").write_bytes(b"junk")
    with pytest.raises(DistillError, match="val-00002/indices.npy is damaged.*--overwrite"):
        _write(tmp_path, teacher, data, shard_rows=16)
    _write(tmp_path, teacher, data, shard_rows=16, overwrite=True)
    CachedTeacher(path)  # every checksum holds again


def _files(path: Path) -> dict[str, bytes]:
    files = {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    for volatile in ("created", "seconds"):
        manifest.pop(volatile)
    return files | {"manifest": json.dumps(manifest, sort_keys=True).encode()}


def test_an_interrupted_cache_resumes_to_the_same_files(tmp_path):
    data, teacher = _bundle(n=70), _teacher()
    whole = _write(tmp_path, teacher, data, name="whole", shard_rows=16)

    class Crash(Exception):
        pass

    def crash_after_two(split: str, shard: int) -> None:
        if (split, shard) == ("train", 1):
            raise Crash

    with pytest.raises(Crash):
        _write(tmp_path, teacher, data, name="resumed", shard_rows=16, on_shard=crash_after_two)
    partial = tmp_path / "resumed.partial"
    assert not (tmp_path / "resumed").exists() and (partial / "progress.json").is_file()
    done = {p.name for p in (partial / "shards").iterdir()}
    assert done == {"train-00000", "train-00001"}

    finished = []
    resumed = _write(tmp_path, teacher, data, name="resumed", shard_rows=16, on_shard=lambda s, i: finished.append(s))
    assert len(finished) == 3 * 5 - 2  # 5 shards per split; only the missing ones were computed
    assert _files(resumed) == _files(whole)
    assert not partial.exists()


def test_a_damaged_shard_of_an_unfinished_cache_is_recomputed(tmp_path):
    data, teacher = _bundle(n=40), _teacher()
    whole = _write(tmp_path, teacher, data, name="whole", shard_rows=16)

    def crash(split: str, shard: int) -> None:
        if split == "val":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, teacher, data, name="again", shard_rows=16, on_shard=crash)
    (tmp_path / "again.partial" / "shards" / "train-00001" / "tail.npy").write_bytes(b"junk")
    assert _files(_write(tmp_path, teacher, data, name="again", shard_rows=16)) == _files(whole)


# ---------------------------------------------------------------------------- end to end


def _config(tmp_path, **changes):
    return parse_config(tiny_config(tmp_path, **changes))


def test_training_from_a_float32_dense_cache_matches_the_live_teacher(tmp_path):
    config = _config(tmp_path, **{"cache.k": 10, "cache.dtype": "float32", "baseline": False})
    path = cache_teacher(config)
    live = run_experiment(config)
    cached = parse_config(
        tiny_config(tmp_path, teacher={"kind": "cache", "path": str(path)}, baseline=False, **{"output.name": "c"})
    )
    from_cache = run_experiment(cached)
    for key in ("test_acc", "agreement", "params"):
        assert from_cache.metrics["models"]["teacher"][key] == live.metrics["models"]["teacher"][key]
    assert (
        from_cache.metrics["models"]["teacher"]["weights_sha256"] == live.metrics["models"]["teacher"]["weights_sha256"]
    )
    live_history = live.metrics["training"]["distilled"]["history"]
    cache_history = from_cache.metrics["training"]["distilled"]["history"]
    for a, b in zip(live_history, cache_history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert from_cache.metrics["models"]["distilled"]["test_acc"] == pytest.approx(
        live.metrics["models"]["distilled"]["test_acc"], abs=0.01
    )
    assert from_cache.metrics["teacher_cache"]["k"] == 10


def test_cached_features_feed_feature_terms_and_missing_ones_are_named(tmp_path):
    terms = [
        {"type": "kd", "weight": 0.5},
        {"type": "hint", "weight": 1.0, "student": "features", "teacher": "features.1"},
    ]
    config = _config(tmp_path, **{"cache.features": ["features.1"], "cache.k": 4})
    path = cache_teacher(config)
    assert CachedTeacher(path).manifest["feature_shapes"] == {"features.1": [32, 2, 2]}
    cached = tiny_config(tmp_path, teacher={"kind": "cache", "path": str(path)}, baseline=False)
    cached["distill"] = {"terms": terms}
    result = run_experiment(parse_config(cached))
    assert result.metrics["models"]["distilled"]["test_acc"] > 0.5
    cached["distill"]["terms"][1]["teacher"] = "features.0"
    cached["output"]["name"] = "other"
    with pytest.raises(DistillError, match=r"holds no features of teacher module 'features.0'.*cache.features"):
        run_experiment(parse_config(cached))
    assert not (tmp_path / "runs" / "other.partial").exists()


def test_stale_cache_is_refused_before_a_run_directory_exists(tmp_path):
    path = cache_teacher(_config(tmp_path))
    stale = tiny_config(tmp_path, teacher={"kind": "cache", "path": str(path)}, **{"data.limit_train": 500})
    with pytest.raises(DistillError, match="teacher.path: cache .* was made for different data"):
        run_experiment(parse_config(stale))
    assert not any((tmp_path / "runs").glob("tiny*.partial"))
    retrained = _config(tmp_path, **{"teacher.train.epochs": 2})
    with pytest.raises(DistillError, match="different teacher; pass --overwrite"):
        cache_teacher(retrained)


def test_cli_cache_then_train_on_unlabeled_images(tmp_path, capsys):
    """alpha = 1 from the cache: the extra images carry no labels, the teacher labels them."""
    folder = tmp_path / "unlabeled" / "any" / "depth"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)).save(folder / f"{i}.png")  # resized to 8x8
    config = tiny_config(tmp_path, **{"data.unlabeled": str(tmp_path / "unlabeled"), "distill.alpha": 1.0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["cache", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert "train from it with: distill run" in capsys.readouterr().out
    data = load_data(parse_config(config).data)
    assert len(data.train) == 1294 + 40 and data.train.labeled == 1294
    assert bool((data.train.y[-40:] == -1).all())
    cache_dir = tmp_path / "runs" / "tiny-teacher-cache"
    code = main(["run", str(tmp_path / "c.yaml"), "--quiet", "--set", f"teacher={{kind: cache, path: {cache_dir}}}"])
    assert code == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["data"]["train"] == 1334 and metrics["data"]["train_labeled"] == 1294
    assert "(1294 labeled)" in (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert metrics["objective"] == "1·kd"


def test_cli_cache_errors_are_one_line(tmp_path, capsys):
    config = tiny_config(tmp_path, teacher={"kind": "cache", "path": str(tmp_path / "nowhere")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["cache", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is not a teacher cache (no manifest.json)" in err and err.count("\n") == 1


def test_unlabeled_pool_errors(tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((5, 3, 8, 8), dtype=np.float32))
    with pytest.raises(
        DistillError, match=r"data.unlabeled: inputs in .* have shape \[3, 8, 8\], the labeled data \[1, 8, 8\]"
    ):
        load_data(parse_config(tiny_config(tmp_path, **{"data.unlabeled": str(tmp_path / "wrong.npz")})).data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="data.unlabeled: no images found"):
        load_data(parse_config(tiny_config(tmp_path, **{"data.unlabeled": str(tmp_path / "empty")})).data)
    np.savez(tmp_path / "grey.npz", x=np.full((5, 8, 8), 255, dtype=np.uint8))
    data = load_data(parse_config(tiny_config(tmp_path, **{"data.unlabeled": str(tmp_path / "grey.npz")})).data)
    plain = load_data(parse_config(tiny_config(tmp_path)).data)
    assert data.mean == plain.mean and torch.equal(data.train.x[:-5], plain.train.x)  # the pool moves no statistics


def test_unlabeled_text_list_of_images_equals_the_folder(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(folder / f"{i}.png")  # RGB, resized
    listing = tmp_path / "lists" / "pool.txt"
    listing.parent.mkdir()
    lines = ["# six images, one absolute", "", *[f"../pool/{i}.png" for i in range(5)], str(folder / "5.png")]
    listing.write_text("\n".join(lines) + "\n")
    from_list = load_data(parse_config(tiny_config(tmp_path, **{"data.unlabeled": str(listing)})).data)
    from_folder = load_data(parse_config(tiny_config(tmp_path, **{"data.unlabeled": str(folder)})).data)
    assert len(from_list.train) == len(from_folder.train) and from_list.train.labeled == from_folder.train.labeled
    assert torch.equal(from_list.train.x, from_folder.train.x)
    assert bool((from_list.train.y[-6:] == -1).all())


def test_unlabeled_text_list_of_vectors_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "v.npz", x=rng.random((40, 3)).astype(np.float32), y=rng.integers(0, 2, 40))
    spec = {"source": "npz", "path": str(tmp_path / "v.npz")}
    (tmp_path / "pool.txt").write_text("# x1 x2 x3\n0.5 1 -2\n\n3,4,5e-1\n")
    data = load_data(parse_config(tiny_config(tmp_path, data={**spec, "unlabeled": str(tmp_path / "pool.txt")})).data)
    assert len(data.train) == len(load_data(parse_config(tiny_config(tmp_path, data=spec)).data).train) + 2
    raw = torch.tensor([[0.5, 1, -2], [3, 4, 0.5]])
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    torch.testing.assert_close(data.train.x[-2:], (raw - mean) / std)
    cases = {
        "1 2\n": r"pool.txt line 1: 2 numbers, the inputs have 3",
        "# nothing\n\n": r"pool.txt lists no inputs",
        "1 2 x\n": r"pool.txt line 1: expected 3 numbers",
        "1 2 3\n1 2 nan\n": r"NaN, infinity",
    }
    for text, message in cases.items():
        (tmp_path / "pool.txt").write_text(text)
        with pytest.raises(DistillError, match=f"data.unlabeled: .*{message}"):
            load_data(parse_config(tiny_config(tmp_path, data={**spec, "unlabeled": str(tmp_path / "pool.txt")})).data)
    (tmp_path / "images.txt").write_text("a.png\n")
    with pytest.raises(DistillError, match=r"data.unlabeled: .*images.txt line 1: image .*a.png does not exist"):
        load_data(parse_config(tiny_config(tmp_path, **{"data.unlabeled": str(tmp_path / "images.txt")})).data)


def test_distiller_with_a_cache_needs_indices(tmp_path):
    data, teacher = _bundle(), _teacher()
    cache = CachedTeacher(_write(tmp_path, teacher, data, k=7, dtype="float32"))
    student = nn.Linear(6, 7)
    distiller = Distiller(student, cache, {"kd": SoftTargetKD(2.0)})
    with pytest.raises(ValueError, match="pass index="):
        distiller(data.train.x[:4])
    live = Distiller(student, teacher, {"kd": SoftTargetKD(2.0)})
    index = torch.tensor([3, 9, 1])
    assert float(distiller(data.train.x[index], index=index).loss.detach()) == pytest.approx(
        float(live(data.train.x[index]).loss.detach()), rel=1e-5
    )


def test_only_a_bounded_number_of_shards_stay_mapped(tmp_path, monkeypatch):
    import distill.cache.reader

    monkeypatch.setattr(distill.cache.reader, "MAX_OPEN_SHARDS", 3)
    data, teacher = _bundle(n=50), _teacher()
    cache = CachedTeacher(_write(tmp_path, teacher, data, shard_rows=5))  # 10 shards per split
    got = cache.lookup(torch.arange(50).flip(0)).logits
    assert len(cache._open) == 3
    want = TopKLogits.from_dense(_dense(teacher, data.train.x.flip(0)), 3)
    assert torch.equal(got.indices, want.indices)
