"""Reading a cache: memory-mapped shards, verified once, looked up by sample position."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.cache.format import FORMAT, FORMAT_VERSION, padding_row, read_json, verify_shard
from distill.core.data import DataBundle
from distill.core.errors import DistillError
from distill.core.losses import ModelOutputs
from distill.core.signals import QuantizedValues, TopKLogits, ValueDtype

MAX_OPEN_SHARDS = 64


class _Shard:
    def __init__(self, directory: Path, files: dict[str, str]) -> None:
        self.arrays = {
            name.removesuffix(".npy"): np.load(directory / name, mmap_mode="r", allow_pickle=False) for name in files
        }


class CachedTeacher:
    """Teacher signals read from a cache directory written by :func:`write_cache`.

    ``lookup(index)`` returns the teacher's outputs for training samples ``index`` as
    ``ModelOutputs`` whose logits are :class:`~distill.core.signals.TopKLogits`; the Distiller uses
    it in place of a teacher model. ``verify=True`` checks every shard's sha256 on opening.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, field: str = "teacher.path") -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            hint = " (an interrupted `distill cache`: run it again to finish)" if self._is_partial() else ""
            raise DistillError(f"{field}: {self.path} is not a teacher cache (no manifest.json){hint}")
        manifest = read_json(self.path / "manifest.json")
        if manifest is None or manifest.get("format") != FORMAT:
            raise DistillError(f"{field}: {self.path}/manifest.json is not a distill teacher-cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DistillError(
                f"{field}: cache {self.path} has format version {manifest.get('format_version')}, this distill "
                f"reads {FORMAT_VERSION}; rebuild it with `distill cache`"
            )
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.k: int = manifest["k"]
        self.dtype: ValueDtype = manifest["dtype"]
        self.features: list[str] = manifest["features"]
        self.samples_per_shard: int = manifest["samples_per_shard"]
        self.packed: bool = manifest.get("packed", False)
        self._field = field
        self._records: dict[str, list[dict]] = {split: info["shards"] for split, info in manifest["splits"].items()}
        self._open: OrderedDict[tuple[str, int], _Shard] = OrderedDict()  # memory maps, least recently used first
        for split, records in self._records.items():
            for number, record in enumerate(records):
                directory = self.path / "shards" / record["name"]
                if verify:
                    bad = verify_shard(directory, record["files"])
                    if bad is not None:
                        raise DistillError(
                            f"{field}: cache file {bad} is missing or damaged (checksum mismatch); rebuild the cache with "
                            f"`distill cache --overwrite`"
                        )
                if number == 0:
                    self._shard(split, 0)  # fails early on a file numpy cannot read

    def _shard(self, split: str, number: int) -> _Shard:
        """Shard ``number`` of ``split``, memory-mapped on first use. At most ``MAX_OPEN_SHARDS``
        stay mapped (each map holds a file descriptor per array), so huge caches stay under the
        process's file limit."""
        key = (split, number)
        shard = self._open.get(key)
        if shard is None:
            directory = self.path / "shards" / self._records[split][number]["name"]
            try:
                shard = _Shard(directory, self._records[split][number]["files"])
            except (OSError, ValueError) as err:
                raise DistillError(f"{self._field}: cannot read cache shard {directory}: {err}") from None
            self._open[key] = shard
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(key)
        return shard

    def _is_partial(self) -> bool:
        return self.path.with_name(self.path.name + ".partial").is_dir()

    def __len__(self) -> int:
        return self.manifest["splits"]["train"]["samples"]

    @property
    def teacher(self) -> dict[str, Any]:
        """What the manifest records about the teacher (weights hash, parameters, model spec)."""
        return {**self.manifest.get("teacher", {}), **self.manifest.get("teacher_facts", {})}

    def model_spec(self) -> Any:
        """The teacher's architecture (a model spec) as the manifest records it; None if it does not."""
        from pydantic import TypeAdapter

        from distill.tasks.models import ModelSpec

        recorded = self.teacher.get("model")
        return None if recorded is None else TypeAdapter(ModelSpec).validate_python(recorded)

    def check_data(self, data: DataBundle, field: str = "teacher.path") -> None:
        """Refuse a cache made for other data: signals for sample i must be about sample i."""
        if self.manifest.get("data") != data.fingerprint:
            made = self.manifest.get("data_info") or {}
            differs = next((key for key in made if key in data.info and made[key] != data.info[key]), None)
            if differs is not None:
                raise DistillError(
                    f"{field}: cache {self.path} was made with another {differs.replace('_', ' ')} "
                    f"({made[differs]} here: {data.info[differs]}); rebuild it with `distill cache` for this config"
                )
            raise DistillError(
                f"{field}: cache {self.path} was made for different data (fingerprint differs from data: "
                f"{data.name}, {len(data.train)} train samples); rebuild it with `distill cache` for this config"
            )
        if self.vocab_size != data.num_classes:
            raise DistillError(
                f"{field}: cache {self.path} holds {self.vocab_size} classes but the data has {data.num_classes}"
            )

    def check_features(self, names: list[str]) -> None:
        missing = [name for name in names if name not in self.features]
        if missing:
            raise DistillError(
                f"teacher: the cache at {self.path} holds no features of teacher module {missing[0]!r} "
                f"(it holds {self.features or 'none'}); rebuild it with cache.features: [{missing[0]}]"
            )

    def bytes_per_row(self) -> float:
        """Stored bytes of the logit signals per row (sample or token), features excluded."""
        info = self.manifest["splits"]["train"]
        rows = info.get("rows", info["samples"] * max(1, int(np.prod(self.manifest["row_shape"] or [1]))))
        total = sum(
            (self.path / "shards" / record["name"] / name).stat().st_size
            for record in info["shards"]
            for name in record["files"]
            if not name.startswith("feature-") and name not in ("positions.npy", "mask.npy")
        )
        return total / rows

    def _gather(self, split: str, index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Rows ``index`` of the arrays ``names``, across shards; the shard arithmetic is done
        once for all arrays, and a batch within one shard is a plain fancy index."""
        shard_of, local = np.divmod(index, self.samples_per_shard)
        if len(index) and shard_of.min() == shard_of.max():
            arrays = self._shard(split, int(shard_of[0])).arrays
            return {name: arrays[name][local] for name in names}
        first = self._shard(split, 0).arrays
        out = {name: np.empty((len(index), *first[name].shape[1:]), dtype=first[name].dtype) for name in names}
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            arrays = self._shard(split, int(shard)).arrays
            for name in names:
                out[name][chosen] = arrays[name][local[chosen]]
        return out

    def _gather_packed(self, split: str, index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Rows ``index`` of a packed cache's signal arrays, ``[len(index), seq, ...]``: each
        sample's stored positions scattered back by its mask, padding filled with a uniform row."""
        seq = self._shard(split, 0).arrays["mask"].shape[1]  # each split is padded to its own longest row
        filler = padding_row(self.vocab_size, self.k, self.dtype) | {"label_logprob": np.zeros((), np.float32)}
        out = {name: np.broadcast_to(filler[name], (len(index), seq, *filler[name].shape)).copy() for name in names}
        shard_of, local = np.divmod(index, self.samples_per_shard)
        for shard in np.unique(shard_of):
            chosen = np.nonzero(shard_of == shard)[0]
            arrays = self._shard(split, int(shard)).arrays
            positions, mask = arrays["positions"], arrays["mask"][local[chosen]]
            rows = np.concatenate([np.arange(positions[i], positions[i + 1]) for i in local[chosen]])
            for name in names:
                block = out[name][chosen]
                block[mask] = arrays[name][rows]
                out[name][chosen] = block
        return out

    @property
    def views(self) -> dict[str, Any] | None:
        """What a cache of augmented views records (augmentation settings, seed, views per image);
        None for a cache of the plain training images."""
        return self.manifest.get("views")

    def use_views(self) -> None:
        """Training lookups read the augmented views (rows ``view * samples + image``), not the images."""
        if self.views is None:
            raise DistillError(
                f"teacher.path: cache {self.path} holds no augmented views; rebuild it with data.augment"
            )
        self.training_split = "views"

    training_split = "train"

    def lookup(
        self, index: Tensor, *, split: str | None = None, device: torch.device | str | None = None
    ) -> ModelOutputs:
        """The teacher's outputs for samples ``index`` of ``split`` (:class:`~distill.core.losses.base.TeacherSignals`);
        by default the training split (or its augmented views, after :meth:`use_views`)."""
        split = split or self.training_split
        idx = index.detach().cpu().numpy().astype(np.int64)
        n = self.manifest["splits"][split]["samples"]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"cache {self.path} holds {n} {split} samples; index {int(idx.max())} is out of range")
        names = ["values", "indices", "logsumexp", "tail"] + (["offset", "scale"] if self.dtype == "int8" else [])
        features = [f"feature-{name}" for name in self.features]
        if self.packed:
            rows = self._gather_packed(split, idx, names) | self._gather(split, idx, features)
        else:
            rows = self._gather(split, idx, names + features)
        raw = torch.from_numpy(rows["values"])
        if self.dtype == "bfloat16":
            values = raw.view(torch.bfloat16).float()
        elif self.dtype == "int8":
            offset = torch.from_numpy(rows["offset"]).unsqueeze(-1)
            scale = torch.from_numpy(rows["scale"]).unsqueeze(-1)
            values = QuantizedValues(raw, "int8", offset, scale).decode()
        else:
            values = raw.float()
        signals = TopKLogits(
            values,
            torch.from_numpy(rows["indices"].astype(np.int64)),
            torch.from_numpy(rows["logsumexp"]),
            torch.from_numpy(rows["tail"]),
            self.vocab_size,
        )
        features = {name: torch.from_numpy(rows[f"feature-{name}"]).float() for name in self.features}
        if device is not None:
            signals = signals.to(device)
            features = {name: value.to(device) for name, value in features.items()}
        return ModelOutputs(logits=signals, features=features)

    def split_logits(self, split: str) -> TopKLogits:
        """The cached signals of a whole split (for the teacher's metrics on val / test)."""
        n = self.manifest["splits"][split]["samples"]
        return self.lookup(torch.arange(n), split=split).logits

    def split_label_logprobs(self, split: str) -> Tensor | None:
        """The teacher's log-probability of each label of a held-out split, ``[samples, seq]``
        (0 where nothing counts), when the cache stores it (per-position caches do); None otherwise."""
        if not self.manifest.get("label_logprobs") or split == "train":
            return None
        index = np.arange(self.manifest["splits"][split]["samples"])
        return torch.from_numpy(self._gather_packed(split, index, ["label_logprob"])["label_logprob"])
