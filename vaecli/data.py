"""Training-side reading of a prepared dataset: `LatentDataset` over manifest.jsonl and a bucket-aware sampler.

    ds = LatentDataset("latents/", flip="random")
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds, batch_size=16, seed=0))

Every batch holds items of one bucket, so latents stack without padding.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import LatentSpec
from .dataset import LOGVAR_RANGE, MANIFEST, read_manifest
from .errors import InputError
from .exports import COMFYUI_TENSOR

FLIP_MODES = (False, True, "random")


class LatentDataset(Dataset):
    """Items of a prepared latent dataset, read from its manifest.

    root: the output folder of `vaecli encode --dataset` or a manifest .jsonl file in it (latent paths in
        the manifest are relative to the folder holding the manifest).
    flip: False: the latent of the image as it is; True: always the flipped one; "random": either, with
        probability 1/2 (torch's global generator, which DataLoader seeds per worker). Needs --flip.
    sample: draw z = mean + std * noise from the stored posterior instead of the stored latent, in the same
        normalization as the stored latent. Needs --moments.
    Each item is a dict: latent (C, h, w) float32, flipped (bool), original_size [W, H], crop
    [l, t, r, b] in resized pixels, bucket [W, H] (int64 tensors), source (str), index (int).
    """

    def __init__(self, root: str | Path, flip: bool | str = False, sample: bool = False) -> None:
        path = Path(root)
        self.manifest = path / MANIFEST if path.is_dir() else path
        self.root = self.manifest.parent
        if not self.manifest.is_file():
            raise InputError(
                f"{self.manifest}: no manifest (run `vaecli encode --dataset`, or merge the shard manifests)"
            )
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, not {flip!r}")
        self.records = read_manifest(self.manifest)
        self.flip = flip
        self.sample = sample
        if flip and any(r.get("latent_flipped") is None for r in self.records):
            raise InputError(f"{self.manifest}: flip={flip!r} needs latents prepared with --flip")
        if sample and any(r.get("moments") is None for r in self.records):
            raise InputError(f"{self.manifest}: sample=True needs latents prepared with --moments")

    def __len__(self) -> int:
        return len(self.records)

    def buckets(self) -> list[tuple[int, int]]:
        """Each item's bucket (width, height), in item order."""
        return [(int(r["bucket"][0]), int(r["bucket"][1])) for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        flipped = bool(self.flip is True or (self.flip == "random" and torch.rand(()) < 0.5))
        suffix = "_flipped" if flipped else ""
        if self.sample:
            mean = self._tensor(rec, "moments", "mean" + suffix)
            logvar = self._tensor(rec, "moments", "logvar" + suffix).clamp(*LOGVAR_RANGE)
            latent = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            if rec.get("normalized"):
                latent = LatentSpec.from_dict(rec["latent_spec"]).normalize(latent)
        else:
            latent = self._tensor(rec, "latent_flipped" if flipped else "latent", "latent" + suffix)
        return {
            "latent": latent,
            "flipped": flipped,
            "original_size": torch.tensor(rec["original_size"], dtype=torch.int64),
            "crop": torch.tensor(rec["crop"], dtype=torch.int64),
            "bucket": torch.tensor(rec["bucket"], dtype=torch.int64),
            "source": rec["source"],
            "index": index,
        }

    def _tensor(self, rec: dict[str, Any], field: str, name: str) -> torch.Tensor:
        """Tensor `name` (our naming) of the file that manifest field `field` points to, as float32 (C, h, w)."""
        path = self.root / rec[field]
        fmt = rec.get("format", "vaecli")
        if fmt == "kohya":
            key = {"latent": "latents", "latent_flipped": "latents_flipped"}.get(name, name)
            with np.load(path, allow_pickle=False) as npz:
                return torch.from_numpy(np.array(npz[key], dtype=np.float32))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if fmt == "comfyui":
                return f.get_tensor(COMFYUI_TENSOR)[0].float()  # (1, C, h, w) -> (C, h, w)
            return f.get_tensor(name).float()


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share one bucket; reshuffled per epoch from (seed, epoch).

    shuffle: shuffle items within buckets and the order of batches. drop_last: drop each bucket's short
    last batch. num_replicas/rank: deal the batches round-robin to data-parallel ranks (every rank gets
    the same number of batches; extra batches are dropped).
    """

    def __init__(
        self,
        dataset: LatentDataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, bucket in enumerate(dataset.buckets()):
            self.groups.setdefault(bucket, []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches: list[list[int]] = []
        for bucket in sorted(self.groups):
            idx = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                part = idx[start : start + self.batch_size]
                if len(part) == self.batch_size or not self.drop_last:
                    batches.append(part)
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[:usable][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        total = 0
        for idx in self.groups.values():
            total += len(idx) // self.batch_size if self.drop_last else math.ceil(len(idx) / self.batch_size)
        return total // self.num_replicas

