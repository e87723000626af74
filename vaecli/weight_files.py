"""Weight files on disk: where a source's weights are (folders, files, Hub ids), reading them safely, and the
identity of a set of weights. No key layouts and no models here (kl_weights.py, tiny_weights.py,
qwen_weights.py know those)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch

from .errors import ConfigError, WeightsError
from .family_keys import VAE_PREFIXES
from .files import file_kind

DEFAULT_MODEL = "vaecli-default"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Folder weight names diffusers writes, in the order we prefer them (safetensors first, full precision first).
FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file; safetensors directly, pickle formats only through weights_only loading."""
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many types here; all mean "cannot load safely"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path}: cannot be loaded safely with torch.load(weights_only=True) ({first}); "
                "convert it to .safetensors"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]  # Lightning checkpoints nest the weights
        if not isinstance(data, dict):
            raise WeightsError(f"{path}: holds a {type(data).__name__}, not a state dict")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    raise WeightsError(f"{path}: unsupported weights format {suffix!r} (use .safetensors, .ckpt, .pt, .pth or .bin)")


def under_vae_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The tensors a whole-pipeline file keeps under its VAE prefix (`first_stage_model.`, `vae.`), the prefix
    stripped; None when no key carries one."""
    for prefix in VAE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return None


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor in key order: the identity of a set of weights."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: num_batches_tracked
    return h.hexdigest()


def default_model_dir() -> Path:
    """The folder of the model embedded in the package (load_vae's default)."""
    return Path(str(resources.files("vaecli") / "default_model"))


def locate(
    source: str | Path, subfolder: str | None = None, variant: str | None = None, revision: str | None = None
) -> tuple[Path, Path | None]:
    """The weights file to read for `source`, and the config.json beside it when there is one.

    subfolder and variant select a model folder and its weights (`diffusion_pytorch_model.<variant>.*`) in a
    local folder or Hub repo; revision applies to Hub repos.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _in_folder(path, subfolder, variant)
    if regular_file(path):
        if subfolder or variant:
            raise ConfigError(f"{source} is a single file: subfolder and variant apply to folders and Hub repos")
        return path, None
    from . import hub

    src = hub.parse(str(source), subfolder, revision, variant)
    if src is None:
        raise WeightsError(f"{source}: no such file or folder")
    try:
        fetched = hub.fetch(src)
    except WeightsError as exc:
        raise WeightsError(f"{source}: no such local file or folder, and as a Hub id: {exc}") from None
    if fetched.is_dir():
        return _in_folder(fetched, None, variant)
    return fetched, None


def regular_file(path: Path) -> bool:
    """Whether a regular file is at `path` (symlinks followed); a FIFO, socket or device there is refused by
    name, never opened (reading a FIFO blocks forever), never skipped as if absent."""
    if not os.path.lexists(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        raise WeightsError(f"{path} is {file_kind(mode)}, not a regular file: it is never read")
    return True


def _in_folder(path: Path, subfolder: str | None, variant: str | None) -> tuple[Path, Path | None]:
    if subfolder:
        folder = path / subfolder
        if not folder.is_dir():
            raise WeightsError(f"{path}: no subfolder {subfolder!r}")
    else:  # a model folder, or a pipeline folder whose VAE is in vae/
        folder = path / "vae" if not regular_file(path / "config.json") and (path / "vae").is_dir() else path
    from .hub import weights_names

    names = weights_names(variant) if variant else FOLDER_WEIGHTS
    for name in names:
        if regular_file(folder / name):
            cfg = folder / "config.json"
            return folder / name, cfg if regular_file(cfg) else None
    where = "" if subfolder or folder != path else ", in the folder or its vae/ subfolder"
    raise WeightsError(f"{folder}: no diffusers weights found (expected {' or '.join(names)}{where})")


def config_class(folder: Path) -> str | None:
    """The _class_name of folder/config.json; None when there is none or it cannot be read (the regular path
    then reports the unreadable config)."""
    config = folder / "config.json"
    if not regular_file(config):
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file (header only); [] for other or unreadable files."""
    if path.suffix.lower() != ".safetensors":
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable: the regular path names the problem
        return []
