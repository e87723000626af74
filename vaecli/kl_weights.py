"""AutoencoderKL and FLUX.2 weights: the key layouts (diffusers, original LDM, Black Forest Labs' FLUX.2 file)
and the one rename table between them, the config read from tensor shapes, and strict loading.

Tensor shapes are equal in every layout except the mid-block attention projections (1x1 convs in LDM
files, Linear layers in diffusers); only names differ otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import families
from .config import DEFAULT_FAMILY, Flux2Config, ModelInfo, VAEConfig, apply_family
from .errors import ConfigError, WeightsError
from .family_keys import compile_key_pattern
from .models.kl import AutoencoderKL, build_model
from .weight_checks import assign_frozen, check_keys, check_values
from .weight_files import read_state_dict, regular_file, under_vae_prefix, weights_sha256

# The one rename table: original LDM (CompVis) key patterns <-> diffusers key patterns.
# {i} is a level index, {j} a resnet index; decoder levels count in opposite directions ({u} is LDM's
# `up.{u}`, which is diffusers' `up_blocks.{levels-1-u}`). Attention projections are 1x1 convs in LDM files
# and Linear layers in diffusers: ldm_to_diffusers / diffusers_to_ldm reshape those tensors.
RENAME_TABLE: tuple[tuple[str, str], ...] = (
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.conv.", "encoder.down_blocks.{i}.downsamplers.0.conv."),
    ("decoder.up.{u}.block.{j}.nin_shortcut.", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{u}.resnets.{j}."),
    ("decoder.up.{u}.upsample.conv.", "decoder.up_blocks.{u}.upsamplers.0.conv."),
    ("{e}.mid.block_1.nin_shortcut.", "{e}.mid_block.resnets.0.conv_shortcut."),
    ("{e}.mid.block_2.nin_shortcut.", "{e}.mid_block.resnets.1.conv_shortcut."),
    ("{e}.mid.block_1.", "{e}.mid_block.resnets.0."),
    ("{e}.mid.block_2.", "{e}.mid_block.resnets.1."),
    ("{e}.mid.attn_1.norm.", "{e}.mid_block.attentions.0.group_norm."),
    ("{e}.mid.attn_1.q.", "{e}.mid_block.attentions.0.to_q."),
    ("{e}.mid.attn_1.k.", "{e}.mid_block.attentions.0.to_k."),
    ("{e}.mid.attn_1.v.", "{e}.mid_block.attentions.0.to_v."),
    ("{e}.mid.attn_1.proj_out.", "{e}.mid_block.attentions.0.to_out.0."),
    ("{e}.norm_out.", "{e}.conv_norm_out."),
)
# Black Forest Labs' FLUX.2 ae.safetensors (flux2/src/flux2/autoencoder.py): the LDM layout above, except that
# the 1x1 moment convs live inside the encoder and decoder; bn.* is named as in diffusers.
BFL_FLUX2_RENAME_TABLE: tuple[tuple[str, str], ...] = (
    ("encoder.quant_conv.", "quant_conv."),
    ("decoder.post_quant_conv.", "post_quant_conv."),
)
# Attention names of diffusers files written before diffusers 0.14; read, never written.
LEGACY_ATTENTION = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))
_ATTN_PROJ = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")

_FIELDS = {"{i}": r"(?P<i>\d+)", "{j}": r"(?P<j>\d+)", "{u}": r"(?P<u>\d+)", "{e}": r"(?P<e>encoder|decoder)"}


def _compile(pattern: str) -> re.Pattern[str]:
    return compile_key_pattern(pattern, _FIELDS)


_LDM_TO_DIFFUSERS = [(_compile(src), dst) for src, dst in RENAME_TABLE]
_DIFFUSERS_TO_LDM = [(_compile(dst), src) for src, dst in RENAME_TABLE]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]], levels: int) -> str:
    for regex, target in rules:
        m = regex.match(key)
        if m is None:
            continue
        fields = m.groupdict()
        if "u" in fields:  # decoder levels are numbered in opposite directions in the two layouts
            fields["u"] = str(levels - 1 - int(fields["u"]))
        out = target
        for name, value in fields.items():
            out = out.replace("{" + name + "}", value)
        return out + key[m.end():]
    return key


def ldm_to_diffusers_key(key: str, levels: int) -> str:
    """One original-LDM key -> its diffusers key (`levels` = number of resolution levels)."""
    return _rename(key, _LDM_TO_DIFFUSERS, levels)


def diffusers_to_ldm_key(key: str, levels: int) -> str:
    """One diffusers key -> its original-LDM key."""
    return _rename(key, _DIFFUSERS_TO_LDM, levels)


def _ldm_levels(keys: Any) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    if not found:
        found = [int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k))]
    return max(found) + 1 if found else 1


def detect_layout(keys: Any) -> str:
    """'ldm' or 'diffusers', from key names alone."""
    keys = list(keys)
    if any(k.startswith(("encoder.down.", "decoder.up.")) or ".mid.block_1." in k for k in keys):
        return "ldm"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers"
    raise WeightsError(
        "no VAE weights recognised in this file (expected keys like 'encoder.down_blocks.0...' or "
        "'encoder.down.0...', optionally under 'first_stage_model.' or 'vae.')"
    )


def ldm_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole LDM state dict to diffusers keys, turning 1x1-conv attention weights into Linear ones."""
    levels = _ldm_levels(state.keys())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = ldm_to_diffusers_key(key, levels)
        if _ATTN_PROJ.search(new) and value.ndim == 4:
            value = value[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear
        out[new] = value
    return out


def diffusers_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers state dict to original LDM keys (what single-file checkpoints hold)."""
    levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")}) or 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _ATTN_PROJ.search(key) and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        out[diffusers_to_ldm_key(key, levels)] = value
    return out


def _upgrade_legacy_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if ".mid_block.attentions.0." in key:
            head, _, tail = key.partition(".mid_block.attentions.0.")
            for old, new in LEGACY_ATTENTION:
                if tail.startswith(old):
                    tail = new + tail[len(old):]
                    break
            key = f"{head}.mid_block.attentions.0.{tail}"
            if _ATTN_PROJ.search(key) and value.ndim == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def extract_vae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE tensors of a file: a full pipeline checkpoint keeps them under a prefix, which is stripped."""
    sub = under_vae_prefix(state)
    if sub is not None:
        return sub
    # Files from some tools keep non-VAE extras (e.g. model_ema.*, loss.*): only the VAE's own parts count.
    own = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")  # bn.: FLUX.2's statistics
    return {k: v for k, v in state.items() if k.startswith(own)}


def _swap_prefixes(state: Mapping[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.2 VAE's diffusers state dict in Black Forest Labs' ae.safetensors layout."""
    return _swap_prefixes(diffusers_to_ldm(state), tuple((b, a) for a, b in BFL_FLUX2_RENAME_TABLE))


def to_diffusers_layout(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Diffusers-keyed VAE tensors, and the layout they came in."""
    vae = extract_vae(state)
    layout = detect_layout(vae.keys())
    if layout == "ldm" and any(k.startswith(("encoder.quant_conv.", "decoder.post_quant_conv.")) for k in vae):
        vae = _swap_prefixes(vae, BFL_FLUX2_RENAME_TABLE)  # BFL's FLUX.2 file
        layout = "bfl"
    vae = ldm_to_diffusers(vae) if layout in ("ldm", "bfl") else dict(vae)
    return _upgrade_legacy_attention(vae), layout


# ------------------------------------------------------------------------------------------ config inference


def architecture_from_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config fields that tensor shapes determine (diffusers keys); raises WeightsError if a needed
    tensor is missing. Cheap: reads shapes only, allocates nothing."""

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise WeightsError(f"cannot read the architecture from the weights: tensor {key!r} is missing")
        return state[key].shape

    levels = 0
    while f"encoder.down_blocks.{levels}.resnets.0.conv1.weight" in state:
        levels += 1
    if levels == 0:
        raise WeightsError("cannot read the architecture from the weights: no "
                           "'encoder.down_blocks.0.resnets.0.conv1.weight'")
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state:
        layers += 1
    decoder = tuple(reversed([int(shape(f"decoder.up_blocks.{i}.resnets.0.conv2.weight")[0]) for i in range(levels)]))
    return dict(
        decoder_channels=decoder,  # the decoder's levels in encoder order
        in_channels=int(shape("encoder.conv_in.weight")[1]),
        out_channels=int(shape("decoder.conv_out.weight")[0]),
        block_out_channels=tuple(
            int(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]) for i in range(levels)),
        layers_per_block=layers,
        latent_channels=int(shape("decoder.conv_in.weight")[1]),
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state,
    )


def _norm_groups(channels: Iterable[int], notes: list[str]) -> int:
    """GroupNorm's group count, which leaves no trace in the weights: 32 (every released LDM VAE) when it
    divides every width, else the largest divisor of 32 that does (with a note)."""
    widths = tuple(channels)
    if not any(c % 32 for c in widths):
        return 32
    groups = math.gcd(*widths, 32)
    notes.append(f"norm_num_groups cannot be read from weights; 32 does not divide the channels, using {groups}")
    return groups


def _flux2_config(state: Mapping[str, torch.Tensor], arch: dict[str, Any], family: str | None,
                  notes: list[str]) -> Flux2Config:
    """A FLUX.2 config: its batch-norm statistics are in the weights, and their size gives the patch."""
    if family is not None and family.lower() != "flux2":
        raise ConfigError(f"these are a FLUX.2 VAE's weights (batch-norm statistics): --family {family} does "
                          "not apply to them (drop it, or name --family flux2)")
    stats = state["bn.running_mean"] if "bn.running_mean" in state else state["bn.running_var"]
    patch = math_isqrt(int(stats.numel()) // arch["latent_channels"])
    notes.append("FLUX.2 VAE (AutoencoderKLFlux2), identified by its batch-norm statistics; batch_norm_eps "
                 "1e-4 (diffusers' default: not in the weights)")
    decoder = arch.pop("decoder_channels")
    asymmetric = decoder if decoder != arch["block_out_channels"] else None
    return Flux2Config(patch_size=(patch, patch), decoder_block_out_channels=asymmetric, **arch)


def _kl_config(arch: dict[str, Any], family: str | None, notes: list[str]) -> VAEConfig:
    """A plain AutoencoderKL config, its latent normalization from `family` (SD's, with a note, when None)."""
    decoder = arch.pop("decoder_channels")
    if decoder != arch["block_out_channels"]:
        raise WeightsError(f"the decoder's channels {list(decoder)} differ from the encoder's "
                           f"{list(arch['block_out_channels'])}: not an AutoencoderKL (an asymmetric FLUX.2 decoder "
                           "needs its config.json, _class_name AutoencoderKLFlux2)")
    cfg = VAEConfig(**arch)
    if family is not None and family.lower() == "flux2":
        raise ConfigError("--family flux2: these weights have no batch-norm statistics (bn.running_mean), so they "
                          "are not a FLUX.2 VAE")
    if family is None:
        family = DEFAULT_FAMILY
        notes.append(
            f"no config and no family given: assuming the {family.upper()} latent normalization "
            "(if this is another VAE, name its family: --family sdxl, sd3 or flux on the command line, "
            "family='sdxl' etc. in Python; or give its config.json)"
        )
    return apply_family(cfg, family)


def infer_config(state: Mapping[str, torch.Tensor], family: str | None = None) -> tuple[VAEConfig, list[str]]:
    """Config from the shapes of diffusers-keyed tensors; the latent normalization from `family`.

    Returns the config and notes on what was assumed rather than read.
    """
    notes: list[str] = []
    arch = architecture_from_shapes(state)
    levels = len(arch["block_out_channels"])
    arch["norm_num_groups"] = _norm_groups((*arch["block_out_channels"], *arch["decoder_channels"]), notes)
    arch["down_block_types"] = ("DownEncoderBlock2D",) * levels
    arch["up_block_types"] = ("UpDecoderBlock2D",) * levels
    row = families.by_keys(state.keys())
    if row is not None and row.name == "flux2":  # the table names the family its keys belong to
        return _flux2_config(state, arch, family, notes), notes
    return _kl_config(arch, family, notes), notes


def math_isqrt(n: int) -> int:
    """The side of a square patch of n values; WeightsError when n is not a square."""
    root = math.isqrt(max(n, 1))
    if root * root != n:
        raise WeightsError(f"batch-norm statistics of {n} values per latent channel: not a square patch")
    return root


def check_architecture(config: VAEConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Compare the config with what the weights' shapes say before any model is built, so a config that
    does not describe these weights (or a hostile one) fails at once with the fields that differ."""
    try:
        arch = architecture_from_shapes(state)
    except WeightsError:
        return  # too incomplete to tell: the strict key check names what is missing
    names = {"decoder_channels": "decoder_block_out_channels"}
    diffs = [f"{names.get(k, k)} {list(getattr(config, k)) if k in names else getattr(config, k)!r} in the config, "
             f"{list(v) if k in names else v!r} in the weights"
             for k, v in arch.items() if getattr(config, k) != v]
    if diffs:
        raise WeightsError(f"{source}: the config does not describe these weights: " + "; ".join(diffs))


# ------------------------------------------------------------------------------------------------- loading


def _resolve_config(config: VAEConfig | Mapping[str, Any] | str | Path | None) -> families.AnyConfig | None:
    """The config object that load_vae's `config=` names (an object, a dict, a config.json or its folder)."""
    if config is None or isinstance(config, VAEConfig):
        return config
    if isinstance(config, Mapping):
        return families.config_from_dict(config)
    path = Path(config)
    if path.is_dir():
        for candidate in (path / "config.json", path / "vae" / "config.json"):
            if regular_file(candidate):
                return families.config_from_json(candidate)
        raise ConfigError(f"{path}: no config.json in this folder (or its vae/ subfolder)")
    if regular_file(path):
        return families.config_from_json(path)
    raise ConfigError(f"config {config}: no such file or folder")


def _kl_only(config: families.AnyConfig, source: str) -> VAEConfig:
    """`config` when it is an AutoencoderKL's (or FLUX.2's); a tiny or Qwen-Image config cannot describe
    these weights."""
    if not isinstance(config, VAEConfig):
        raise ConfigError(f"{source}: a {config.class_name} config does not describe AutoencoderKL weights")
    return config


def _choose_config(config: VAEConfig | Mapping[str, Any] | str | Path | None, beside: Path | None,
                   state: Mapping[str, torch.Tensor], family: str | None) -> tuple[VAEConfig, str, list[str], bool]:
    """(config, where it came from, notes, whether the latent normalization was assumed): the given config,
    else the config.json beside the weights, else one inferred from the tensors' shapes."""
    given = _resolve_config(config)
    if given is not None:
        cfg, config_source = _kl_only(given, "config"), "given"
    elif beside is not None:
        cfg, config_source = _kl_only(families.config_from_json(beside), str(beside)), "config.json"
    else:
        cfg, notes = infer_config(state, family)
        assumed = family is None and not isinstance(cfg, Flux2Config)  # FLUX.2: read from its weights
        return cfg, "inferred from shapes" + (f" + {family} preset" if family else ""), notes, assumed
    return (apply_family(cfg, family) if family is not None else cfg), config_source, [], False


def _with_flux2_statistics(cfg: Flux2Config, state: Mapping[str, torch.Tensor]) -> Flux2Config:
    """The pipelines' normalization, computed as they compute it (float32): std = sqrt(running_var + eps)."""
    mean = state["bn.running_mean"].float()
    std = torch.sqrt(state["bn.running_var"].float() + cfg.batch_norm_eps)
    return dataclasses.replace(cfg, bn_mean=tuple(mean.tolist()), bn_std=tuple(std.tolist()))


def load_kl(weights_path: Path, beside: Path | None, name: str,
            config: VAEConfig | Mapping[str, Any] | str | Path | None = None, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, family: str | None = None) -> AutoencoderKL:
    """Load an AutoencoderKL (AutoencoderKLFlux2 for a FLUX.2 config) from one located weights file, in eval
    mode with frozen weights; `beside` is the config.json next to it, `name` what the user asked for.
    config and family: as weights.load_vae."""
    source = str(weights_path)
    state, layout = to_diffusers_layout(read_state_dict(weights_path))
    cfg, config_source, notes, family_assumed = _choose_config(config, beside, state, family)
    check_architecture(cfg, state, source)
    check_values(state, source)
    sha = weights_sha256(state)
    with torch.device("meta"):
        model = build_model(cfg)
    check_keys(model, state, source)
    if isinstance(cfg, Flux2Config):
        model.config = _with_flux2_statistics(cfg, state)
    model = assign_frozen(model, state, dtype, device)
    model.info = ModelInfo(name, source, layout, sha, config_source, tuple(notes), family_assumed)
    # Weights stay NCHW (diffusers' layout); a plan's layout is applied by whoever runs the model with
    # that plan (plans.apply_layout, Runner).
    return model
