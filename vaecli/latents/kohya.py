"""kohya-ss sd-scripts' .npz latent caches (library/strategy_base.py save_latents_to_disk /
_default_load_latents_from_disk), written and read back.

`latents` float32 (C, h, w) raw (kohya multiplies by the VAE scale factor in its training loop,
train_network.py), `original_size` int [W, H], `crop_ltrb` [l, t, r, b] (kohya's own meaning: kohya_crop_ltrb),
`latents_flipped` float32 (C, h, w) with flip augmentation. File name `<image stem>.npz`: current sd-scripts
(library/strategy_sd.py get_latents_npz_path) use this "old" name whenever it exists, before falling back to
`<stem>_<WWWW>x<HHHH>_sd.npz` / `_sdxl.npz`, and older releases know only this name, so one name serves both.
kohya ignores other arrays; ours carry our latent metadata (`vaecli_meta`) and, in dataset mode, the manifest
record (`vaecli_record`), both 0-d string arrays that np.load reads without pickle: they mark a file as
written by vaecli. kohya loads images its own way (Pillow's convert("RGB"): alpha dropped, EXIF ignored).
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .. import safejson
from ..config import LatentSpec
from ..errors import ConfigError, InputError
from ..files import atomic_write
from .base import RECORD_KEY, LatentFile, ShapeCheck, as_chw, record_json, says_normalized, stream_size, string_map
from .npy import read_npy

if TYPE_CHECKING:
    import torch

META_KEY = "vaecli_meta"  # our latent metadata, JSON in a 0-d string array
ZIP_MAGIC = b"PK\x03\x04"
BUCKET_DEFAULTS = (256, 1024)  # sd-scripts' DreamBoothDatasetParams min/max_bucket_reso defaults
_MAX_TEXT = 1 << 20  # our metadata arrays are a few KB
_MAX_MEMBERS = 64  # a kohya cache holds a handful of arrays


def is_zip(prefix: bytes) -> bool:
    """A file's first bytes are a zip archive's (an .npz)."""
    return prefix.startswith(ZIP_MAGIC)


# ------------------------------------------------------------------------------------------------ writing


def alpha_policy(alpha: str | None) -> str:
    """kohya's own: it converts with Pillow's convert("RGB"), which drops alpha. Compositing would store
    latents kohya never computes."""
    if alpha not in (None, "drop"):
        raise ConfigError(
            f"--format kohya drops alpha, as kohya sd-scripts does (Pillow's convert('RGB')); --alpha {alpha} "
            "would store latents that kohya never computes: leave --alpha out"
        )
    return "drop"


def check_model(config: Any) -> None:
    """sd-scripts trains no FLUX.2, Qwen-Image or tiny-VAE model, so such a cache would be silently unusable."""
    if getattr(config, "family", "kl") != "kl":
        raise ConfigError(f"--format kohya: sd-scripts does not train {config.class_name} models (its .npz caches "
                          "are SD/SDXL/SD3/FLUX.1 latents); use --format vaecli (self-describing) or comfyui")


def kohya_crop_ltrb(bucket: tuple[int, int], original: tuple[int, int]) -> tuple[float, ...]:
    """kohya's `crop_ltrb` value: where the whole image, fitted *inside* the bucket, would lie in bucket pixels.

    This is what kohya's own cache stores (BucketManager.get_crop_ltrb; its SDXL crop conditioning), not
    the crop window; it can hold floats. Same arithmetic as kohya, so its trainer sees identical values.
    """
    (bw, bh), (w, h) = bucket, original
    image_ar = w / h
    rw: float
    rh: float
    if bw / bh > image_ar:
        rw, rh = bh * image_ar, bh
    else:
        rw, rh = bw, bw / image_ar
    left, top = (bw - rw) // 2, (bh - rh) // 2
    return (left, top, left + rw, top + rh)


def record_fields(bucket: tuple[int, int], original: tuple[int, int]) -> dict[str, Any]:
    """What a dataset record adds for kohya: its crop value, stored in the cache."""
    return {"kohya_crop_ltrb": list(kohya_crop_ltrb(bucket, original))}


def write_kohya(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """A kohya .npz cache, atomically (arrays from kohya_arrays or kohya_plain_arrays)."""
    atomic_write(path, lambda tmp: save_npz(tmp, arrays))


def write_plain(path: Path, latent: torch.Tensor, meta: Mapping[str, str]) -> None:
    """A kohya .npz of one latent encoded outside dataset mode, with our metadata."""
    write_kohya(path, kohya_plain_arrays(latent, meta))


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


def write_item(main: Path, flipped: Path | None, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any],
               file_meta: Mapping[str, str]) -> None:
    """A dataset item: kohya's arrays (flipped latent included), the manifest record and our metadata."""
    arrays = kohya_arrays(tensors, record)
    arrays[RECORD_KEY] = np.array(record_json(record))  # 0-d unicode arrays: np.load reads them without pickle
    arrays[META_KEY] = text_array(file_meta)
    write_kohya(main, arrays)


