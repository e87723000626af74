"""`run_job`: what every command does around its Job (timer, checks, discovery, the output folder checked,
Runner, batch sizes, engine, the report), and the steps the command Jobs share (staging, noise, retries)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import torch

from ..discovery import Item, OutputNames, check_output_root, discover, output_is_file
from ..errors import InputError
from ..files import clean_temp_files
from ..io import IMAGE_OUTPUT_SUFFIXES
from ..latents import LATENT_SUFFIXES
from ..memory import auto_batch_size
from ..models.kl import AutoencoderKL
from ..pipeline import BatchResult, Runner, RunOptions
from ..plans import run_choices
from .engine import Engine, Job, Loaded
from .model import model_notes, model_summary
from .report import Progress, Report


@dataclass(frozen=True)
class Discovery:
    """Which inputs a command takes and how its outputs are named (see discovery.discover)."""

    suffixes: Sequence[str]  # input file suffixes searched for in folders
    names: OutputNames
    siblings: Callable[[Path], Sequence[Path]] | None = None  # other outputs written beside each one
    flat: bool = False  # every output at the top of the output folder


@dataclass
class RunContext:
    """What run_job has set up when it makes the Job: the model, its Runner, the engine over the items, the
    model's summary (its weights' and identity's hashes), and the run's notes (a Job may add its own)."""

    vae: AutoencoderKL
    runner: Runner
    engine: Engine
    info: dict[str, Any]
    notes: list[str]


class CommandOptions(Protocol):
    """The fields run_job reads from every command's options."""

    @property
    def batch_size(self) -> int: ...  # 0: auto

    @property
    def workers(self) -> int: ...  # reader threads, 0: as io_threads says


OptionsT = TypeVar("OptionsT", bound=CommandOptions, contravariant=True)


class JobKind(Protocol[OptionsT]):
    """A command's Job class: its name in the report, what its checks allow, and the Job of one run."""

    command: str
    latent_keys: bool  # batch keys are latent shapes (C, h, w), not image sizes (H, W)

    def check(self, vae: AutoencoderKL, options: OptionsT) -> Discovery: ...  # ConfigError before anything is read

    def __call__(self, ctx: RunContext, options: OptionsT) -> Job: ...


def run_job(
    kind: JobKind[OptionsT], vae: AutoencoderKL, inputs: Sequence[str | Path], out: Path | None, options: OptionsT,
    run: RunOptions, progress: Progress | None,
) -> Report:
    """Run one command: check its options, discover its items, then its Job over them on the engine."""
    start = time.perf_counter()
    found = kind.check(vae, options)
    items, notes, removed = prepare_run(inputs, found.suffixes, out, found.names, found.siblings, found.flat)
    runner = Runner(vae, run)
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=kind.latent_keys)
    engine = Engine(items, size, options.workers, progress, batch_for, runner.device)
    ctx = RunContext(vae, runner, engine, model_summary(vae), notes)
    engine.run(kind(ctx, options))
    return Report(
        kind.command,
        engine.results,
        model=ctx.info,
        events=engine.events,
        elapsed_s=time.perf_counter() - start,
        computed=engine.computed,
        tiles=engine.tiles,
        temp_files_removed=removed,
        notes=model_notes(vae) + runner.notes + notes,
        device_busy_s=runner.busy_s,
    )


def prepare_run(inputs: Sequence[str | Path], suffixes: Sequence[str], out: Path | None, names: OutputNames,
                siblings: Callable[[Path], Sequence[Path]] | None = None,
                flat: bool = False) -> tuple[list[Item], list[str], int]:
    """(items, run notes, temp files removed): discovery, the output folder checked, dead temp files cleaned.

    `out` is the output folder, or the output file of a single input when it ends in one of `names`' suffixes;
    flat: every output at the top of the folder (see discover)."""
    notes: list[str] = []
    items = discover(inputs, suffixes, out, names, siblings, notes, flat=flat)
    if out is None or not items:  # nothing to do: nothing is created (the CLI says "no inputs found")
        return items, notes, 0
    single = output_is_file(inputs, out, names)
    root = out.parent if single else out
    check_output_root(items, root)
    return items, notes, len(clean_temp_files(root, recursive=not single))


def latent_names(suffix: str) -> OutputNames:
    """Latent outputs: `-o x<suffix>` with one input names that file; another latent suffix is refused."""
    return OutputNames(suffix, LATENT_SUFFIXES)


def image_names(fmt: str) -> OutputNames:
    """Image outputs of format png, jpg or webp: `-o x.png` with one input names that file."""
    return OutputNames("." + fmt, IMAGE_OUTPUT_SUFFIXES)


def batch_sizer(
    batch_size: int, vae: AutoencoderKL, run: RunOptions, latent_keys: bool
) -> tuple[int, Callable[[Hashable], int] | None]:
    """(engine batch size, per-key sizer): batch_size 0 means auto, sized from free memory per image size.

    Keys are item shapes: (H, W, C) pixels, or (C, h, w) latents when latent_keys.
    """
    if batch_size > 0:
        return batch_size, None
    device = next(vae.parameters()).device
    dtype = run.compute_dtype(vae.config)
    f = vae.config.downsample_factor
    patch = vae.config.latent_spec.patch_size
    patched = vae.config.latent_channels * patch * patch if patch > 1 else None  # channels of patchified latents
    cache: dict[Hashable, int] = {}

    def size(key: Hashable) -> int:
        if key not in cache:
            shape: tuple[int, ...] = tuple(key)  # type: ignore[arg-type]
            cell = f * patch if shape[0] == patched else f
            h, w = (shape[-2] * cell, shape[-1] * cell) if latent_keys else (shape[0], shape[1])
            cache[key] = auto_batch_size(vae.config, h, w, dtype, device)
        return cache[key]

    return run_choices(device).batch_limit.most, size


def note_batch(engine: Engine, batch: list[Loaded[Any]], result: BatchResult, stage: str) -> list[Any]:
    """Record retries and events of one model call; failed rows become exceptions."""
    for retry in result.retries:
        engine.results[batch[retry.index].index].retries.append(
            {"stage": stage, "from_dtype": retry.from_dtype, "to_dtype": retry.to_dtype}
        )
    engine.events.extend(f"{stage}: {e}" for e in result.events)
    engine.tiles += getattr(result, "tiles", 0)
    return [InputError(result.failed[i]) if i in result.failed else None for i in range(len(batch))]


def posterior_noise(seed: int, rel: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise that depends only on (seed, relative path): independent of batching."""
    digest = hashlib.sha256(f"{seed}\0{rel}".encode("utf-8", "surrogateescape")).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


def stage_images(
    runner: Runner, batch: list[Loaded[Any]], size: tuple[int, int], sample: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images on the device, (N, 3, H, W) padded to the batch's `size`; posterior noise when sampling)."""
    x = runner.transfers.images([cast(np.ndarray, b.x) for b in batch], size)  # host pixels of the batch
    if not sample:
        return x, None
    f = runner.config.downsample_factor
    shape = (runner.config.latent_channels, size[0] // f, size[1] // f)
    return x, torch.stack([posterior_noise(seed, b.item.rel, shape) for b in batch])


def images_nhwc(images: torch.Tensor) -> np.ndarray:
    """Decoded images as (N, H, W, 3) arrays: uint8 ones come so from the Runner, floats are (N, 3, H, W)."""
    return images.numpy() if images.dtype == torch.uint8 else images.permute(0, 2, 3, 1).numpy()
