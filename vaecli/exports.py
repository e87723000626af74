"""Latent files in the layouts other tools read: kohya-ss sd-scripts .npz caches and ComfyUI .latent files,
written and read back (so `vaecli decode` takes them, ours and theirs).

Both hold *raw* VAE latents (no scaling_factor): kohya multiplies by the VAE scale factor in its training
loop (`latents * self.vae_scale_factor`, train_network.py), and ComfyUI's LATENT samples are raw (its
model applies the latent format's `process_in` when sampling).

kohya (library/strategy_base.py save_latents_to_disk / _default_load_latents_from_disk):
  `latents` float32 (C, h, w), `original_size` int [W, H], `crop_ltrb` [l, t, r, b] (kohya's own meaning,
  see dataset.kohya_crop_ltrb), `latents_flipped` float32 (C, h, w) with flip augmentation.
  File name `<image stem>.npz`: current sd-scripts (library/strategy_sd.py get_latents_npz_path) use this
  "old" name whenever it exists, before falling back to `<stem>_<WWWW>x<HHHH>_sd.npz` / `_sdxl.npz`, and
  older releases know only this name, so one name serves both. kohya ignores other arrays; ours carry our
  latent metadata (`vaecli_meta`) and, in dataset mode, the manifest record (`vaecli_record`), both 0-d
  string arrays that np.load reads without pickle: they mark a file as written by vaecli.
ComfyUI (nodes.py SaveLatent / LoadLatent, read at commit e60e19b175f93f2c8fac037063de9f13259be9d4):
  safetensors {`latent_tensor`: (B, C, h, w), `latent_format_version_0`: empty tensor}; without the
  marker LoadLatent multiplies by 1/0.18215 (files of the first format held SD-scaled latents). ComfyUI
  ignores safetensors metadata; ours carries our latent metadata there.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch

from . import safejson
from .errors import ConfigError, InputError
from .files import atomic_write
from .io import LATENT_FORMAT, read_npy, read_safetensors_header, read_tensor

KOHYA_KEYS = ("latents", "original_size", "crop_ltrb", "latents_flipped")
COMFYUI_TENSOR = "latent_tensor"
COMFYUI_MARKER = "latent_format_version_0"
COMFYUI_LEGACY_SCALE = 0.18215  # LoadLatent: a file without the marker holds latents * 0.18215
META_KEY = "vaecli_meta"  # .npz: our latent metadata, JSON in a 0-d string array
RECORD_KEY = "vaecli_record"  # .npz (dataset mode): the manifest record, JSON in a 0-d string array
_MAX_TEXT = 1 << 20  # our metadata arrays are a few KB
_MAX_MEMBERS = 64  # a kohya cache holds a handful of arrays

ShapeCheck = Callable[[tuple[int, int, int]], None]


CONTAINER_SUFFIX = {"vaecli": ".safetensors", "kohya": ".npz", "comfyui": ".latent"}


# ------------------------------------------------------------------------------------------------ writing


def alpha_for(fmt: str, alpha: str | None) -> str:
    """The alpha policy a format takes: kohya's own (it converts with Pillow's convert("RGB"), which drops
    alpha), else `alpha` (None: white). Compositing for kohya would store latents kohya never computes."""
    if fmt != "kohya":
        return alpha or "white"
    if alpha not in (None, "drop"):
        raise ConfigError(
            f"--format kohya drops alpha, as kohya sd-scripts does (Pillow's convert('RGB')); --alpha {alpha} "
            "would store latents that kohya never computes: leave --alpha out"
        )
    return "drop"


def kohya_crop_ltrb(bucket: tuple[int, int], original: tuple[int, int]) -> tuple[float, ...]:
    """kohya's `crop_ltrb` value: where the whole image, fitted *inside* the bucket, would lie in bucket pixels.

    This is what kohya's own cache stores (BucketManager.get_crop_ltrb; its SDXL crop conditioning), not
    the crop window; it can hold floats. Same arithmetic as kohya, so its trainer sees identical values.
    """
    (bw, bh), (w, h) = bucket, original
    image_ar = w / h
    if bw / bh > image_ar:
        rw, rh = bh * image_ar, bh
    else:
        rw, rh = bw, bw / image_ar
    left, top = (bw - rw) // 2, (bh - rh) // 2
    return (left, top, left + rw, top + rh)


def write_comfyui(path: Path, latent: torch.Tensor, meta: Mapping[str, str]) -> None:
    """A ComfyUI .latent file of one raw (C, h, w) latent, atomically, with our metadata (ComfyUI ignores it)."""
    from safetensors.torch import save_file

    data = comfyui_tensors(latent)
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=dict(meta)))


def write_kohya(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """A kohya .npz cache, atomically (arrays from kohya_arrays or kohya_plain_arrays)."""
    atomic_write(path, lambda tmp: save_npz(tmp, arrays))


def kohya_plain_arrays(latent: torch.Tensor, meta: Mapping[str, str]) -> dict[str, np.ndarray]:
    """A kohya .npz of one image encoded at its own size (no bucket): the encoded size stands for the bucket."""
    size = (int(meta["original_width"]), int(meta["original_height"]))
    encoded = (int(meta["encoded_width"]), int(meta["encoded_height"]))
    return {
        "latents": latent.float().cpu().numpy(),  # (C, h, w) raw
        "original_size": np.array(size),
        "crop_ltrb": np.array(kohya_crop_ltrb(encoded, size)),
        META_KEY: text_array(meta),
    }


def kohya_arrays(tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a kohya latent cache for one image (our moments ride along under their own names)."""
    arrays: dict[str, np.ndarray] = {
        "latents": tensors["latent"].float().cpu().numpy(),  # (C, h, w) raw
        "original_size": np.array(record["original_size"]),  # [W, H] before resizing
        "crop_ltrb": np.array(record["kohya_crop_ltrb"]),
    }
    if "latent_flipped" in tensors:
        arrays["latents_flipped"] = tensors["latent_flipped"].float().cpu().numpy()
    for name in ("mean", "logvar", "mean_flipped", "logvar_flipped"):
        if name in tensors:
            arrays[name] = tensors[name].float().cpu().numpy()  # ignored by kohya, read by LatentDataset
    return arrays


