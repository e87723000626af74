"""Reconstruction quality on 8-bit RGB: PSNR, SSIM (Wang et al. 2004) and max abs error."""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0  # identical images have infinite PSNR; reported as this so JSON stays standard


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape, over all pixels and channels (peak 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse))


def max_abs_error(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference of any pixel channel, in 8-bit levels."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0))


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(x**2) / (2.0 * sigma**2))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (C, H, W) with the 1-D window w along H then W."""
    k = w.shape[0]
    h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(w[i] * x[:, i : i + h, :] for i in range(k))  # (C, H-k+1, W)
    return sum(w[i] * rows[:, :, i : i + wd] for i in range(k))  # (C, H-k+1, W-k+1)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two uint8 (H, W, C) images: Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03, L=255.

    As Wang et al.'s reference code: statistics over 'valid' windows only, averaged over positions and
    channels. Images smaller than the window use the largest odd window that fits.
    """
    x = np.moveaxis(a.astype(np.float64), -1, 0)  # (H, W, C) -> (C, H, W)
    y = np.moveaxis(b.astype(np.float64), -1, 0)
    size = min(window, x.shape[1], x.shape[2])
    size -= 1 - size % 2  # odd
    w = _gaussian(size, sigma)
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)
    xx = _filter_valid(x * x, w) - mu_x**2
    yy = _filter_valid(y * y, w) - mu_y**2
    xy = _filter_valid(x * y, w) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (xx + yy + c2)
    return float(np.mean(num / den))


def diff_map(a: np.ndarray, b: np.ndarray, gain: float) -> np.ndarray:
    """|a - b| amplified by `gain`, as a uint8 image of the same shape (black = identical)."""
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)) * gain
    return np.clip(np.rint(d), 0, 255).astype(np.uint8)