def text_array(value: Mapping[str, Any]) -> np.ndarray:
    """A JSON object as a 0-d unicode array (np.load reads it without pickle)."""
    return np.array(json.dumps(value, sort_keys=True))


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez into an open file: given a name, np.savez would append .npz to our temp name."""
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub: a ** mapping could bind allow_pickle


# ------------------------------------------------------------------------------------------------ reading


def read_kohya(fh: BinaryIO, check: ShapeCheck | None) -> LatentFile:
    """A kohya .npz latent cache: `latents` (C, h, w) with `original_size` and `crop_ltrb`, checked; our
    metadata when vaecli wrote it. Array headers are read before their data: nothing large is read first."""
    import torch

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
        latents = _member(archive, "latents", check)
        _, h, w = latents.shape[-3:]
        original = _original_size(_member(archive, "original_size", kind="iu"))
        crop = _crop_ltrb(_member(archive, "crop_ltrb", kind="iuf"), (w * 8, h * 8))
        meta = _meta_text(_member(archive, META_KEY, kind="U")) if META_KEY in present else None
    return LatentFile(as_chw(torch.from_numpy(latents)), meta, "kohya", original_size=original, crop_ltrb=crop)


def _member(archive: zipfile.ZipFile, name: str, check: ShapeCheck | None = None, kind: str = "f") -> np.ndarray:
    """One array of the archive, its header checked first (latents: floats of a latent's shape)."""
    try:
        with archive.open(name + ".npy") as stream:
            return read_npy(stream, check, kind, limit=_MAX_TEXT if kind != "f" else None)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f".npz array {name!r} is unreadable ({exc}): cut short?") from None


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
    if not string_map(meta):
        raise InputError(f"the .npz array {META_KEY!r} is not vaecli latent metadata (a JSON object of strings)")
    return meta


def npz_state(fh: BinaryIO) -> tuple[bool, dict[str, str]]:
    """(written by vaecli, our metadata) of a whole .npz file; InputError when it is cut short or unreadable.

    Ours: it holds our metadata (`vaecli_meta`) or a dataset record (`vaecli_record`); any other .npz (one
    kohya wrote, a user's own) is not, and is never replaced without --overwrite.
    """
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


def store_spec(spec: LatentSpec) -> LatentSpec | None:
    """kohya caches hold raw VAE latents, whatever the model's normalization."""
    return None


def stored_spec(lf: LatentFile, channels: int, model_spec: LatentSpec) -> LatentSpec | None:
    """Raw, by kohya's convention; our metadata saying otherwise is a contradiction."""
    if says_normalized(lf.meta):
        raise InputError(f"inconsistent file: its metadata says normalized latents, but a {lf.container} file "
                         "holds raw ones")
    return None


def embedded_record(path: Path) -> str:
    """The manifest record a dataset file embeds, as text ("" when it has none or is no kohya cache)."""
    with np.load(path, allow_pickle=False) as npz:
        if RECORD_KEY not in npz.files or "latents" not in npz.files:
            return ""
        return str(npz[RECORD_KEY])


def dataset_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor `name` (our naming: latent, latent_flipped, mean, ...) of a dataset .npz, as float32 (C, h, w)."""
    import torch

    key = {"latent": "latents", "latent_flipped": "latents_flipped"}.get(name, name)
    with np.load(path, allow_pickle=False) as npz:
        return torch.from_numpy(np.array(npz[key], dtype=np.float32))
