"""Data loaders: IDX, npz and image folders, fixed splits, and one-line errors for bad data."""

import numpy as np
import pytest
import torch
from PIL import Image

from distill.core.data import iterate_batches
from distill.core.errors import DistillError
from distill.tasks.image_data import DataSpec, load_data, read_idx

from conftest import write_idx


def test_idx_round_trip_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", images, compress=False)
    write_idx(tmp_path / "b-idx3-ubyte", images, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), images)


def test_truncated_and_foreign_idx_files_are_refused(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 5, 5), np.uint8), compress=False)
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "short").write_bytes(data[:-7])
    with pytest.raises(DistillError, match="header promises 100"):
        read_idx(tmp_path / "short")
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(DistillError, match="bad magic"):
        read_idx(tmp_path / "foreign")
    (tmp_path / "header").write_bytes(data[:9])
    with pytest.raises(DistillError, match="truncated inside its header"):
        read_idx(tmp_path / "header")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 40)
    with pytest.raises(DistillError, match="cannot read IDX file"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_from_any_directory_with_fixed_splits(fake_fashion):
    spec = DataSpec(source="fashion_mnist", path=fake_fashion, val_fraction=0.2)
    data = load_data(spec)
    assert (len(data.train), len(data.val), len(data.test)) == (240, 60, 100)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.class_names[0] == "T-shirt/top"
    # normalised with training statistics
    assert abs(float(data.train.x.mean())) < 1e-4 and float(data.train.x.std()) == pytest.approx(1.0, rel=1e-3)
    again = load_data(spec)
    torch.testing.assert_close(again.val.x, data.val.x)
    assert again.fingerprint == data.fingerprint
    other = load_data(DataSpec(source="fashion_mnist", path=fake_fashion, val_fraction=0.2, split_seed=1))
    assert other.fingerprint != data.fingerprint


def test_fashion_mnist_pixels_are_exactly_k_over_255_in_float32(fake_fashion):
    """Bytes stay bytes until the split; the kept samples then hold what numpy's float32 k/255 gives."""
    data = load_data(DataSpec(source="fashion_mnist", path=fake_fashion, val_fraction=0.2, normalize="none"))
    pixels = read_idx(fake_fashion / "t10k-images-idx3-ubyte.gz")[:, None]
    expected = pixels.astype(np.float32) / np.float32(255)
    assert data.test.x.dtype == torch.float32
    assert np.array_equal(data.test.x.numpy(), expected)  # bit for bit
    train = read_idx(fake_fashion / "train-images-idx3-ubyte.gz")[:, None].astype(np.float32) / np.float32(255)
    rows = {row.tobytes() for row in train}
    assert all(row.tobytes() in rows for row in data.train.x.numpy())  # training samples are the file's, unchanged
    auto = load_data(DataSpec(source="fashion_mnist", path=fake_fashion, val_fraction=0.2))
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in (auto.mean, auto.std))
    assert torch.equal(auto.test.x, (data.test.x - mean) / std)  # normalised in place, the same values


def test_missing_fashion_mnist_explains_how_to_get_it(tmp_path):
    with pytest.raises(DistillError, match="apt-get install dataset-fashion-mnist"):
        load_data(DataSpec(source="fashion_mnist", path=tmp_path / "nowhere"))


def test_digits_splits_and_label_budget():
    data = load_data(DataSpec(source="digits"))
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    budget = data.with_label_budget(100, seed=0)
    assert budget.train.labeled == 100 and int((budget.train.y == -1).sum()) == len(data.train) - 100
    assert torch.equal(budget.train.y[budget.train.y >= 0], data.train.y[budget.train.y >= 0])
    assert budget.val.labeled == len(data.val) and budget.test.labeled == len(data.test)
    assert data.train.labeled == len(data.train)  # the original keeps every label
    only = budget.labeled_only()
    assert len(only.train) == 100 and only.train.labeled == 100


def test_npz_arrays_and_their_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", x=rng.random((50, 6)).astype(np.float32), y=rng.integers(0, 3, 50))
    data = load_data(DataSpec(source="npz", path=tmp_path / "ok.npz"))
    assert data.input_shape == (6,) and data.num_classes == 3
    cases = {
        "nokeys.npz": dict(a=np.zeros(3)),
        "empty.npz": dict(x=np.zeros((0, 4)), y=np.zeros(0, int)),
        "mismatch.npz": dict(x=np.zeros((5, 4)), y=np.zeros(4, int)),
        "negative.npz": dict(x=np.zeros((5, 4)), y=np.array([0, 1, -3, 1, 0])),
        "floatlabels.npz": dict(x=np.zeros((5, 4)), y=np.zeros(5)),
        "nan.npz": dict(x=np.full((5, 4), np.nan), y=np.zeros(5, int)),
        "nofeatures.npz": dict(x=np.zeros((5, 0), np.float32), y=np.zeros(5, int)),  # found by hypothesis
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DistillError) as info:
            load_data(DataSpec(source="npz", path=tmp_path / name))
        assert "\n" not in str(info.value)
    np.savez(tmp_path / "hwc.npz", x=rng.integers(0, 255, (20, 9, 7, 3), dtype=np.uint8), y=rng.integers(0, 2, 20))
    assert load_data(DataSpec(source="npz", path=tmp_path / "hwc.npz")).input_shape == (3, 9, 7)
    np.savez(tmp_path / "huge.npz", x=np.zeros((5, 4)), y=np.array([0, 1, 2, 3, 10**9]))
    with pytest.raises(DistillError, match="implausibly large"):
        load_data(DataSpec(source="npz", path=tmp_path / "huge.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(DistillError, match="cannot read"):
        load_data(DataSpec(source="npz", path=tmp_path / "corrupt.npz"))
    with pytest.raises(DistillError, match="does not exist"):
        load_data(DataSpec(source="npz", path=tmp_path / "absent.npz"))


def test_image_folders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "ant", "bee"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    data = load_data(DataSpec(source="folder", path=tmp_path / "imgs"))
    assert data.class_names == ["ant", "bee", "cat"] and data.input_shape == (3, 12, 10)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DistillError, match="no images found"):
        load_data(DataSpec(source="folder", path=tmp_path / "empty"))
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DistillError, match="broken.png"):
        load_data(DataSpec(source="folder", path=tmp_path / "imgs"))


def test_batches_cover_every_sample_once_in_seeded_order():
    data = load_data(DataSpec(source="digits"))
    order = torch.cat([y for _, y, _ in iterate_batches(data.train, 100, torch.Generator().manual_seed(3))])
    again = torch.cat([y for _, y, _ in iterate_batches(data.train, 100, torch.Generator().manual_seed(3))])
    assert len(order) == len(data.train)
    assert torch.equal(order, again) and sorted(order.tolist()) == sorted(data.train.y.tolist())
