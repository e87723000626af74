"""Latent files in the layouts other tools read: kohya-ss sd-scripts .npz caches and ComfyUI .latent files.

Both hold *raw* VAE latents (no scaling_factor): kohya multiplies by the VAE scale factor in its training
loop (`latents * self.vae_scale_factor`, train_network.py), and ComfyUI's LATENT samples are raw (its
model applies the latent format's `process_in` when sampling).

kohya (library/strategy_base.py save_latents_to_disk / _default_load_latents_from_disk):
  `latents` float32 (C, h, w), `original_size` int [W, H], `crop_ltrb` [l, t, r, b] (kohya's own meaning,
  see dataset.kohya_crop_ltrb), `latents_flipped` float32 (C, h, w) with flip augmentation.
  File name `<image stem>.npz`: current sd-scripts (library/strategy_sd.py get_latents_npz_path) use this
  "old" name whenever it exists, before falling back to `<stem>_<WWWW>x<HHHH>_sd.npz` / `_sdxl.npz`, and
  older releases know only this name, so one name serves both.
ComfyUI (nodes.py SaveLatent / LoadLatent):
  safetensors {`latent_tensor`: (1, C, h, w), `latent_format_version_0`: empty tensor}; without the
  marker LoadLatent multiplies by 1/0.18215 (files of the first format held scaled latents).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

KOHYA_KEYS = ("latents", "original_size", "crop_ltrb", "latents_flipped")
COMFYUI_TENSOR = "latent_tensor"
COMFYUI_MARKER = "latent_format_version_0"


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


def comfyui_tensors(latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ComfyUI .latent file's tensors for one raw (C, h, w) latent."""
    return {
        COMFYUI_TENSOR: latent.float().cpu().unsqueeze(0).contiguous(),  # (C, h, w) -> (1, C, h, w)
        COMFYUI_MARKER: torch.tensor([]),  # present: LoadLatent takes the values as they are
    }
