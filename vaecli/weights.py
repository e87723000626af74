"""Read weight files, detect their key layout, rename through one table, infer configs, load strictly."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch

from . import families
from .config import DEFAULT_FAMILY, FAMILY_PRESETS, Flux2Config, ModelInfo, VAEConfig, apply_family
from .errors import ConfigError, WeightsError
from .models.kl import AutoencoderKL, build_model

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
# Prefixes under which whole-pipeline checkpoints keep their VAE.
VAE_PREFIXES = ("first_stage_model.", "vae.")

# The one rename table: original LDM (CompVis) key patterns <-> diffusers key patterns.
# {i} is a level index, {j} a resnet index; decoder levels count in opposite directions ({u} is LDM's
# `up.{u}`, which is diffusers' `up_blocks.{levels-1-u}`). Attention projections are 1x1 convs in LDM files
# and Linear layers in diffusers: the tensors are reshaped by `_to_linear` / `_to_conv`.
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
    regex = re.escape(pattern)
    for name, group in _FIELDS.items():
        regex = regex.replace(re.escape(name), group)
    return re.compile("^" + regex)


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


# ---------------------------------------------------------------------------------------------- reading files


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


def extract_vae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE tensors of a file: a full pipeline checkpoint keeps them under a prefix, which is stripped."""
    for prefix in VAE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
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


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor in key order: the identity of a set of weights."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: num_batches_tracked
    return h.hexdigest()


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
        raise WeightsError("cannot read the architecture from the weights: no 'encoder.down_blocks.0.resnets.0.conv1.weight'")
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state:
        layers += 1
    decoder = tuple(reversed([int(shape(f"decoder.up_blocks.{i}.resnets.0.conv2.weight")[0]) for i in range(levels)]))
    return dict(
        decoder_channels=decoder,  # the decoder's levels in encoder order
        in_channels=int(shape("encoder.conv_in.weight")[1]),
        out_channels=int(shape("decoder.conv_out.weight")[0]),
        block_out_channels=tuple(int(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]) for i in range(levels)),
        layers_per_block=layers,
        latent_channels=int(shape("decoder.conv_in.weight")[1]),
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state,
    )


