"""Size policies: how an image whose sides are not multiples of the model's factor is made to fit (pad,
crop, resize), what size the model sees, and how a decoded image is taken back to the original size."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..choices import SIZE_POLICIES
from ..errors import ConfigError, InputError
from ..latents import meta_json


def check_size_policy(policy: str) -> None:
    """ConfigError for a policy that is none of SIZE_POLICIES (before anything is read)."""
    if policy not in SIZE_POLICIES:
        raise ConfigError(f"unknown size policy {policy!r}; choose one of {', '.join(SIZE_POLICIES)}")


def apply_size_policy(pixels: np.ndarray, factor: int, policy: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Make both sides of (H, W, 3) multiples of `factor`; return the result and how to undo it."""
    h, w = pixels.shape[:2]
    if policy == "pad":
        ph, pw = -h % factor, -w % factor
        # Replicating the edge adds no new structure for the encoder to spend latent capacity on.
        out = np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else pixels
        return out, {"pad_right": pw, "pad_bottom": ph, "mode": "replicate"}
    if policy == "crop":
        nh, nw = h // factor * factor, w // factor * factor
        if nh == 0 or nw == 0:
            raise InputError(f"image is {w}x{h}, smaller than {factor} pixels: --size-policy crop leaves nothing")
        top, left = (h - nh) // 2, (w - nw) // 2
        return pixels[top : top + nh, left : left + nw], {"crop_ltrb": [left, top, left + nw, top + nh]}
    if policy == "resize":
        nh, nw = encoded_side(h, factor, policy), encoded_side(w, factor, policy)
        return resample(pixels, nh, nw), {"resample": "bicubic-antialias"}
    raise ConfigError(f"unknown size policy {policy!r}; choose one of {', '.join(SIZE_POLICIES)}")


def encoded_side(side: int, factor: int, policy: str) -> int:
    """The side the model sees for an original side under a size policy (what apply_size_policy makes)."""
    if policy == "pad":
        return side + -side % factor
    if policy == "crop":
        return side // factor * factor
    return max(factor, round(side / factor) * factor)  # resize


def _meta_int(meta: Mapping[str, str], key: str) -> int:
    value = meta.get(key, "")
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9 and int(value) > 0):
        raise InputError(f"latent metadata '{key}' must be a positive whole number, not {value!r}")
    return int(value)


