"""The one table of latent containers, and everything that picks a container: by --format name, by a file's
suffix, by a file's first bytes. Nothing outside this module compares container names or suffixes.

A new container is one module (its reader, writer, output check and normalization convention) and one row
of CONTAINERS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import safejson
from ..config import LatentSpec
from ..errors import ConfigError, InputError
from ..files import check_regular, open_regular
from ..outputs import OutputState, path_state
from ..sniff import image_kind
from . import comfyui, kohya, native, npy
from .base import LatentFile, ShapeCheck
from .safetensors_header import is_safetensors

if TYPE_CHECKING:
    import torch

Reader = Callable[[BinaryIO, "ShapeCheck | None"], LatentFile]
Writer = Callable[[Path, "torch.Tensor", Mapping[str, str]], None]
ItemWriter = Callable[[Path, "Path | None", Mapping[str, "torch.Tensor"], Mapping[str, Any], Mapping[str, str]], None]


def _user_alpha(alpha: str | None) -> str:
    return alpha or "white"


def _any_model(config: Any) -> None:
    return None


def _no_fields(bucket: tuple[int, int], original: tuple[int, int]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Container:
    """One latent container: how its files are recognized, read, judged as outputs and written, and the
    conventions of the tool that reads them (pixels, alpha, normalization, dtype, dataset features)."""

    name: str  # the --format value, LatentFile.container, a manifest record's "format"
    suffix: str  # what its file names end in
    kind: str  # what its files are, for messages ("a safetensors file")
    magic: Callable[[bytes], bool]  # a file's first bytes are of this kind
    read: Reader  # (open file, shape check) -> LatentFile; the check runs before tensor data is read
    stored_spec: Callable[[LatentFile, int, LatentSpec], LatentSpec | None]  # (file, channels, model's) -> its
    write: Writer | None = None  # (path, (C, h, w) latent, our metadata); None: read only
    state: Callable[[BinaryIO], tuple[bool, dict[str, str]]] | None = None  # whole output: (ours?, its metadata)
    store_spec: Callable[[LatentSpec], LatentSpec | None] = native.store_spec  # model's -> what it stores
    pixels: str = "vaecli"  # io.read_image's pixel convention for the images its latents are made from
    alpha_policy: Callable[[str | None], str] = _user_alpha  # --alpha (None: not given) -> the policy applied
    check_model: Callable[[Any], None] = _any_model  # ConfigError for a model family its readers never train
    any_dtype: bool = False  # stores any --latent-dtype (else float32, what its readers expect)
    note: str = ""  # said after an encode outside dataset mode
    # dataset mode
    write_item: ItemWriter | None = None  # (main, flipped file or None, tensors, record, our metadata)
    embedded_record: Callable[[Path], str] | None = None  # the manifest record a file embeds, as text
    dataset_tensor: Callable[[Path, str], torch.Tensor] | None = None  # (file, our tensor name) -> (C, h, w)
    flipped_path: Callable[[Path], Path] | None = None  # a flipped latent's own file; None: in the main file
    moments: bool = True  # holds the posterior's mean and logvar beside the latent
    shards: bool = False  # may be packed into tar or parquet shards
    next_to_images: bool = False  # may be written beside each image instead of under OUT
    # holds latents of frame-axis families (families.Family.frame_axis) as their tool makes them: (C, 1, h, w)
    frame_axis: bool = False
    bucket_defaults: tuple[int, int] | None = None  # (min, max) bucket side its trainer assumes
    record_fields: Callable[[tuple[int, int], tuple[int, int]], dict[str, Any]] = _no_fields  # (bucket, size)

    @property
    def exif(self) -> bool:
        """Images are read with their EXIF orientation applied (not under kohya's convention: as stored)."""
        return self.pixels == "vaecli"

    def settings(self) -> dict[str, str]:
        """What this container adds to the settings recorded with each output (a later run compares them)."""
        return {"pixels": self.pixels} if self.pixels != "vaecli" else {}

    def dtype_problem(self, latent_dtype: str) -> str | None:
        """Why --latent-dtype cannot be used with this container, or None."""
        if self.any_dtype or latent_dtype == "fp32":
            return None
        return f"--format {self.name} stores float32 latents (what its reader expects); drop --latent-dtype"


_KOHYA_NOTE = ("kohya format without --dataset: each latent has its image's own size; kohya uses a cache only at the "
               "size of its bucket (use --dataset for a training cache)")

# Order: --format choices and suffix lists are listed in this order. A suffix shared by two rows is the first's.
CONTAINERS: tuple[Container, ...] = (
    Container("vaecli", ".safetensors", "a safetensors file", is_safetensors, native.load_native, native.stored_spec,
              write=native.write_latent, state=native.native_state, any_dtype=True, write_item=native.write_item,
              embedded_record=native.embedded_record, dataset_tensor=native.dataset_tensor, shards=True),
    Container("kohya", ".npz", "an .npz (zip) archive", kohya.is_zip, kohya.read_kohya, kohya.stored_spec,
              write=kohya.write_plain, state=kohya.npz_state, store_spec=kohya.store_spec, pixels="kohya",
              alpha_policy=kohya.alpha_policy, check_model=kohya.check_model, note=_KOHYA_NOTE,
              write_item=kohya.write_item, embedded_record=kohya.embedded_record,
              dataset_tensor=kohya.dataset_tensor, next_to_images=True, bucket_defaults=kohya.BUCKET_DEFAULTS,
              record_fields=kohya.record_fields),
    Container("comfyui", ".latent", "a safetensors file", is_safetensors, comfyui.read_comfyui, comfyui.stored_spec,
              write=comfyui.write_comfyui, state=comfyui.comfyui_state, store_spec=comfyui.store_spec,
              write_item=comfyui.write_item, embedded_record=comfyui.embedded_record,
              dataset_tensor=comfyui.dataset_tensor, flipped_path=comfyui.flipped_path, moments=False,
              frame_axis=True),
    Container("bare", ".npy", "a .npy array", npy.is_npy, npy.load_npy, native.stored_spec),  # read only
)

FORMATS = tuple(c.name for c in CONTAINERS if c.write is not None)  # what --format accepts
CONTAINER_SUFFIX = {c.name: c.suffix for c in CONTAINERS if c.write is not None}
LATENT_SUFFIXES = tuple(c.suffix for c in CONTAINERS)  # what decode reads; also: an -o naming one latent file
_BY_NAME = {c.name: c for c in CONTAINERS}
_OURS = CONTAINERS[0]  # reads and judges a file whose suffix no writer claims, as vaecli always has


def by_name(name: str) -> Container:
    """The container of a --format value or a LatentFile's container name; ConfigError when unknown."""
    found = _BY_NAME.get(name)
    if found is None:
        raise ConfigError(_unknown_format(name))
    return found


def find_format(name: str) -> Container | None:
    """The container a --format value names (one that writes), or None: for checks that report an unknown
    name among other problems instead of raising."""
    found = _BY_NAME.get(name)
    return found if found is not None and found.write is not None else None


def by_format(name: str) -> Container:
    """The container a --format value names; ConfigError for an unknown name or a read-only container."""
    found = find_format(name)
    if found is None:
        raise ConfigError(_unknown_format(name))
    return found


def _unknown_format(name: str) -> str:
    return f"unknown format {name!r}; choose one of {', '.join(FORMATS)}"


def by_suffix(suffix: str) -> Container | None:
    """The container whose files end in `suffix` (any case), or None."""
    return next((c for c in CONTAINERS if c.suffix == suffix.lower()), None)


def alpha_for(fmt: str, alpha: str | None) -> str:
    """The alpha policy a format takes: its own (kohya drops alpha), else `alpha` (None: white)."""
    found = _BY_NAME.get(fmt)
    return (found.alpha_policy if found is not None else _user_alpha)(alpha)


def latent_kind(prefix: bytes) -> str | None:
    """The latent container a file's first bytes announce (safetensors, .npy, .npz), or None."""
    return next((c.kind for c in CONTAINERS if c.magic(prefix)), None)


def refuse_image(fh: BinaryIO) -> None:
    """`decode photo.jpg`: name the mistake instead of a parse error of the wrong format."""
    fh.seek(0)
    kind = image_kind(fh.read(16))
    fh.seek(0)
    if kind is not None:
        raise InputError(f"this is a {kind} image, not a latent file: encode images with `vaecli encode` "
                         f"(decode reads latent files: {', '.join(LATENT_SUFFIXES)})")


def read_latent(path: Path, check: ShapeCheck | None = None) -> LatentFile:
    """A latent file -> (C, h, w) float32 tensor and metadata.

    Accepted: our files ('latent' + metadata); bare safetensors with exactly one tensor; .npy arrays;
    ComfyUI .latent files ('latent_tensor'); kohya .npz caches ('latents'). Shapes (C, h, w) or
    (1, C, h, w); dtypes fp16, bf16, fp32, fp64. `check` sees the shape (e.g. against a pixel limit)
    before any tensor data is read.
    """
    suffix = path.suffix.lower()
    if by_suffix(suffix) is None:
        check_regular(path)
        with open_regular(path) as fh:
            refuse_image(fh)
        raise InputError(f"unsupported latent format {suffix!r} (use {', '.join(LATENT_SUFFIXES)})")
    with open_regular(path) as fh:
        return load_latent(fh, suffix, check)


def load_latent(fh: BinaryIO, suffix: str, check: ShapeCheck | None = None) -> LatentFile:
    """read_latent on an open file (e.g. one whose bytes were just hashed); an unknown suffix reads as ours."""
    refuse_image(fh)
    fh.seek(0)
    return (by_suffix(suffix) or _OURS).read(fh, check)


class _Shape(Exception):
    """Carries a latent's shape out of load_latent's check, before any tensor data is read."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape


def latent_shape(fh: BinaryIO, suffix: str) -> tuple[int, int, int]:
    """The (C, h, w) shape of a latent file from its header alone (the same parsing as load_latent)."""

    def stop(shape: tuple[int, int, int]) -> None:
        raise _Shape(shape)

    try:
        load_latent(fh, suffix, stop)
    except _Shape as found:
        return found.shape
    raise InputError("latent file without a shape")  # not reached: load_latent checks the shape first


def latent_output_state(path: Path) -> OutputState:
    """The state of a latent output: a whole file that vaecli wrote (its metadata as the record), or not.
    Dataset files are ours by their embedded record."""
    state = path_state(path)
    if state is not None:
        return state
    found = by_suffix(path.suffix)
    state_of = found.state if found is not None and found.state is not None else _OURS.state
    assert state_of is not None
    try:
        with open_regular(path) as fh:
            ours, meta = state_of(fh)
    except InputError as exc:
        return OutputState("incomplete", detail=str(exc))
    if not ours:
        return OutputState("foreign", detail="it is not a vaecli latent file")
    return OutputState("ours", dict(meta))


def latent_is_complete(path: Path) -> dict[str, str] | None:
    """The metadata of a whole vaecli latent file at `path`, or None (missing, partial, or foreign)."""
    state = latent_output_state(path)
    return state.record if state.status == "ours" else None


def stored_spec(lf: LatentFile, channels: int, model_spec: LatentSpec) -> LatentSpec | None:
    """The normalization a latent file's values carry, by its container's convention (ComfyUI's marker,
    kohya's raw caches, our metadata); a bare tensor carries none: InputError asking for --scaling-factor.
    `channels`: the file's; `model_spec`: the decoding model's normalization."""
    return by_name(lf.container).stored_spec(lf, channels, model_spec)


def read_record(path: Path, fmt: str) -> dict[str, Any] | None:
    """The manifest record a dataset file of format `fmt` embeds; None when missing, partial, or not ours."""
    read = by_name(fmt).embedded_record
    if read is None:
        return None
    try:
        check_regular(path)  # a FIFO or device there would block the readers
        rec = safejson.loads(read(path))
        return rec if isinstance(rec, dict) else None
    except Exception:  # noqa: BLE001 - any failure means "not a usable output": it is re-encoded
        return None
