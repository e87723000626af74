"""Training-side reading of a prepared dataset: `LatentDataset` over manifest.jsonl and a bucket-aware sampler,
and `LatentShards`, which streams tar or parquet latent shards.

    ds = LatentDataset("latents/", flip="random")
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds, batch_size=16, seed=0))

    shards = LatentShards("latents/", batch_size=16, shuffle_buffer=2000, seed=0)
    loader = DataLoader(shards, batch_size=None, num_workers=4)

Every batch holds items of one bucket, so latents stack without padding.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from . import safejson
from .config import LatentSpec
from .dataset import LOGVAR_RANGE, MANIFEST, read_manifest
from .errors import InputError
from .latents import CONTAINERS, by_name

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
        for rec in self.records:
            _check_modes(flip, sample, rec, str(self.manifest))

    def __len__(self) -> int:
        return len(self.records)

    def buckets(self) -> list[tuple[int, int]]:
        """Each item's bucket (width, height), in item order."""
        return [(int(r["bucket"][0]), int(r["bucket"][1])) for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        item = _item(rec, lambda field, name: self._tensor(rec, field, name), self.flip, self.sample)
        return {**item, "index": index}

    def _tensor(self, rec: dict[str, Any], field: str, name: str) -> torch.Tensor:
        """Tensor `name` (our naming) of the file that manifest field `field` points to, as float32 (C, h, w)."""
        read = by_name(rec.get("format", CONTAINERS[0].name)).dataset_tensor  # records before "format": ours
        if read is None:
            raise InputError(f"{self.manifest}: format {rec['format']!r} holds no dataset latents")
        return read(self.root / rec[field], name)


def _item(
    rec: dict[str, Any], get: Callable[[str, str], torch.Tensor], flip: bool | str, sample: bool
) -> dict[str, Any]:
    """One item from a record; get(manifest field, tensor name) reads a stored tensor as float32 (C, h, w)."""
    flipped = bool(flip is True or (flip == "random" and torch.rand(()) < 0.5))
    suffix = "_flipped" if flipped else ""
    if sample:
        mean = get("moments", "mean" + suffix)
        logvar = get("moments", "logvar" + suffix).clamp(*LOGVAR_RANGE)
        latent = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        if rec.get("normalized"):
            latent = LatentSpec.from_dict(rec["latent_spec"]).normalize(latent)
    else:
        latent = get("latent_flipped" if flipped else "latent", "latent" + suffix)
    return {
        "latent": latent,
        "flipped": flipped,
        "original_size": torch.tensor(rec["original_size"], dtype=torch.int64),
        "crop": torch.tensor(rec["crop"], dtype=torch.int64),
        "bucket": torch.tensor(rec["bucket"], dtype=torch.int64),
        "source": rec["source"],
    }


def _check_modes(flip: bool | str, sample: bool, rec: dict[str, Any], where: str) -> None:
    if flip and rec.get("latent_flipped") is None:
        raise InputError(f"{where}: flip={flip!r} needs latents prepared with --flip")
    if sample and rec.get("moments") is None:
        raise InputError(f"{where}: sample=True needs latents prepared with --moments")


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



class LatentShards(IterableDataset):
    """Stream items, or batches of one bucket, from the tar or parquet latent shards of `vaecli encode --dataset`.

    source: the OUT folder (its index.json, else the *.tar / *.parquet in it), or shard paths / URLs
        (brace lists and globs as for encode; URLs need the `shards` extra).
    batch_size: None yields items (as LatentDataset's, with `key` and `sides`: the passed-through side
        files or columns); n yields dicts of n items sharing a bucket (latent (n, C, h, w), original_size,
        crop, bucket stacked; flipped a bool tensor; source, key, sides lists): use DataLoader(batch_size=None).
    shuffle_buffer: items held to draw from at random (0: stream order); shard order is shuffled too.
    seed, set_epoch(e): every random choice follows (seed, epoch, rank, worker).
    rank, world_size: data-parallel position (default: torch.distributed when initialized, else RANK and
        WORLD_SIZE, else 0 and 1). Shards are dealt to the (rank, DataLoader worker) pairs; with fewer
        shards than pairs every pair reads all shards and keeps every k-th sample instead.
    drop_last: drop the partial batch each bucket holds at the end.
    flip, sample: as LatentDataset.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        batch_size: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        flip: bool | str = False,
        sample: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, not {flip!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be at least 1 (or None for single items)")
        self.shards = _shard_urls(source)
        if not self.shards:
            raise InputError(f"{source}: no latent shards (.tar or .parquet) found")
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.flip, self.sample, self.drop_last = flip, sample, drop_last
        self.rank, self.world_size = _data_parallel(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = self._shuffled(self._my_samples())
        if self.batch_size is None:
            yield from items
            return
        yield from _bucket_batches(items, self.batch_size, self.drop_last)

    def _my_samples(self) -> Iterator[dict[str, Any]]:
        """This (rank, worker)'s items: its shards, or every k-th sample when shards are fewer than pairs."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        pairs, me = self.world_size * workers, self.rank * workers + worker
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # the same order on every rank and worker
        if len(order) >= pairs:
            for url in order[me::pairs]:
                yield from self._read(url)
            return
        n = 0
        for url in order:
            for item in self._read(url):
                if n % pairs == me:
                    yield item
                n += 1

    def _shuffled(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from items
            return
        info = get_worker_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{info.id if info else 0}")
        buffer: list[dict[str, Any]] = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = item
        rng.shuffle(buffer)
        yield from buffer

    def _read(self, url: str) -> Iterator[dict[str, Any]]:
        """The items of one latent shard, in stored order."""
        from .dataset.locations import open_input
        from .dataset.sample import read_latent_bytes

        with open_input(url) as stream:
            for key, data, sides in _latent_rows(url, stream):
                tensors, rec = read_latent_bytes(data)
                _check_modes(self.flip, self.sample, rec, url)
                item = _item(rec, lambda field, name, t=tensors: t[name].float(), self.flip, self.sample)
                yield {**item, "key": key, "sides": sides}


def _latent_rows(url: str, stream: Any) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, latent file bytes, side data) of each sample of a tar or parquet latent shard."""
    if url.endswith(".parquet"):
        from .dataset.parquet import ParquetSource

        for s in ParquetSource(stream, "latent").samples():
            sides = {k: v for k, v in s.sides.items() if k not in ("source", "record", "bucket_width", "bucket_height")}
            yield s.key, s.data or b"", sides
        return
    from .dataset.webdataset import read_tar

    for s in read_tar(stream, "safetensors"):
        if s.data is not None:
            yield s.key, s.data, s.sides


def _bucket_batches(items: Iterator[dict[str, Any]], size: int, drop_last: bool) -> Iterator[dict[str, Any]]:
    """Collated batches of `size` items of one bucket, each yielded as soon as its bucket fills."""
    waiting: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        group = waiting.setdefault(tuple(item["bucket"].tolist()), [])
        group.append(item)
        if len(group) == size:
            yield _collate(group)
            group.clear()
    if not drop_last:
        for group in waiting.values():
            if group:
                yield _collate(group)


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    stacked = ("latent", "original_size", "crop", "bucket")
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in stacked}
    batch["flipped"] = torch.tensor([it["flipped"] for it in items])
    for k in ("source", "key", "sides"):
        batch[k] = [it[k] for it in items]
    return batch


def _shard_urls(source: str | Path | Sequence[str | Path]) -> list[str]:
    """Latent shard URLs of an OUT folder (from index.json, else by suffix), or of shard paths / patterns."""
    from .dataset.locations import expand_shards

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        root = Path(source)
        try:
            index = safejson.loads((root / "index.json").read_text())
            return [str(root / entry["shard"]) for entry in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            return sorted(str(p) for p in [*root.glob("*.tar"), *root.glob("*.parquet")])
    texts = [str(source)] if isinstance(source, (str, Path)) else [str(s) for s in source]
    return [s.url for s in expand_shards(texts)]


def _data_parallel(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
