"""Every option shared by two or more commands, written once: its flag, help, help panel and default.

Options that always travel together form a group, a frozen dataclass whose fields are the options (each an
`Annotated` Typer option with its default). A command names a group as one keyword-only parameter
(`run: RunFlags`); `expand_groups` gives Typer the group's fields as parameters in that place and hands the
command the group filled in. Defaults come from choices.DEFAULTS, which the core shares.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..choices import DEFAULTS, Alpha, Device, DType, Family, Kernels, SizePolicy, Tiling
from ..errors import VaecliError

MODEL = "Model"
RUN = "Precision and memory"
OUTPUT = "Output"
DATASET = "Dataset preparation (--dataset)"
SHARDS = "Shards and engines (--dataset)"

MAX_BATCH = 4096  # images per model call: far above what fits in any device's memory at 64 px


def parse_batch_size(value: str | int) -> int:
    """--batch-size: a positive number, or auto (0 inside: sized from free memory per image size)."""
    if isinstance(value, int):  # the default
        return value
    if value.strip().lower() == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a positive integer nor 'auto'") from None
    if n < 1:
        raise typer.BadParameter("must be at least 1, or 'auto'")
    if n > MAX_BATCH:
        raise typer.BadParameter(f"{n} is more than {MAX_BATCH} images per model call; give at most {MAX_BATCH}, "
                                 "or 'auto'")
    return n


# -- single options (Annotated aliases), each defined once --------------------------------------------------
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="MODEL", help="Diffusers folder, single weights file or Hub id; default: the "
    "embedded model.", rich_help_panel=MODEL)]
FamilyOpt = Annotated[Family | None, typer.Option(
    "--family", help="Latent normalization for a single weights file without config (FLUX.2 files are "
    "recognised by their batch-norm statistics); with a tiny autoencoder, the latent space it decodes "
    "(files of another family are refused).", rich_help_panel=MODEL)]
SubfolderOpt = Annotated[str | None, typer.Option(
    "--subfolder", metavar="PATH", help="Model folder inside the --model folder or Hub repo (e.g. vae).",
    rich_help_panel=MODEL)]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="REV", help="Hub branch, tag or commit of --model.", rich_help_panel=MODEL)]
VariantOpt = Annotated[str | None, typer.Option(
    "--variant", metavar="NAME", help="Weights variant, e.g. fp16: diffusion_pytorch_model.fp16.safetensors.",
    rich_help_panel=MODEL)]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run the model.", rich_help_panel=MODEL)]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Compute precision.", rich_help_panel=RUN)]
UpcastOpt = Annotated[bool | None, typer.Option(
    "--upcast/--no-upcast", help="Run fp16 requests in fp32 (default: as the model's force_upcast says).",
    rich_help_panel=RUN)]
TilingOpt = Annotated[Tiling, typer.Option(
    "--tiling", help="Tiled encode/decode: auto (when memory requires), on, off.", rich_help_panel=RUN)]
TileSizeOpt = Annotated[int, typer.Option(
    "--tile-size", metavar="PIXELS", min=8, help="Tile side in image pixels.", rich_help_panel=RUN)]
TileOverlapOpt = Annotated[int, typer.Option(
    "--tile-overlap", metavar="PIXELS", min=0, help="Tile overlap in image pixels.", rich_help_panel=RUN)]
SlicingOpt = Annotated[int | None, typer.Option(
    "--slicing", metavar="N", min=1, help="Run each batch in slices of N images.", rich_help_panel=RUN)]
CompileOpt = Annotated[bool, typer.Option(
    "--compile/--no-compile", help="Run encode/decode as compiled programs (AOTInductor): one compile per input "
    "shape, cached under ~/.cache/vaecli/aoti, so later runs load it in about a second.", rich_help_panel=RUN)]
KernelsOpt = Annotated[Kernels, typer.Option(
    "--kernels", help="Triton kernels (fused GroupNorm+SiLU, upsample+conv): auto = where measured faster (CUDA "
    "GPUs; docs/performance.md), on = wherever they can run, off = diffusers' exact sequence of operations on "
    "every device (NCHW, native GroupNorm, nearest+conv, SDPA; no kernels and none of the CPU's fast forms): its "
    "outputs bit for bit (untiled).", rich_help_panel=RUN)]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", "-b", parser=parse_batch_size, metavar="N|auto", help="Images of one size per model call; "
    "auto: as many as fit in free memory (CUDA OOM still halves it).", rich_help_panel=RUN)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Recompute outputs that already exist.", rich_help_panel=OUTPUT)]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", metavar="N", min=0, help="Refuse larger images (0: no limit).", rich_help_panel=OUTPUT)]
AlphaOpt = Annotated[Alpha | None, typer.Option(
    "--alpha", help="Transparent pixels: composite over white or black, or drop alpha (--format kohya: always "
    "dropped, as kohya does).", show_default=DEFAULTS.alpha, rich_help_panel=OUTPUT)]
SizePolicyOpt = Annotated[SizePolicy, typer.Option(
    "--size-policy", help="Sides not divisible by 8: pad (undone exactly), crop (centre) or resize.",
    rich_help_panel=OUTPUT)]
SampleOpt = Annotated[bool, typer.Option("--sample", help="Sample the posterior instead of taking its mode.")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", metavar="N", help="Seed for --sample (implies it); noise depends on (seed, path).")]
InputsArg = Annotated[list[Path], typer.Argument(
    metavar="INPUT", help="Files or folders (searched recursively).", show_default=False)]


# -- groups: options that travel together ------------------------------------------------------------------
class FlagGroup:
    """Base of the option groups: a frozen dataclass of Annotated options, expanded by expand_groups."""


def flag_name(field: str) -> str:
    """The option a group's field is given with: --bucket-step for bucket_step."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class ModelFlags(FlagGroup):
    """Which model: --model, --family, --subfolder, --revision, --variant."""

    model: ModelOpt = None
    family: FamilyOpt = None
    subfolder: SubfolderOpt = None
    revision: RevisionOpt = None
    variant: VariantOpt = None

    def check(self) -> None:
        if self.model is None and (self.subfolder or self.revision or self.variant):
            raise VaecliError("--subfolder, --revision and --variant select files of a --model; give --model")


