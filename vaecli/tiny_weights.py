"""Tiny autoencoder weights: a diffusers folder, or madebyollin/taesd's original encoder/decoder files.

Layouts:
- "diffusers": `encoder.layers.N...` / `decoder.layers.N...` (a diffusers AutoencoderTiny folder with
  config.json, or a single file such as TAEF2's taef2.safetensors).
- "taesd": the original pair `<name>_encoder.{safetensors,pth}` + `<name>_decoder.{...}` (ComfyUI's
  models/vae_approx/): each file is the state dict of one taesd.py nn.Sequential, keys `N...`. ComfyUI's
  combined checkpoints hold both under `taesd_encoder.` / `taesd_decoder.` in one file.
The two layouts differ only in the decoder's layer numbering: RENAME_TABLE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import ModelInfo
from .errors import ConfigError, WeightsError
from .family_keys import (
    TINY_COMBINED_EXTRAS,
    TINY_COMBINED_PREFIXES,
    TINY_DIFFUSERS_KEY,
    TINY_ORIGINAL_KEY,
    is_tiny_state,
    tiny_original_half,
)
from .models.tiny import AutoencoderTiny
from .models.tiny_config import CLASS_NAME, TinyConfig
from .weight_checks import assign_frozen, check_keys, check_values
from .weight_files import FOLDER_WEIGHTS, read_state_dict, regular_file, weights_sha256

HALVES = ("encoder", "decoder")
# The one rename table: per half, the original nn.Sequential index minus diffusers' `layers` index. The
# original decoder starts with a weightless Clamp (tanh(x/3)*3) that diffusers' DecoderTiny applies in its
# forward instead, so every decoder index shifts by one; the encoders are the same Sequential.
# Inside a layer the names agree (conv.0/2/4 and TAEF2's pool.0/1/3 in blocks, weight/bias in convs).
RENAME_TABLE: dict[str, int] = {"encoder": 0, "decoder": 1}
# Suffixes the original files carry, safetensors first (read without unpickling).
PAIR_SUFFIXES = (".safetensors", ".pth")
_HALF_NAME = re.compile(r"^(?P<prefix>.+)_(?P<half>encoder|decoder)$")

# What tensor shapes cannot tell, and what every released tiny VAE (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) uses.
UNREADABLE_NOTE = (
    "act_fn, upsample_fn, latent_magnitude, latent_shift, scaling_factor and shift_factor cannot be read from "
    "the weights: using taesd.py's values (relu, nearest, 3, 0.5, 1.0, 0.0), those of every released tiny VAE; "
    "its latents are then the diffusion latents of the full VAE it imitates"
)


# ----------------------------------------------------------------------------------------------- renaming


def original_to_diffusers_key(half: str, key: str) -> str:
    """One key of an original taesd.py `half` ("encoder" or "decoder") file -> its diffusers key."""
    m = TINY_ORIGINAL_KEY.match(key)
    if half not in RENAME_TABLE or m is None:
        raise WeightsError(f"not a key of an original TAESD {half} file: {key!r}")
    index = int(m.group(1)) - RENAME_TABLE[half]
    if index < 0:
        raise WeightsError(f"original TAESD {half} key {key!r}: layer {m.group(1)} holds no weights in taesd.py")
    return f"{half}.layers.{index}.{m.group(2)}"


def diffusers_to_original_key(key: str) -> tuple[str, str]:
    """One diffusers AutoencoderTiny key -> (half, its key in the original taesd.py file of that half)."""
    m = TINY_DIFFUSERS_KEY.match(key)
    if m is None:
        raise WeightsError(f"not a diffusers AutoencoderTiny key: {key!r}")
    half = m.group(1)
    return half, f"{int(m.group(2)) + RENAME_TABLE[half]}.{m.group(3)}"


def original_to_diffusers(halves: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"encoder": state, "decoder": state} of original files -> one diffusers-keyed state dict."""
    return {original_to_diffusers_key(half, k): v for half, state in halves.items() for k, v in state.items()}


