"""Strict loading shared by every family: refuse weights whose keys, shapes or values do not fit the model
(STYLE.md rule 4: a mismatch raises and names the missing and unexpected keys), then load them frozen."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

from .errors import WeightsError

M = TypeVar("M", bound=torch.nn.Module)

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
        said = getattr(getattr(model, "config", None), "class_name", None)
        raise WeightsError(f"{source}: these weights hold a FLUX.2 VAE's batch-norm statistics "
                           f"({', '.join(unexpected)}) but the config says {said}: a FLUX.2 VAE's config.json names "
                           "_class_name AutoencoderKLFlux2 (loaded as AutoencoderKL, its latents would be normalized "
                           "wrongly)")

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
        ("hold NaN or Inf values (a damaged file?)",
         [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]),
    ):
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise WeightsError(f"{source}: {len(bad)} tensor(s) {kind}: {', '.join(sorted(bad)[:3])}{more}")


def assign_frozen(model: M, state: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device) -> M:
    """Load `state` (already checked against the meta-device `model`) into it, floating-point tensors in
    `dtype`, on `device`, in eval mode and frozen: encode/decode then build no autograd graph (no memory held
    for a backward pass) unless the input requires grad or the caller unfreezes the weights to fine-tune.
    Integer buffers (FLUX.2's bn.num_batches_tracked) keep their dtype."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=torch.device(device))
    model.requires_grad_(False)
    return model.eval()
