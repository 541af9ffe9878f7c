"""Image and feature-vector data as in-memory tensors with fixed train / validation / test splits.

Sources: Fashion-MNIST (any directory holding the four standard IDX files), sklearn digits,
the user's arrays (``.npz`` with ``x`` and ``y``) and image folders (``root/<class>/*.png``).
Splits depend only on ``split_seed``, never on the run's seed, so every model in a run and
every run with the same data sees the same validation and test samples. Anything a run
chooses (best epoch, settings) is chosen on validation; test is only reported.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from distill.core.data import UNLABELED, DataBundle, Split
from distill.core.errors import DistillError
from distill.core.memory import available_memory, format_bytes
from distill.tasks.augment import AugmentSpec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
MAX_CLASSES = 100_000


class Normalization(BaseModel):
    """Fixed input statistics: ``x' = (x - mean) / std`` per channel (images, scaled to [0, 1]) or per feature."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)


class DataSpec(BaseModel):
    """Which data, and how it is split."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["fashion_mnist", "digits", "npz", "folder"]
    path: Path | None = Field(None, description="IDX directory, .npz file or image-folder root")
    test_path: Path | None = Field(None, description="separate test .npz / folder (else split off)")
    val_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="0 = no validation split: every training sample trains, the last epoch is kept"
    )
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="used when the source has no test split")
    split_seed: int = Field(0, ge=0)
    limit_train: int | None = Field(None, gt=0, description="use only this many training samples")
    labeled: int | None = Field(
        None,
        gt=0,
        description="label budget of the students: keep labels on only this many training samples "
        "(a teacher trained by distill still sees every label: it stands for a model trained elsewhere)",
    )
    image_size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = Field(
        None, description="resize folder images to [H, W]"
    )
    normalize: Literal["auto", "none"] | Normalization = Field(
        "auto",
        description="auto: per-channel (images) or per-feature (vectors) statistics of the labeled training inputs; "
        "none: inputs as loaded (images scaled to [0, 1]); or fixed {mean: [...], std: [...]}, one value per channel "
        "or feature, e.g. the statistics a checkpoint teacher was trained with",
    )
    augment: AugmentSpec = Field(
        default_factory=AugmentSpec,
        description="augmentation of the students' training images (crop, flip, mixup, cutmix): the distilled "
        "student and its live teacher see the same view, and so does the scratch baseline; the teacher distill "
        "trains and validation/test images are not augmented",
    )
    unlabeled: Path | None = Field(
        None,
        description="extra training inputs without labels: a directory of images (searched recursively), a .txt "
        "file with one input per line (an image path, relative to the file, or a vector of numbers), or an .npz "
        "with 'x'; the students learn them from the teacher alone",
    )


# ---------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): uint8 images ``[N, H, W]`` or labels ``[N]``."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DistillError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4:
        raise DistillError(f"IDX file {path} is truncated (only {len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DistillError(f"{path} is not a uint8 IDX file (bad magic number)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DistillError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DistillError(f"IDX file {path} holds {len(raw) - header} bytes of data, its header promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    raise DistillError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}: install Debian's "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist), or set data.path "
        f"(or DISTILL_FASHION_MNIST) to a directory holding the four IDX files"
    )


def _load_fashion_mnist(spec: DataSpec):
    directory = spec.path or Path(os.environ.get("DISTILL_FASHION_MNIST", FASHION_MNIST_DIR))
    arrays = {key: read_idx(_find_idx(directory, stem)) for key, stem in IDX_FILES.items()}
    for part in ("train", "test"):
        if len(arrays[f"{part}_x"]) != len(arrays[f"{part}_y"]):
            raise DistillError(f"Fashion-MNIST in {directory}: {part} images and labels differ in count")
    # bytes until the split: _inputs turns the kept ones into k/255 (see there)
    train = (arrays["train_x"][:, None], arrays["train_y"])
    test = (arrays["test_x"][:, None], arrays["test_y"])
    return train, test, FASHION_MNIST_CLASSES


def _load_digits(spec: DataSpec):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images[:, None] / 16.0
    return (x, digits.target), None, [str(i) for i in range(10)]


def _load_npz(path: Path, field_name: str):
    if not path.is_file():
        raise DistillError(f"{field_name}: file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DistillError(f"{path} must hold arrays 'x' and 'y' (found {sorted(archive.files)})")
            x, y = archive["x"], archive["y"]
    except DistillError:
        raise
    except Exception as err:  # noqa: BLE001 - zip / format errors of all kinds
        raise DistillError(f"cannot read {path}: {err}") from err
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biu":
        raise DistillError(f"{path}: 'x' must be numeric and 'y' integer (got {x.dtype} and {y.dtype})")
    if x.ndim < 2 or y.ndim != 1:
        raise DistillError(
            f"{path}: 'x' must be [N, features...] and 'y' [N] (got shapes {list(x.shape)} and {list(y.shape)})"
        )
    if x.ndim == 3:  # [N, H, W] grey images
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # [N, H, W, C]
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        x = x / 255.0
    return x, y


def _read_image(file: Path, field_name: str):
    """One decoded image. Every way a file can be broken (truncated, not an image, a header
    declaring a gigapixel "decompression bomb") is a one-line error; Pillow's warnings are muted."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                return image.copy()
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DistillError(f"{field_name}: cannot read image {file}: {reason}") from None