def diffusers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers-keyed state dict -> {"encoder": state, "decoder": state} as the original files hold them."""
    out: dict[str, dict[str, torch.Tensor]] = {half: {} for half in HALVES}
    for key, value in state.items():
        half, original = diffusers_to_original_key(key)
        out[half][original] = value
    return out


# ---------------------------------------------------------------------------------------------- detection


def is_tiny_config(data: Mapping[str, Any]) -> bool:
    """Whether a config.json dict describes an AutoencoderTiny."""
    return isinstance(data, Mapping) and data.get("_class_name") == CLASS_NAME


def _sibling(path: Path, prefix: str, half: str) -> Path | None:
    """The `<prefix>_<half>` file beside `path`, with `path`'s suffix first."""
    suffixes = (path.suffix.lower(),) + tuple(s for s in PAIR_SUFFIXES if s != path.suffix.lower())
    for suffix in suffixes:
        candidate = path.with_name(f"{prefix}_{half}{suffix}")
        if regular_file(candidate):
            return candidate
    return None


def find_tiny_pair(path: Path) -> tuple[Path, Path] | None:
    """(encoder file, decoder file) of an original TAESD pair, given a folder holding one pair or either
    file of it; None when `path` names no such file. Raises WeightsError when one half is there without the
    other (naming the missing file), or when a folder holds several pairs (naming them)."""
    path = Path(path).expanduser()
    if regular_file(path):
        stem = path.name[: -len(path.suffix)] if path.suffix.lower() in PAIR_SUFFIXES else None
        m = _HALF_NAME.match(stem) if stem else None
        if m is None:
            return None
        other = "decoder" if m["half"] == "encoder" else "encoder"
        found = _sibling(path, m["prefix"], other)
        if found is None:
            raise WeightsError(
                f"{path} is the {m['half']} half of a tiny VAE, but its {other} half "
                f"{m['prefix']}_{other}.safetensors (or .pth) is missing beside it: AutoencoderTiny needs both"
            )
        return (path, found) if m["half"] == "encoder" else (found, path)
    if not path.is_dir():
        return None
    halves: dict[str, dict[str, Path]] = {}
    for child in sorted(path.iterdir()):
        if child.suffix.lower() not in PAIR_SUFFIXES:
            continue
        m = _HALF_NAME.match(child.name[: -len(child.suffix)])
        if m is not None and regular_file(child):
            halves.setdefault(m["prefix"], {}).setdefault(m["half"], child)  # sorted: .pth before .safetensors
    for prefix, files in halves.items():  # prefer safetensors whatever the listing order
        for half in HALVES:
            safe = path / f"{prefix}_{half}.safetensors"
            if half in files and regular_file(safe):
                files[half] = safe
    pairs = {p: f for p, f in halves.items() if set(f) == set(HALVES)}
    if len(pairs) > 1:
        raise WeightsError(f"{path} holds several tiny VAE pairs ({', '.join(sorted(pairs))}): name one of their files")
    if pairs:
        files = next(iter(pairs.values()))
        return files["encoder"], files["decoder"]
    if halves:
        prefix, files = next(iter(halves.items()))
        (half, present), = files.items()
        other = "decoder" if half == "encoder" else "encoder"
        raise WeightsError(f"{path} holds {present.name} but not its {other} half {prefix}_{other}.safetensors "
                           "(or .pth): AutoencoderTiny needs both")
    return None


# ------------------------------------------------------------------------------------------ config inference


def _layers(state: Mapping[str, torch.Tensor], half: str) -> dict[int, dict[str, torch.Size]]:
    """Layer index -> {name inside the layer: shape} of one half's diffusers keys."""
    out: dict[int, dict[str, torch.Size]] = {}
    for key, value in state.items():
        m = TINY_DIFFUSERS_KEY.match(key)
        if m is not None and m.group(1) == half:
            out.setdefault(int(m.group(2)), {})[m.group(3)] = value.shape
    return out


def _need(layers: dict[int, dict[str, torch.Size]], index: int, name: str, half: str) -> torch.Size:
    if index not in layers or name not in layers[index]:
        raise WeightsError(
            f"cannot read the architecture from the weights: tensor {half}.layers.{index}.{name} is missing"
        )
    return layers[index][name]