def infer_config(state: Mapping[str, torch.Tensor], family: str | None = None) -> tuple[VAEConfig, list[str]]:
    """Config from the shapes of diffusers-keyed tensors; the latent normalization from `family`.

    Returns the config and notes on what was assumed rather than read.
    """
    notes: list[str] = []
    arch = architecture_from_shapes(state)
    decoder = arch.pop("decoder_channels")
    levels = len(arch["block_out_channels"])
    groups = 32  # every released LDM VAE; GroupNorm's group count leaves no trace in the weights
    if any(c % groups for c in (*arch["block_out_channels"], *decoder)):
        import math

        groups = math.gcd(*arch["block_out_channels"], *decoder, 32)
        notes.append(f"norm_num_groups cannot be read from weights; 32 does not divide the channels, using {groups}")
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    if families.by_keys(state.keys()) is families.FAMILIES[1]:  # FLUX.2: its statistics are in the weights
        if family is not None and family.lower() != "flux2":
            raise ConfigError(f"these are a FLUX.2 VAE's weights (batch-norm statistics): --family {family} does "
                              "not apply to them (drop it, or name --family flux2)")
        bn = int(state["bn.running_mean"].numel() if "bn.running_mean" in state else state["bn.running_var"].numel())
        patch = math_isqrt(bn // arch["latent_channels"])
        notes.append("FLUX.2 VAE (AutoencoderKLFlux2), identified by its batch-norm statistics; batch_norm_eps "
                     "1e-4 (diffusers' default: not in the weights)")
        cfg = Flux2Config(**blocks, norm_num_groups=groups, patch_size=(patch, patch),
                          decoder_block_out_channels=decoder if decoder != arch["block_out_channels"] else None,
                          **arch)
        return cfg, notes
    if decoder != arch["block_out_channels"]:
        raise WeightsError(f"the decoder's channels {list(decoder)} differ from the encoder's "
                           f"{list(arch['block_out_channels'])}: not an AutoencoderKL (an asymmetric FLUX.2 decoder "
                           "needs its config.json, _class_name AutoencoderKLFlux2)")
    cfg = VAEConfig(**blocks, norm_num_groups=groups, **arch)
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
    return apply_family(cfg, family), notes


def math_isqrt(n: int) -> int:
    import math

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


def check_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one WeightsError naming missing and unexpected keys and shape mismatches."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or wrong):
        return
    if unexpected and all(k.startswith("bn.") for k in unexpected):
        raise WeightsError(f"{source}: these weights hold a FLUX.2 VAE's batch-norm statistics ({', '.join(unexpected)}) "
                           f"but the config says {getattr(model, 'config', None).__class__.__name__ and model.config.class_name}: "
                           "a FLUX.2 VAE's config.json names _class_name AutoencoderKLFlux2 (loaded as AutoencoderKL, "
                           "its latents would be normalized wrongly)")

    def listing(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if wrong:
        parts.append(f"shape mismatches ({len(wrong)}): {listing(wrong)}")
    raise WeightsError(f"{source}: weights do not match the model config; " + "; ".join(parts))


def check_values(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse integer (quantized) or non-finite weights at load time: converted or used silently, they would
    give garbage or NaN for every image, blamed later on the inputs."""
    for kind, bad in (
        ("are not floating point (quantized weights are not supported)",
         [k for k, v in state.items() if not v.is_floating_point() and not k.endswith(".num_batches_tracked")]),
        ("hold NaN or Inf values (a damaged file?)", [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]),
    ):
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise WeightsError(f"{source}: {len(bad)} tensor(s) {kind}: {', '.join(sorted(bad)[:3])}{more}")


def _resolve_config(config: VAEConfig | Mapping[str, Any] | str | Path | None) -> VAEConfig | None:
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


def default_model_dir() -> Path:
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
    import os
    import stat

    from .files import file_kind

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


def load_vae(
    source: str | Path | None = None,
    config: VAEConfig | Mapping[str, Any] | str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> AutoencoderKL:
    """Load an AutoencoderKL in eval mode.

    source: None for vaecli's embedded default model; a diffusers model folder (config.json + weights), a
        pipeline folder with a vae/ subfolder, a single .safetensors/.ckpt/.pt/.bin file in diffusers or
        original LDM layout (a `first_stage_model.` or `vae.` prefix is stripped, so a whole SD checkpoint
        works), or a Hub id when huggingface_hub is installed (extra `hub`) and the files are cached or
        reachable: `owner/name` (a VAE repo or a pipeline repo's vae/) or `owner/name/path/file.safetensors`.
    subfolder, variant, revision: as diffusers' from_pretrained (e.g. subfolder="vae", variant="fp16").
    config: a VAEConfig, a config dict, a config.json path or a diffusers folder. Without one (and without a
        config.json beside the weights) the architecture is inferred from tensor shapes and the latent
        normalization taken from `family` ("sd", "sdxl", "sd3", "flux"; SD when not given, with a note).
    The model's `.info` (ModelInfo) names the file, layout, weights sha256 and every assumption made. It is
    returned in eval mode with frozen weights (`requires_grad` false): call `.requires_grad_(True)` to train.
    """
    name = str(source) if source is not None else DEFAULT_MODEL
    tiny = _tiny_source(Path(source).expanduser()) if source is not None and subfolder is None else None
    if tiny is not None:
        return _load_tiny(tiny, config, device, dtype, family)
    qwen = _qwen_source(Path(source).expanduser()) if source is not None and subfolder is None else None
    if qwen is not None:
        if config is not None or family is not None:
            raise ConfigError(f"{qwen} is a Qwen-Image VAE: its config and normalization come from its folder or "
                              "weights (drop config= / --family)")
        from .qwen_weights import load_qwen

        return load_qwen(qwen, dtype=dtype, device=device)
    weights_path, beside = locate(default_model_dir() if source is None else source, subfolder, variant, revision)
    raw = read_state_dict(weights_path)
    state, layout = to_diffusers_layout(raw)
    del raw
    notes: list[str] = []
    family_assumed = False
    cfg = _resolve_config(config)
    if cfg is not None:
        config_source = "given"
        if family is not None:
            cfg = apply_family(cfg, family)
    elif beside is not None:
        cfg = families.config_from_json(beside)
        config_source = "config.json"
        if family is not None:
            cfg = apply_family(cfg, family)
    else:
        cfg, notes = infer_config(state, family)
        family_assumed = family is None and not isinstance(cfg, Flux2Config)  # FLUX.2: read from its weights
        config_source = "inferred from shapes" + (f" + {family} preset" if family else "")
    check_architecture(cfg, state, str(weights_path))
    check_values(state, str(weights_path))
    sha = weights_sha256(state)
    with torch.device("meta"):
        model = build_model(cfg)
    check_keys(model, state, str(weights_path))
    if isinstance(cfg, Flux2Config):
        # The pipelines' normalization, computed as they compute it (float32): std = sqrt(running_var + eps).
        mean = state["bn.running_mean"].float()
        std = torch.sqrt(state["bn.running_var"].float() + cfg.batch_norm_eps)
        cfg = cfg.replace(bn_mean=tuple(mean.tolist()), bn_std=tuple(std.tolist()))
        model.config = cfg
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.info = ModelInfo(name, str(weights_path), layout, sha, config_source, tuple(notes), family_assumed)
    model = model.to(device=torch.device(device))
    # Frozen, in eval mode: encode/decode build no autograd graph (no memory held for a backward pass)
    # unless the input requires grad or the caller unfreezes the weights to fine-tune.
    model.requires_grad_(False)
    # Weights stay NCHW (diffusers' layout); a plan's layout is applied by whoever runs the model with
    # that plan (plans.apply_layout, Runner).
    return model.eval()


def _config_class(folder: Path) -> str | None:
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


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file (header only); [] for other or unreadable files."""
    if path.suffix.lower() != ".safetensors":
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable: the regular path names the problem
        return []


def _tiny_source(path: Path) -> Path | None:
    """`path` when it names a tiny autoencoder (AutoencoderTiny folder, TAESD pair or either half, a
    tiny-keyed weights file), else None; a half without its other half raises WeightsError."""
    from .tiny_weights import CLASS_NAME, find_tiny_pair, is_tiny_state

    if path.is_dir():
        if regular_file(path / "config.json"):
            return path if _config_class(path) == CLASS_NAME else None
        return path if find_tiny_pair(path) is not None else None
    if not regular_file(path):
        return None
    if find_tiny_pair(path) is not None:
        return path
    keys = _safetensors_keys(path)
    return path if keys and is_tiny_state(keys) else None


def _qwen_source(path: Path) -> Path | None:
    """`path` when it names a Qwen-Image (or other Wan-style) VAE: a folder whose config.json says
    AutoencoderKLQwenImage or AutoencoderKLWan (refused by the Qwen loader with its reason), or a weights
    file with Wan-style keys; else None."""
    from .qwen_weights import CLASS_NAME, is_qwen_state

    if path.is_dir():
        return path if _config_class(path) in (CLASS_NAME, "AutoencoderKLWan") else None
    keys = _safetensors_keys(path) if regular_file(path) else []
    return path if keys and is_qwen_state(keys) else None


def _load_tiny(path: Path, config: Any, device: str | torch.device, dtype: torch.dtype,
               family: str | None) -> torch.nn.Module:
    from .tiny_weights import load_tiny

    if config is not None:
        raise ConfigError(f"{path} is a tiny autoencoder (AutoencoderTiny): its config comes from its folder or "
                          "its weights, not from config=")
    space = None
    if family is not None:
        space = family.lower()
        if space not in (*FAMILY_PRESETS, "flux2"):
            raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join((*FAMILY_PRESETS, 'flux2'))}")
    model = load_tiny(path, dtype=dtype, device=device)
    info = model.info
    notes = info.notes + ((f"decodes {space} latents (--family {space}): files of another family are refused",)
                          if space else ())
    model.info = ModelInfo(info.name, info.path, info.layout, info.weights_sha256, info.config_source, notes,
                           latent_space=space)
    return model


def save_vae(model: AutoencoderKL, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers model folder (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = folder / FOLDER_WEIGHTS[0]
    save_file(state, str(path))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return path
