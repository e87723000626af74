"""Qwen-Image VAE weights: diffusers folders and the original (Wan 2.1 layout) single file, one rename table,
the config read from tensor shapes, strict loading.

Two key layouts hold the same tensors:
- diffusers (Qwen/Qwen-Image `vae/`): `encoder.down_blocks.N`, `decoder.up_blocks.I.resnets.J`, ...
- original Wan 2.1 (`qwen_image_vae.safetensors` of ComfyUI users, Wan2.1_VAE.pth): `encoder.downsamples.N`,
  `decoder.upsamples.N` (one flat list per side), `residual.{0,2,3,6}`, `middle.{0,1,2}`, `head.{0,2}`,
  top-level `conv1`/`conv2` (ComfyUI's comfy/ldm/wan/vae.py; diffusers' convert_wan_vae_to_diffusers).
Tensor shapes are equal in both; only names differ.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelInfo
from .errors import ConfigError, WeightsError
from .family_keys import QWEN_DIFFUSERS_MARKERS, QWEN_ORIGINAL_MARKERS, compile_key_pattern
from .models.qwenimage import AutoencoderKLQwenImage
from .models.qwenimage_config import CLASS_NAME, QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, QwenImageConfig
from .weight_checks import assign_frozen, check_keys, check_values
from .weight_files import locate, read_state_dict, under_vae_prefix, weights_sha256

# The one rename table: original Wan 2.1 key prefixes <-> diffusers key prefixes, first match wins.
# {e} is encoder or decoder, {k} a flat encoder index (the same list in both layouts). {d} is a flat index
# into the original decoder's `upsamples` list, which holds per level num_res_blocks + 1 resnets and then
# an upsampler (none after the last level); diffusers nests it as {up}: `up_blocks.{i}.resnets.{j}.` or
# `up_blocks.{i}.upsamplers.0.`, with d = i * (num_res_blocks + 2) + j (j = num_res_blocks + 1 for the upsampler).
RENAME_TABLE: tuple[tuple[str, str], ...] = (
    ("{e}.conv1.", "{e}.conv_in."),
    ("{e}.middle.0.", "{e}.mid_block.resnets.0."),
    ("{e}.middle.1.", "{e}.mid_block.attentions.0."),
    ("{e}.middle.2.", "{e}.mid_block.resnets.1."),
    ("{e}.head.0.", "{e}.norm_out."),
    ("{e}.head.2.", "{e}.conv_out."),
    ("encoder.downsamples.{k}.", "encoder.down_blocks.{k}."),
    ("decoder.upsamples.{d}.", "decoder.{up}"),
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
)
# Inside a residual block (after the prefix above): the original nn.Sequential `residual` positions
# (0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv) <-> diffusers' names.
RESNET_TABLE: tuple[tuple[str, str], ...] = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)

_FIELDS = {"{e}": r"(?P<e>encoder|decoder)", "{k}": r"(?P<k>\d+)", "{d}": r"(?P<d>\d+)",
           "{up}": r"up_blocks\.(?P<i>\d+)\.(?:resnets\.(?P<j>\d+)|(?P<u>upsamplers\.0))\."}


def _compile(pattern: str) -> re.Pattern[str]:
    return compile_key_pattern(pattern, _FIELDS)


_TO_DIFFUSERS = [(_compile(src), dst) for src, dst in RENAME_TABLE]
_TO_ORIGINAL = [(_compile(dst), src) for src, dst in RENAME_TABLE]


def _rename_tail(tail: str, to_diffusers: bool) -> str:
    for original, diffusers in RESNET_TABLE:
        old, new = (original, diffusers) if to_diffusers else (diffusers, original)
        if tail.startswith(old):
            return new + tail[len(old):]
    return tail


def original_to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """One original Wan 2.1 key -> its diffusers key (keys no rule matches are returned unchanged)."""
    for regex, target in _TO_DIFFUSERS:
        m = regex.match(key)
        if m is None:
            continue
        fields = {k: v for k, v in m.groupdict().items() if v is not None}
        if "d" in fields:
            i, j = divmod(int(fields.pop("d")), num_res_blocks + 2)
            fields["up"] = f"up_blocks.{i}." + (f"resnets.{j}." if j <= num_res_blocks else "upsamplers.0.")
        for name, value in fields.items():
            target = target.replace("{" + name + "}", value)
        return target + _rename_tail(key[m.end():], True)
    return key


def diffusers_to_original_key(key: str, num_res_blocks: int) -> str:
    """One diffusers key -> its original Wan 2.1 key (keys no rule matches are returned unchanged)."""
    for regex, target in _TO_ORIGINAL:
        m = regex.match(key)
        if m is None:
            continue
        fields = {k: v for k, v in m.groupdict().items() if v is not None}
        if "i" in fields:
            j = num_res_blocks + 1 if fields.pop("u", None) else int(fields.pop("j"))
            fields["d"] = str(int(fields.pop("i")) * (num_res_blocks + 2) + j)
        for name, value in fields.items():
            target = target.replace("{" + name + "}", value)
        return target + _rename_tail(key[m.end():], False)
    return key


def _original_res_blocks(keys: Iterable[str]) -> int:
    """num_res_blocks of an original-layout state: the first decoder upsampler sits at flat index
    num_res_blocks + 1; without one (a single level) the decoder holds num_res_blocks + 1 resnets."""
    flat = [(int(m.group(1)), m.group(2)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.(\w+)", k))]
    upsamplers = [d for d, part in flat if part == "resample"]
    if upsamplers:
        return min(upsamplers) - 1
    if flat:
        return max(d for d, _ in flat)
    raise WeightsError("no decoder blocks ('decoder.upsamples.N...') in these Wan-layout weights")


def _diffusers_res_blocks(keys: Iterable[str]) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    if not found:
        raise WeightsError("no decoder blocks ('decoder.up_blocks.0.resnets.N...') in these weights")
    return max(found)  # the decoder's levels hold num_res_blocks + 1 resnets


def original_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole original-layout state dict to diffusers keys (tensors unchanged)."""
    r = _original_res_blocks(state)
    return {original_to_diffusers_key(k, r): v for k, v in state.items()}