def text_array(value: Mapping[str, Any]) -> np.ndarray:
    """A JSON object as a 0-d unicode array (np.load reads it without pickle)."""
    return np.array(json.dumps(value, sort_keys=True))


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez into an open file: given a name, np.savez would append .npz to our temp name."""
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def comfyui_tensors(latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ComfyUI .latent file's tensors for one raw (C, h, w) latent."""
    return {
        COMFYUI_TENSOR: latent.float().cpu().unsqueeze(0).contiguous(),  # (C, h, w) -> (1, C, h, w)
        COMFYUI_MARKER: torch.tensor([]),  # present: LoadLatent takes the values as they are
    }


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Contained:
    """A latent read from a kohya or ComfyUI file: raw (C, h, w) float32, our metadata, and what the
    container itself says (ComfyUI's marker; kohya's original_size and crop_ltrb)."""

    tensor: torch.Tensor
    meta: dict[str, str] | None  # our latent metadata, when vaecli wrote the file
    marker: bool = True  # ComfyUI: latent_format_version_0 present (raw values)
    original_size: tuple[int, int] | None = None  # kohya: [W, H]
    crop_ltrb: tuple[float, float, float, float] | None = None  # kohya


def read_comfyui(fh: BinaryIO, check: ShapeCheck | None) -> Contained:
    """A ComfyUI .latent file: `latent_tensor` of one latent (1, C, h, w), the version marker, our metadata."""
    entries, meta = read_safetensors_header(fh)
    if COMFYUI_TENSOR not in entries:
        raise InputError(f"not a ComfyUI latent file: no '{COMFYUI_TENSOR}' tensor (found: {sorted(entries)[:5]})")
    shape = entries[COMFYUI_TENSOR].shape
    if len(shape) == 4 and shape[0] > 1:
        raise InputError(f"holds a batch of {shape[0]} latents; vaecli decodes files of one latent (1, C, h, w)")
    tensor = read_tensor(fh, entries[COMFYUI_TENSOR], COMFYUI_TENSOR, check)
    ours = dict(meta) if meta.get("format") == LATENT_FORMAT else None
    return Contained(tensor, ours, marker=COMFYUI_MARKER in entries)