def _levels(layers: dict[int, dict[str, torch.Size]], first: int, half: str) -> tuple[list[int], int, int, bool]:
    """Walk one half's layers after `first`: blocks per level (a level ends at each conv), the last conv's
    index and output channels, and whether any block has TAEF2's GroupNorm branch."""
    blocks, pool, last = [0], False, max(layers)
    for index in sorted(i for i in layers if i > first):
        names = layers[index]
        if "conv.0.weight" in names:
            blocks[-1] += 1
            pool = pool or "pool.0.weight" in names
        elif "weight" in names and index != last:
            blocks.append(0)  # a bias-free conv between levels
        elif index != last:
            raise WeightsError(f"cannot read the architecture: {half}.layers.{index} is neither a conv nor a block")
    return blocks, last, int(_need(layers, last, "weight", half)[0]), pool


def infer_tiny_config(state: Mapping[str, torch.Tensor]) -> tuple[TinyConfig, list[str]]:
    """A TinyConfig from the shapes of diffusers-keyed tensors, and notes on what was assumed, not read."""
    enc, dec = _layers(state, "encoder"), _layers(state, "decoder")
    for half, layers in (("encoder", enc), ("decoder", dec)):
        if not layers:
            raise WeightsError(
                f"cannot read the architecture: no {half}.layers.* tensors (a tiny VAE needs both halves)"
            )
    first_enc = _need(enc, 0, "weight", "encoder")  # (ch, in, 3, 3)
    enc_blocks, _, latent, enc_pool = _levels(enc, 0, "encoder")
    first_dec = _need(dec, 0, "weight", "decoder")  # (ch, latent, 3, 3); layer 1 is the activation
    dec_blocks, _, out_ch, dec_pool = _levels(dec, 1, "decoder")
    enc_levels, dec_levels = len(enc_blocks), len(dec_blocks)
    down = 2 ** (enc_levels - 1)
    factor = 2
    if dec_levels > 1:
        factor = round(down ** (1 / (dec_levels - 1)))  # the decoder's upsampling must undo the encoder's
    try:
        cfg = TinyConfig(
            in_channels=int(first_enc[1]),
            out_channels=out_ch,
            encoder_block_out_channels=(int(first_enc[0]),) * enc_levels,
            decoder_block_out_channels=(int(first_dec[0]),) * dec_levels,
            latent_channels=latent,
            upsampling_scaling_factor=factor,
            num_encoder_blocks=tuple(enc_blocks),
            num_decoder_blocks=tuple(dec_blocks),
            midblock_gn=enc_pool or dec_pool,
        )
    except ConfigError as exc:
        raise WeightsError(f"the weights' shapes describe no valid tiny VAE: {exc}") from None
    notes = [UNREADABLE_NOTE]
    if dec_levels > 1:
        notes.append(f"upsampling_scaling_factor {factor} inferred: the decoder's {dec_levels} levels undo the "
                     f"encoder's {down}x downsampling")
    if cfg.midblock_gn:
        notes.append("TAEF2 architecture (GroupNorm branch in the lowest-resolution blocks); its latents are "
                     "FLUX.2's batch-norm-normalized latents, unpatchified to 32 channels")
    return cfg, notes


# ------------------------------------------------------------------------------------------------- loading


def _read_pair(encoder: Path, decoder: Path) -> dict[str, dict[str, torch.Tensor]]:
    halves = {"encoder": read_state_dict(encoder), "decoder": read_state_dict(decoder)}
    for (half, state), path in zip(halves.items(), (encoder, decoder), strict=False):
        actual = tiny_original_half(state.keys()) if all(TINY_ORIGINAL_KEY.match(k) for k in state) else None
        if actual != half:
            what = (f"{actual} weights" if actual
                    else "no original TAESD layer keys ('0.weight', '1.conv.0.weight', ...)")
            raise WeightsError(f"{path}: expected the {half} of a TAESD pair, found {what}")
    return halves


def _folder_weights(folder: Path) -> Path:
    for name in FOLDER_WEIGHTS:
        if regular_file(folder / name):
            return folder / name
    raise WeightsError(f"{folder}: no diffusers weights found (expected {' or '.join(FOLDER_WEIGHTS)})")