def diffusers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole diffusers state dict to original Wan 2.1 keys (what ComfyUI's single file holds)."""
    r = _diffusers_res_blocks(state)
    return {diffusers_to_original_key(k, r): v for k, v in state.items()}


# --------------------------------------------------------------------------------------- detection


# Wan 2.2's VAE nests resnets in residual up/down blocks (ComfyUI's comfy/sd.py tells it from 2.1 by this).
_WAN22_NESTED = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.\d+\.(downsamples|upsamples)\.")


def is_qwen_config(data: Any) -> bool:
    """Whether a config.json dict is diffusers' AutoencoderKLQwenImage's."""
    return isinstance(data, Mapping) and data.get("_class_name") == CLASS_NAME


def detect_layout(keys: Iterable[str]) -> str:
    """'diffusers' or 'wan' (the original Wan 2.1 layout), from key names alone."""
    keys = set(keys)
    if any(m in keys for m in QWEN_ORIGINAL_MARKERS):
        return "wan"
    if any(m in keys for m in QWEN_DIFFUSERS_MARKERS):
        return "diffusers"
    raise WeightsError("no Qwen-Image VAE weights recognised (expected keys like "
                       "'decoder.mid_block.resnets.0.norm1.gamma' or 'decoder.middle.0.residual.0.gamma')")


def _refuse_other_wan(state: Mapping[str, torch.Tensor], layout: str, source: str) -> None:
    """The Wan 2.2 VAE shares the Wan key names but not the structure: refuse it by name."""
    conv_in = state.get("encoder.conv1.weight" if layout == "wan" else "encoder.conv_in.weight")
    z_in = state.get("decoder.conv1.weight" if layout == "wan" else "decoder.conv_in.weight")
    nested = any(_WAN22_NESTED.match(k) for k in state)
    patchified = conv_in is not None and conv_in.ndim == 5 and conv_in.shape[1] == 12  # 2x2-patchified RGB
    if nested or patchified or (layout == "wan" and z_in is not None and z_in.ndim == 5 and z_in.shape[1] == 48):
        raise WeightsError(
            f"{source}: this is a Wan 2.2 VAE (48 latent channels, 16x compression, residual up/down blocks), "
            "not the Qwen-Image VAE (Wan 2.1 structure, 16 latent channels); vaecli cannot load it"
        )
    attention = sorted(k for k in state if re.match(r"^decoder\.(upsamples|up_blocks)\.[\d.a-z_]*to_qkv\.", k))
    if attention:
        raise WeightsError(
            f"{source}: attention in the decoder's up blocks ({attention[0]}, ...): diffusers' "
            "AutoencoderKLQwenImage has none (its decoder ignores attn_scales), so vaecli cannot load these weights"
        )


# ----------------------------------------------------------------------------------- config inference


def _shape(state: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state:
        raise WeightsError(f"cannot read the architecture from the weights: tensor {key!r} is missing")
    return state[key].shape


@dataclass
class _EncoderLevels:
    """What the encoder's flat block list says per resolution level."""

    channels: list[int] = field(default_factory=list)  # width of each level
    resnets: list[int] = field(default_factory=lambda: [0])  # resnets of each level
    attention: set[int] = field(default_factory=set)  # levels with attention blocks
    temporal: list[bool] = field(default_factory=list)  # per downsampler: has a time_conv


def _encoder_levels(state: Mapping[str, torch.Tensor]) -> _EncoderLevels:
    """Walk `encoder.down_blocks.K`: a resnet (norm1.gamma), an attention block (to_qkv) or a downsampler
    (resample.1), which starts the next level."""
    levels = _EncoderLevels()
    k = 0
    while any(key.startswith(f"encoder.down_blocks.{k}.") for key in state):
        block = f"encoder.down_blocks.{k}."
        if block + "norm1.gamma" in state:
            if levels.resnets[-1] == 0:
                levels.channels.append(int(_shape(state, block + "conv1.weight")[0]))
            levels.resnets[-1] += 1
        elif block + "to_qkv.weight" in state:
            levels.attention.add(len(levels.resnets) - 1)
        elif block + "resample.1.weight" in state:
            levels.temporal.append(block + "time_conv.weight" in state)
            levels.resnets.append(0)
        else:
            raise WeightsError(f"cannot read the architecture from the weights: unknown encoder block {block}*")
        k += 1
    if not levels.channels or len(set(levels.resnets)) != 1 or len(levels.channels) != len(levels.resnets):
        raise WeightsError(f"cannot read the architecture from the weights: encoder resnets per level "
                           f"{levels.resnets}")
    return levels


def _latent_statistics(z_dim: int, notes: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """latents_mean/std, which leave no trace in the weights: Qwen-Image's for 16 channels, else identity."""
    if z_dim == len(QWEN_LATENTS_MEAN):
        notes.append("latents_mean/latents_std: Qwen-Image's released values (not stored in the weights; the "
                     "Wan 2.1 VAE, which shapes cannot tell apart, uses the same values)")
        return QWEN_LATENTS_MEAN, QWEN_LATENTS_STD
    notes.append(f"latents_mean/latents_std: unknown for {z_dim} latent channels (not stored in the weights); "
                 "using mean 0 and std 1 (no normalization)")
    return (0.0,) * z_dim, (1.0,) * z_dim


def infer_config(state: Mapping[str, torch.Tensor]) -> tuple[QwenImageConfig, list[str]]:
    """The config from the shapes and names of diffusers-keyed tensors, and notes on what was assumed.

    base_dim, input_channels, z_dim, dim_mult and num_res_blocks come from shapes; temperal_downsample from
    which downsamplers have `time_conv` tensors; attn_scales from the encoder levels with attention blocks.
    dropout and latents_mean/std leave no trace in the weights: Qwen-Image's released values are used.
    """
    base_dim, input_channels = (int(v) for v in _shape(state, "encoder.conv_in.weight")[:2])
    z_dim = int(_shape(state, "decoder.conv_in.weight")[1])
    levels = _encoder_levels(state)
    if any(c % base_dim for c in levels.channels):
        raise WeightsError(f"cannot read the architecture from the weights: level widths {levels.channels} are not "
                           f"multiples of base_dim {base_dim}")
    notes = [
        "no config.json: base_dim, z_dim, dim_mult, num_res_blocks read from tensor shapes; temperal_downsample "
        "from the downsamplers' time_conv tensors (unused for images); attn_scales from the encoder's attention "
        "blocks",
        "dropout 0.0 assumed (Qwen-Image's released value; training only, not stored in the weights)",
    ]
    mean, std = _latent_statistics(z_dim, notes)
    try:
        cfg = QwenImageConfig(
            base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(c // base_dim for c in levels.channels),
            num_res_blocks=levels.resnets[0], attn_scales=tuple(1.0 / 2**level for level in sorted(levels.attention)),
            temperal_downsample=tuple(levels.temporal), dropout=0.0, input_channels=input_channels,
            latents_mean=mean, latents_std=std,
        )
    except ConfigError as exc:
        raise WeightsError(f"these weights describe no valid Qwen-Image VAE: {exc}") from None
    return cfg, notes


# ------------------------------------------------------------------------------------------------- loading


def _read_config(path: Path) -> tuple[QwenImageConfig, list[str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not is_qwen_config(data):
        name = data.get("_class_name") if isinstance(data, dict) else None
        if name == "AutoencoderKLWan":
            wan22 = isinstance(data, dict) and (data.get("z_dim") == 48 or data.get("is_residual"))
            raise WeightsError(
                f"{path}: AutoencoderKLWan, the Wan {'2.2 ' if wan22 else ''}video VAE, not Qwen-Image's "
                f"{CLASS_NAME}; vaecli does not load video VAEs"
            )
        raise WeightsError(f"{path}: _class_name is {name!r}, not {CLASS_NAME!r}: not a Qwen-Image VAE config")
    notes: list[str] = []
    z = data.get("z_dim", 16)
    stats = [data.get(k) for k in ("latents_mean", "latents_std")]
    if isinstance(z, int) and z != 16 and all(isinstance(v, list) and len(v) == 16 for v in stats):
        # diffusers writes its 16 released statistics whatever z_dim is (a small model built with defaults):
        # no pipeline can apply them to z_dim channels, so none is assumed.
        data = {**data, "latents_mean": [0.0] * z, "latents_std": [1.0] * z}
        notes.append(f"config.json's latents_mean/latents_std hold diffusers' 16 released values for z_dim {z}: "
                     "they cannot normalize these latents; identity normalization (mean 0, std 1) used")
    return QwenImageConfig.from_dict(data), notes


def _vae_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's tensors: under a `vae.`/`first_stage_model.` prefix when a pipeline file holds one."""
    sub = under_vae_prefix(state)
    return sub if sub is not None else dict(state)


def _stored_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def load_qwen(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AutoencoderKLQwenImage:
    """Load a Qwen-Image VAE in eval mode with frozen weights (`requires_grad` false).

    path: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors, or .bin read with
        torch.load(weights_only=True)), a pipeline folder with a vae/ subfolder, or a single file in the
        diffusers or the original Wan 2.1 layout (ComfyUI's qwen_image_vae.safetensors, Wan2.1_VAE.pth;
        a `vae.`/`first_stage_model.` prefix is stripped). Without a config.json the config is read from
        the tensors (see infer_config) and the assumptions are listed in `.info.notes`.
    dtype: the weights' precision; None keeps the precision they are stored in (fp32 when mixed).
    Raises WeightsError for a Wan 2.2 or other video VAE, and for missing, unexpected or mis-shaped tensors.
    """
    weights_path, beside = locate(path)
    cfg, notes = _read_config(beside) if beside is not None else (None, [])  # video VAEs refused before reading
    state = _vae_tensors(read_state_dict(weights_path))
    source = str(weights_path)
    layout = detect_layout(state)
    _refuse_other_wan(state, layout, source)
    if layout == "wan":
        state = original_to_diffusers(state)
    config_source = "config.json"
    if cfg is None:
        cfg, notes = infer_config(state)
        config_source = "inferred from shapes"
    check_values(state, source)
    sha = weights_sha256(state)
    with torch.device("meta"):
        model = AutoencoderKLQwenImage(cfg)
    check_keys(model, state, source)
    model = assign_frozen(model, state, dtype if dtype is not None else _stored_dtype(state), device)
    model.info = ModelInfo(str(path), source, layout, sha, config_source, tuple(notes))
    return model