def read_kohya(fh: BinaryIO, check: ShapeCheck | None) -> Contained:
    """A kohya .npz latent cache: `latents` (C, h, w) with `original_size` and `crop_ltrb`, checked; our
    metadata when vaecli wrote it. Array headers are read before their data: nothing large is read first."""
    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"not a readable .npz file ({exc})") from None
    with archive:
        names = archive.namelist()
        if len(names) > _MAX_MEMBERS:
            raise InputError(f".npz file holds {len(names)} arrays; a kohya latent cache holds a handful")
        present = {n[: -len(".npy")] for n in names if n.endswith(".npy")}
        missing = [k for k in ("latents", "original_size", "crop_ltrb") if k not in present]
        if missing:
            raise InputError(f"not a kohya latent cache: it lacks {', '.join(missing)} (found: {sorted(present)[:6]})")

        def member(name: str, check_shape: ShapeCheck | None = None, kind: str = "f") -> np.ndarray:
            try:
                with archive.open(name + ".npy") as stream:
                    return read_npy(stream, check_shape, kind, limit=_MAX_TEXT if kind != "f" else None)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InputError(f".npz array {name!r} is unreadable ({exc}): cut short?") from None

        latents = member("latents", check)
        _, h, w = latents.shape[-3:]
        original = _original_size(member("original_size", kind="iu"))
        crop = _crop_ltrb(member("crop_ltrb", kind="iuf"), (w * 8, h * 8))
        meta = _meta_text(member(META_KEY, kind="U")) if META_KEY in present else None
    return Contained(torch.from_numpy(latents), meta, original_size=original, crop_ltrb=crop)


def _original_size(a: np.ndarray) -> tuple[int, int]:
    values = a.reshape(-1).tolist()
    if len(values) != 2 or not all(isinstance(v, int) and 0 < v < 1 << 31 for v in values):
        raise InputError(f"kohya original_size must be two positive whole numbers [W, H], not {values[:4]}")
    return values[0], values[1]


def _crop_ltrb(a: np.ndarray, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's crop_ltrb: where the image, fitted inside the bucket, lies in bucket pixels; within the bucket."""
    values = [float(v) for v in a.reshape(-1).tolist()]
    bw, bh = bucket
    slack = 1e-3  # kohya computes it in floating point
    ok = len(values) == 4 and all(math.isfinite(v) for v in values)
    if ok:
        left, top, right, bottom = values
        ok = -slack <= left <= right <= bw + slack and -slack <= top <= bottom <= bh + slack
    if not ok:
        raise InputError(f"kohya crop_ltrb {values[:6]} does not lie within the latent's {bw}x{bh} pixels")
    return values[0], values[1], values[2], values[3]


def _meta_text(a: np.ndarray) -> dict[str, str]:
    try:
        meta = safejson.loads(str(a.reshape(-1)[0]) if a.size == 1 else "")
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(f"the .npz array {META_KEY!r} is not vaecli latent metadata (a JSON object of strings)")
    return meta


def npz_state(fh: BinaryIO) -> tuple[bool, dict[str, str]]:
    """(written by vaecli, our metadata) of a whole .npz file; InputError when it is cut short or unreadable.

    Ours: it holds our metadata (`vaecli_meta`) or a dataset record (`vaecli_record`); any other .npz (one
    kohya wrote, a user's own) is not, and is never replaced without --overwrite.
    """
    from .io import stream_size

    size = stream_size(fh)
    try:
        with zipfile.ZipFile(fh) as archive:
            infos = archive.infolist()
            if len(infos) > _MAX_MEMBERS:
                return False, {}
            if any(i.header_offset + i.compress_size > size for i in infos):
                raise InputError("an .npz member ends beyond the file (cut short?)")
            names = {i.filename for i in infos}
            meta: dict[str, str] = {}
            if META_KEY + ".npy" in names:
                with archive.open(META_KEY + ".npy") as stream:
                    meta = _meta_text(read_npy(stream, None, "U", limit=_MAX_TEXT))
            ours = bool(meta) or RECORD_KEY + ".npy" in names
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"not a whole .npz file ({exc})") from None
    return ours, meta