def _load_folder(path: Path, field_name: str, image_size, class_names=None):
    if not path.is_dir():
        raise DistillError(f"{field_name}: directory {path} does not exist")
    classes = class_names or sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DistillError(f"{field_name}: {path} has no class sub-directories (expected root/<class>/*.png)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = (
            sorted(f for f in (path / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if (path / name).is_dir()
            else []
        )
        for file in files:
            images.append(_read_image(file, field_name))
            labels.append(label)
    if not images:
        raise DistillError(f"{field_name}: no images found under {path}/<class>/")
    mode = "L" if all(im.mode in ("L", "1", "I;16", "I") for im in images) else "RGB"
    size = tuple(image_size[::-1]) if image_size else images[0].size
    needed = 2 * 4 * len(images) * (1 if mode == "L" else 3) * size[0] * size[1]  # float32, array and tensor
    free = available_memory()
    if free is not None and needed > free:
        raise DistillError(
            f"{'data.image_size' if image_size else field_name}: {len(images):,} images of {size[1]}×{size[0]} pixels "
            f"need about {format_bytes(needed)} as float32, more than the {format_bytes(free)} of memory available; "
            f"set a smaller data.image_size"
        )
    arrays = []
    for image in images:
        image = image.convert(mode)
        if image.size != size:
            if not image_size:
                raise DistillError(f"{field_name}: images in {path} differ in size; set data.image_size: [H, W]")
            image = image.resize(size)
        array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    return np.stack(arrays), np.asarray(labels), classes


TEXT_SUFFIXES = (".txt", ".lst")


def _is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def _images_shaped(files: list[Path], shape: tuple[int, ...], field_name: str) -> np.ndarray:
    """Decode ``files`` into an array ``[N, *shape]``: converted to the labeled images' channels
    and resized to their size, scaled to [0, 1]."""
    if not _is_image_shape(shape):
        raise DistillError(f"{field_name}: images need image data, but the labeled inputs are {list(shape)}")
    mode, size = ("L" if shape[0] == 1 else "RGB"), (shape[2], shape[1])
    arrays = []
    for file in files:
        image = _read_image(file, field_name).convert(mode)
        image = image.resize(size) if image.size != size else image
        array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    return np.stack(arrays)


def _load_text_list(path: Path, shape: tuple[int, ...], field_name: str) -> np.ndarray:
    """A text file of inputs, one per line (blank lines and ``#`` comments skipped): image paths
    (relative ones from the file's directory) when the data are images, else whitespace- or
    comma-separated numbers, one input vector per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DistillError(f"{field_name}: cannot read {path}: {err}") from None
    entries = [(number, line.strip()) for number, line in enumerate(lines, 1)]
    entries = [(number, line) for number, line in entries if line and not line.startswith("#")]
    if not entries:
        raise DistillError(f"{field_name}: {path} lists no inputs")
    if _is_image_shape(shape):
        files = []
        for number, line in entries:
            file = Path(os.path.expanduser(line))
            file = file if file.is_absolute() else path.parent / file
            if not file.is_file():
                raise DistillError(f"{field_name}: {path} line {number}: image {file} does not exist")
            files.append(file)
        return _images_shaped(files, shape, field_name)
    if len(shape) != 1:
        raise DistillError(f"{field_name}: a text list holds image paths or vectors, but the inputs are {list(shape)}")
    rows = []
    for number, line in entries:
        try:
            row = [float(value) for value in line.replace(",", " ").split()]
        except ValueError:
            raise DistillError(f"{field_name}: {path} line {number}: expected {shape[0]} numbers") from None
        if len(row) != shape[0]:
            raise DistillError(f"{field_name}: {path} line {number}: {len(row)} numbers, the inputs have {shape[0]}")
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def _load_unlabeled(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Inputs without labels, shaped like the labeled ones: images under a directory (any
    layout), a text file (one image path per line, or one input vector of numbers per line), or
    an .npz's 'x'. Images are resized and converted to the labeled images' size and channels."""
    field_name = "data.unlabeled"
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DistillError(f"{field_name}: no images found under {path}")
        x = _images_shaped(files, shape, field_name)
    elif path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        x = _load_text_list(path, shape, field_name)
    elif path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive:
                    raise DistillError(f"{field_name}: {path} must hold an array 'x' (found {sorted(archive.files)})")
                x = archive["x"]
        except DistillError:
            raise
        except Exception as err:  # noqa: BLE001 - zip / format errors of all kinds
            raise DistillError(f"{field_name}: cannot read {path}: {err}") from None
        if x.dtype.kind not in "biuf":
            raise DistillError(f"{field_name}: 'x' in {path} must be numeric (got {x.dtype})")
        if x.ndim == len(shape) and len(shape) == 3:  # [N, H, W] grey images
            x = x[:, None]
        if x.dtype == np.uint8:
            x = x / 255.0
    else:
        raise DistillError(
            f"{field_name}: {path} does not exist (give a directory of images, a .txt list or an .npz file)"
        )
    if tuple(x.shape[1:]) != tuple(shape):
        raise DistillError(
            f"{field_name}: inputs in {path} have shape {list(x.shape[1:])}, the labeled data {list(shape)}"
        )
    if len(x) == 0 or not np.isfinite(x).all() or np.abs(x).max() > np.finfo(np.float32).max:
        raise DistillError(f"{field_name}: {path} holds no inputs, or inputs with NaN, infinity or beyond float32")
    return x


# ---------------------------------------------------------------------------- assembly


def _split_off(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    cut = max(1, int(round(n * fraction))) if fraction > 0 else 0
    return order[cut:], order[:cut]


def _check(x: np.ndarray, y: np.ndarray, where: str, num_classes: int | None = None) -> None:
    if len(x) == 0:
        raise DistillError(f"{where} is empty")
    if x.size == 0:
        raise DistillError(f"{where}: the inputs have no values (shape {list(x.shape)}); each sample needs features")
    if len(x) != len(y):
        raise DistillError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if y.ndim != 1:
        raise DistillError(f"{where}: labels must be one integer per sample, got shape {list(y.shape)}")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise DistillError(f"{where}: labels must lie in 0..{(num_classes or 1) - 1}, found {y.min()}..{y.max()}")
    if y.max() >= MAX_CLASSES:
        raise DistillError(f"{where}: label {y.max()} is implausibly large; number the classes 0..K-1")
    if x.dtype.kind != "f":
        return  # integers are finite and, below 2**64, within float32's range
    lowest, highest = x.min(), x.max()  # two reductions, no temporaries: NaN propagates into both
    if not (np.isfinite(lowest) and np.isfinite(highest)):
        raise DistillError(f"{where}: inputs contain NaN or infinity")
    largest = max(abs(float(lowest)), abs(float(highest)))
    if largest > float(np.finfo(np.float32).max):
        raise DistillError(f"{where}: inputs exceed the float32 range (|x| up to {largest:.3g}); rescale them")


def _inputs(array: np.ndarray) -> Tensor:
    """One split's inputs as a float32 tensor of its own. Bytes (Fashion-MNIST's pixels) become
    k/255 in float32, exactly as numpy would compute them, but after the split: one pass over the
    kept samples instead of a float copy of the whole set that the split then copies again."""
    if array.dtype == np.uint8:
        readable = array if array.flags.writeable else array.copy()  # torch warns on a read-only file buffer
        return torch.from_numpy(readable).to(torch.float32).div_(255)
    return torch.tensor(np.asarray(array), dtype=torch.float32)  # a copy: arrays may be read-only


def _normalization(setting: str | Normalization, train: Split) -> tuple[Tensor, Tensor]:
    """Mean and std shaped to broadcast over inputs: per channel for images [C, H, W], per
    feature for vectors. ``auto`` takes them from the labeled training inputs; an unlabeled pool
    does not move them, so a teacher trained without it sees the same inputs."""
    dims = [0] + list(range(2, train.x.dim()))
    shape = [1, train.x.shape[1]] + [1] * (train.x.dim() - 2)
    if setting == "auto":
        labeled = train.y >= 0
        labeled_x = train.x if bool(labeled.all()) else train.x[labeled]  # no copy when every sample is labeled
        return labeled_x.mean(dim=dims, keepdim=True), labeled_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    if setting == "none":
        return torch.zeros(shape), torch.ones(shape)
    for name, values in (("mean", setting.mean), ("std", setting.std)):
        if len(values) != shape[1]:
            unit = "channel(s)" if train.x.dim() > 2 else "feature(s)"
            raise DistillError(
                f"data.normalize.{name}: {len(values)} value(s), but the inputs have {shape[1]} {unit}; give one per {unit[:-3]}"
            )
    return torch.tensor(setting.mean).reshape(shape), torch.tensor(setting.std).reshape(shape)


def load_data(spec: DataSpec) -> DataBundle:
    """Load, validate, split and normalise the configured dataset."""
    test = None
    if spec.source == "fashion_mnist":
        train, test, class_names = _load_fashion_mnist(spec)
        where = "Fashion-MNIST"
    elif spec.source == "digits":
        train, test, class_names = _load_digits(spec)
        where = "sklearn digits"
    elif spec.source == "npz":
        if spec.path is None:
            raise DistillError("data.path: set it to an .npz file holding arrays 'x' and 'y'")
        train = _load_npz(spec.path, "data.path")
        if spec.test_path is not None:
            test = _load_npz(spec.test_path, "data.test_path")
        where = str(spec.path)
        class_names = None
    else:
        if spec.path is None:
            raise DistillError("data.path: set it to an image-folder root laid out as root/<class>/*.png")
        *train, class_names = _load_folder(spec.path, "data.path", spec.image_size)
        if spec.test_path is not None:
            *test, _ = _load_folder(
                spec.test_path, "data.test_path", spec.image_size or train[0].shape[-2:], class_names
            )
        where = str(spec.path)

    x, y = train
    if class_names:
        num_classes = len(class_names)
    else:
        num_classes = int(y.max()) + 1 if len(y) else 0
    _check(x, y, where, num_classes)
    if test is not None:
        _check(test[0], test[1], f"{where} (test)", num_classes)
        if test[0].shape[1:] != x.shape[1:]:
            raise DistillError(f"{where}: test inputs have shape {list(test[0].shape[1:])}, train {list(x.shape[1:])}")
    class_names = class_names or [str(i) for i in range(num_classes)]

    rng = np.random.default_rng(spec.split_seed)
    if test is None:
        keep, test_index = _split_off(len(y), spec.test_fraction, rng)
        test = (x[test_index], y[test_index])
        x, y = x[keep], y[keep]
    train_index, val_index = _split_off(len(y), spec.val_fraction, rng)
    if spec.limit_train is not None:
        train_index = train_index[: spec.limit_train]
    if len(train_index) == 0:
        raise DistillError(f"{where}: too few samples to split off validation and test sets")

    train_split = Split(_inputs(x[train_index]), torch.tensor(y[train_index], dtype=torch.long))
    if spec.unlabeled is not None:
        extra = _inputs(_load_unlabeled(spec.unlabeled, x.shape[1:]))
        train_split = Split(
            torch.cat([train_split.x, extra]),
            torch.cat([train_split.y, torch.full((len(extra),), UNLABELED, dtype=torch.long)]),
        )
    val_split = Split(_inputs(x[val_index]), torch.tensor(y[val_index], dtype=torch.long))
    test_split = Split(_inputs(test[0]), torch.tensor(test[1], dtype=torch.long))

    mean, std = _normalization(spec.normalize, train_split)
    for split in (train_split, val_split, test_split):
        split.x.sub_(mean).div_(std)  # in place: the splits are this function's own copies

    return DataBundle(
        name=spec.source,
        train=train_split,
        val=val_split,
        test=test_split,
        num_classes=num_classes,
        class_names=class_names,
        mean=mean.flatten().tolist(),
        std=std.flatten().tolist(),
        normalize=spec.normalize if isinstance(spec.normalize, str) else "fixed",
    )