def decoded_size(meta: Mapping[str, str], h: int, w: int, factor: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of the image a (C, h, w) latent with our metadata decodes to, after its size policy.

    Every size in the metadata is checked against the latent's shape and the policy (an encoder could have
    written it), and the result against max_pixels (0: no limit), before anything is decoded.
    """
    policy = meta.get("size_policy", "pad")
    if policy not in SIZE_POLICIES:
        raise InputError(f"latent metadata names an unknown size policy {policy!r}")
    eh, ew = h * factor, w * factor
    # the multiple the size policy used: FLUX.2 pads to 16 pixels even where its raw latents have 8-pixel cells
    multiple = _meta_int(meta, "size_multiple") if "size_multiple" in meta else factor
    for key, side in (("encoded_height", eh), ("encoded_width", ew)):
        if key in meta and _meta_int(meta, key) != side:
            raise InputError(
                f"latent metadata '{key}' is {meta[key]} but the latent's shape {h}x{w} decodes to {side}: "
                "the file is inconsistent (or made for a VAE with another downsample factor)"
            )
    oh, ow = _meta_int(meta, "original_height"), _meta_int(meta, "original_width")
    if policy == "crop":
        _check_crop_box(meta, eh, ew, oh, ow)
        size = (eh, ew)
    else:
        if encoded_side(oh, multiple, policy) != eh or encoded_side(ow, multiple, policy) != ew:
            raise InputError(
                f"latent metadata says the original was {ow}x{oh} ({policy}), which does not give the latent's "
                f"{ew}x{eh} pixels: the file is inconsistent"
            )
        size = (oh, ow)
    if max_pixels > 0 and size[0] * size[1] > max_pixels:
        raise InputError(
            f"decodes to {size[1]}x{size[0]} pixels, above the limit of {max_pixels / 1e6:.1f} MP; "
            f"pass --max-pixels {size[0] * size[1]} to decode it"
        )
    return size


def _check_crop_box(meta: Mapping[str, str], eh: int, ew: int, oh: int, ow: int) -> None:
    """crop_ltrb, when recorded, spans exactly the encoded size inside the (resized) original."""
    if "size_params" not in meta:
        return
    params = meta_json(meta, "size_params")
    box = params.get("crop_ltrb") if isinstance(params, dict) else None
    if box is None:
        return
    bound = params.get("resized_size", [ow, oh])
    ok = (
        isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        and isinstance(bound, list) and len(bound) == 2 and all(isinstance(v, int) for v in bound)
    )
    inside = ok and min(box) >= 0 and box[2] <= bound[0] and box[3] <= bound[1]
    if not inside or box[2] - box[0] != ew or box[3] - box[1] != eh:
        raise InputError(f"latent metadata 'size_params' crop_ltrb {box} does not match the latent's {ew}x{eh} pixels")


def undo_size_policy(pixels: np.ndarray, meta: Mapping[str, str]) -> np.ndarray:
    """A decoded (H', W', 3) image back at the original size recorded in latent metadata.

    pad: cropped back exactly; resize: resampled back; crop: the pixels cut away are gone, so the image
    keeps the size of the region that was encoded (recorded as crop_ltrb in original coordinates).
    """
    policy = meta.get("size_policy", "pad")
    if policy == "crop":
        return pixels
    return restore_size(pixels, policy, (_meta_int(meta, "original_height"), _meta_int(meta, "original_width")))


def restore_size(pixels: np.ndarray, policy: str, size: tuple[int, int]) -> np.ndarray:
    """Undo pad (crop back) or resize (resample back) to size (height, width); crop keeps the pixels."""
    oh, ow = size
    if policy == "pad":
        if pixels.shape[0] < oh or pixels.shape[1] < ow:
            raise InputError(
                f"decoded image {pixels.shape[1]}x{pixels.shape[0]} is smaller than the recorded original "
                f"{ow}x{oh}: the latent does not match its metadata"
            )
        return pixels[:oh, :ow]
    if policy == "resize":
        return resample(pixels, oh, ow) if pixels.shape[:2] != (oh, ow) else pixels
    if policy == "crop":
        return pixels
    raise InputError(f"latent metadata names an unknown size policy {policy!r}")


def resample(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resampling (antialiased when shrinking) of float (H, W, 3) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp_(0.0, 1.0).contiguous().numpy()  # (1, 3, h, w) -> (h, w, 3)


def prepare_pixels(
    pixels: np.ndarray, factor: int, policy: str, multiple: int = 0
) -> tuple[np.ndarray, tuple[int, int], dict[str, Any]]:
    """(pixels for the batch, (height, width) the model sees, how to undo it): apply_size_policy, except
    that pad leaves the pixels as they are, since the batch is padded on the device (staging.py), and
    may pad further, to a multiple of `multiple` (a multiple of factor), so more images share a size."""
    h, w = pixels.shape[:2]
    if policy == "pad":
        step = math.lcm(factor, multiple) if multiple else factor
        eh, ew = h + -h % step, w + -w % step
        return pixels, (eh, ew), {"pad_right": ew - w, "pad_bottom": eh - h, "mode": "replicate"}
    if policy == "resize" and pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / np.float32(255.0)  # resampled in float, as read_image's pixels
    out, undo = apply_size_policy(pixels, factor, policy)
    return out, (out.shape[0], out.shape[1]), undo


def encoded_size(h: int, w: int, factor: int, policy: str, multiple: int = 0) -> tuple[int, int]:
    """The (height, width) prepare_pixels gives an h x w image."""
    if policy == "pad" and multiple:
        step = math.lcm(factor, multiple)
        return h + -h % step, w + -w % step
    return encoded_side(h, factor, policy), encoded_side(w, factor, policy)