@dataclass(frozen=True)
class RunFlags(FlagGroup):
    """Where and how the model runs (RunOptions and the batch size) for encode, decode and roundtrip."""

    device: DeviceOpt = Device[DEFAULTS.device]
    dtype: DTypeOpt = DType[DEFAULTS.dtype]
    upcast: UpcastOpt = None
    tiling: TilingOpt = Tiling[DEFAULTS.tiling]
    tile_size: TileSizeOpt = DEFAULTS.tile_size
    tile_overlap: TileOverlapOpt = DEFAULTS.tile_overlap
    slicing: SlicingOpt = None
    compile_model: CompileOpt = False
    kernels: KernelsOpt = Kernels[DEFAULTS.kernels]
    batch_size: BatchOpt = DEFAULTS.batch_size


@dataclass(frozen=True)
class BenchFlags(FlagGroup):
    """bench's run settings: the same options as RunFlags (without --upcast, --slicing), bench's defaults."""

    device: DeviceOpt = Device[DEFAULTS.device]
    batch_size: BatchOpt = DEFAULTS.bench_batch_size
    dtype: DTypeOpt = DType[DEFAULTS.dtype]
    tiling: TilingOpt = Tiling[DEFAULTS.bench_tiling]
    tile_size: TileSizeOpt = DEFAULTS.tile_size
    tile_overlap: TileOverlapOpt = DEFAULTS.tile_overlap
    compile_model: CompileOpt = False
    kernels: KernelsOpt = Kernels[DEFAULTS.kernels]


@dataclass(frozen=True)
class SampleFlags(FlagGroup):
    """--sample and --seed (a seed implies sampling)."""

    sample: SampleOpt = False
    seed: SeedOpt = None

    @property
    def sampled(self) -> bool:
        return self.sample or self.seed is not None

    @property
    def noise_seed(self) -> int:
        return self.seed if self.seed is not None else DEFAULTS.seed


@dataclass(frozen=True)
class PixelFlags(FlagGroup):
    """How image pixels are shaped for the model: --size-policy, --alpha."""

    size_policy: SizePolicyOpt = SizePolicy[DEFAULTS.size_policy]
    alpha: AlphaOpt = None


@dataclass(frozen=True)
class WriteFlags(FlagGroup):
    """--max-pixels, --overwrite."""

    max_pixels: MaxPixelsOpt = DEFAULTS.max_pixels
    overwrite: OverwriteOpt = False


@dataclass(frozen=True)
class ReportFlags(FlagGroup):
    """How the run reports: --json, --quiet, --debug."""

    as_json: JsonOpt = False
    quiet: QuietOpt = False
    debug: DebugOpt = False


F = TypeVar("F", bound=Callable[..., Any])


def expand_groups(command: F) -> F:
    """`command` with each parameter typed by a group replaced, for Typer, by the group's options (in
    place, in field order); called with them, it receives the group built from their values."""
    hints = typing.get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for param in inspect.signature(command).parameters.values():
        kind = hints.get(param.name)
        if not (isinstance(kind, type) and issubclass(kind, FlagGroup)):
            params.append(param.replace(annotation=hints.get(param.name, param.annotation)))
            continue
        field_hints = typing.get_type_hints(kind, include_extras=True)
        fields = dataclasses.fields(kind)
        groups[param.name] = (kind, [f.name for f in fields])
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=field_hints[f.name]) for f in fields]

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        for name, (kind, names) in groups.items():
            kwargs[name] = kind(**{n: kwargs.pop(n) for n in names})
        return command(**kwargs)

    # Keyword-only: Typer passes every value by name, and defaulted and plain parameters may then interleave.
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run  # type: ignore[return-value]
