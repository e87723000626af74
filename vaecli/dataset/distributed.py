"""Splitting work over processes: `--shard i/n` (Slurm arrays, any process pool) and torchrun.

Work units (images of a folder, or input shards) sorted by name are dealt round-robin: unit k goes to
shard k mod n, deterministic and balanced to within one. Under torchrun (WORLD_SIZE > 1) RANK and
WORLD_SIZE choose the shard, each process uses cuda:LOCAL_RANK when CUDA is present, and a gloo process
group provides the barriers around the final merge.
"""

from __future__ import annotations

import datetime
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ..discovery import Item
from ..errors import ConfigError
from ..models.kl import AutoencoderKL

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), checked: 0 <= i < n."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4 (shard i of n, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int, bool]:
    """(index, count, distributed): torchrun's RANK/WORLD_SIZE when set, else `shard`, else (0, 1)."""
    env = torchrun_env()
    if env is not None:
        rank, world, _ = env
        if shard is not None and tuple(shard) != (rank, world):
            raise ConfigError(
                f"--shard {shard[0]}/{shard[1]} contradicts torchrun's RANK={rank} WORLD_SIZE={world}; drop --shard"
            )
        return rank, world, True
    if shard is None:
        return 0, 1, False
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n, False


def bind_local_device() -> None:
    """Under torchrun with CUDA, make cuda:LOCAL_RANK this process's current device (one GPU per process).

    Call it before loading the model, so that loading on "cuda" lands on this process's own GPU.
    """
    env = torchrun_env()
    if env is not None and torch.cuda.is_available():
        torch.cuda.set_device(env[2])


def deal(units: Sequence[T], index: int, count: int, key: Callable[[T], Any]) -> list[T]:
    """Units sorted by `key`, every count-th from `index`: deterministic, balanced to within one."""
    return sorted(units, key=key)[index::count]


def shard_items(items: list[Item], index: int, count: int) -> list[Item]:
    """Items sorted by relative path, every count-th from `index`: deterministic, balanced to within one."""
    return deal(items, index, count, key=lambda it: (it.rel, str(it.input)))


def owner_shard(source: str, count: int) -> int:
    """Which shard reports a vanished source: stable per path, so exactly one shard lists it."""
    return zlib.crc32(source.encode("utf-8", "surrogateescape")) % count  # names need not be UTF-8


def init_distributed() -> bool:
    """Join torchrun's process group (gloo: only barriers are needed); True when this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    # Ranks finish their shards at different times; the default 30-minute timeout would fail a long run.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def finish_distributed(merge: Callable[[], None], created_group: bool, report: T) -> list[T] | None:
    """torchrun: wait for every rank's share, run `merge` (a no-op on all ranks but one), and return on
    every rank only after the merge: on rank 0 every rank's `report` (rank order), elsewhere None."""
    import torch.distributed as dist

    barrier()
    merge()
    barrier()
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(report, gathered, dst=0)  # so that one process can report the whole run
    if created_group:
        dist.destroy_process_group()
    return gathered


def barrier_after_error() -> None:
    """Meet the other ranks anyway after a failure, so they merge what exists instead of waiting."""
    try:
        barrier()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def to_local_device(vae: AutoencoderKL) -> AutoencoderKL:
    """Under torchrun with CUDA, one GPU per process: cuda:LOCAL_RANK."""
    env = torchrun_env()
    device = next(vae.parameters()).device
    if env is None or device.type != "cuda":
        return vae
    torch.cuda.set_device(env[2])
    return vae.to(f"cuda:{env[2]}")