def _read_config(path: Path) -> dict[str, Any] | None:
    """A config.json's object when it describes an AutoencoderTiny, else None."""
    if not regular_file(path):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return data if is_tiny_config(data) else None


def _locate(path: Path) -> tuple[dict[str, torch.Tensor], str, str, TinyConfig | None, list[str]]:
    """(diffusers-keyed state, weights path(s) for the record, layout, config from config.json or None, notes)."""
    notes: list[str] = []
    if path.is_dir():
        data = _read_config(path / "config.json")
        if data is not None:
            weights = _folder_weights(path)
            return dict(read_state_dict(weights)), str(weights), "diffusers", TinyConfig.from_dict(data), notes
        if regular_file(path / "config.json"):
            raise WeightsError(f"{path}: its config.json does not describe an AutoencoderTiny (_class_name)")
    pair = find_tiny_pair(path)
    if pair is not None:
        state = original_to_diffusers(_read_pair(*pair))
        return state, f"{pair[0]} + {pair[1]}", "taesd", None, notes
    if not regular_file(path):
        raise WeightsError(f"{path}: no tiny VAE here (a diffusers AutoencoderTiny folder, or a "
                           "<name>_encoder/<name>_decoder pair of .safetensors or .pth files)")
    raw = read_state_dict(path)
    if not is_tiny_state(raw.keys()):
        raise WeightsError(f"{path}: not tiny VAE weights (expected keys like 'encoder.layers.0.weight', or an "
                           "original TAESD encoder/decoder file)")
    if any(k.startswith(tuple(TINY_COMBINED_PREFIXES.values())) for k in raw):
        halves = {h: {k[len(p):]: v for k, v in raw.items() if k.startswith(p)}
                  for h, p in TINY_COMBINED_PREFIXES.items()}
        extras = {k: float(raw[k]) for k in TINY_COMBINED_EXTRAS if k in raw and raw[k].numel() == 1}
        if extras:
            notes.append(f"ComfyUI combined checkpoint: its {extras} (raw-latent adapters) are not used; the "
                         "latents stay the tiny VAE's own, i.e. diffusion latents")
        return original_to_diffusers(halves), str(path), "taesd", None, notes
    if all(TINY_ORIGINAL_KEY.match(k) for k in raw):
        half = tiny_original_half(raw.keys())
        other = "decoder" if half == "encoder" else "encoder"
        raise WeightsError(f"{path} holds only the {half} of a TAESD pair, and its name does not say where its "
                           f"{other} is: name the files <name>_encoder and <name>_decoder (.safetensors or .pth)")
    beside = _read_config(path.parent / "config.json")
    return dict(raw), str(path), "diffusers", TinyConfig.from_dict(beside) if beside else None, notes


def _common_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def load_tiny(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AutoencoderTiny:
    """Load an AutoencoderTiny in eval mode with frozen weights.

    path: a diffusers AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors or .bin), a
        single diffusers-keyed file (config.json beside it is used when it is an AutoencoderTiny's), a folder
        holding one original pair (`taesd_encoder.safetensors` + `taesd_decoder.safetensors`, or .pth; any
        `<name>_` prefix, e.g. taesdxl_, taesd3_, taef1_, taef2_), either file of such a pair, or a ComfyUI
        combined checkpoint. Without a config the architecture is read from tensor shapes; `.info.notes`
        lists what was assumed instead.
    dtype: the weights' precision; None keeps the file's (float32 when its tensors differ).
    Raises WeightsError naming missing and unexpected keys, shape mismatches, a missing half of a pair.
    """
    path = Path(path).expanduser()
    state, where, layout, cfg, notes = _locate(path)
    check_values(state, where)
    if cfg is None:
        cfg, inferred = infer_tiny_config(state)
        notes += inferred
        config_source = "inferred from shapes"
    else:
        config_source = "config.json"
    with torch.device("meta"):
        model = AutoencoderTiny(cfg)
    check_keys(model, state, where)
    sha = weights_sha256(state)
    model = assign_frozen(model, state, dtype if dtype is not None else _common_dtype(state), device)
    model.info = ModelInfo(str(path), where, layout, sha, config_source, tuple(notes))
    return model
