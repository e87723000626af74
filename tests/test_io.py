"""io and metrics units: SSIM/PSNR against references, atomic writes, size policies, latent files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaecli.batch import apply_size_policy, undo_size_policy
from vaecli.files import atomic_write
from vaecli.latents import latent_is_complete, read_latent, write_latent
from vaecli.metrics import PSNR_CAP, max_abs_error, psnr, ssim


def pair(h: int = 48, w: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_ssim_matches_scikit_image():
    from skimage import metrics  # the test extra installs scikit-image: this check always runs
    a, b = pair()
    want = metrics.structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )
    assert ssim(a, b) == pytest.approx(want, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_small_images_and_psnr():
    a, b = pair(5, 7)
    assert -1 <= ssim(a, b) <= 1
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr(a, a) == PSNR_CAP
    assert max_abs_error(a, b) == int(np.abs(a.astype(int) - b.astype(int)).max())


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("policy", ["pad", "crop", "resize"])
@pytest.mark.parametrize("size", [(179, 179), (333, 500), (8, 16), (3, 5)])
def test_size_policy_round_trip(policy, size):
    h, w = size
    x = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
    if policy == "crop" and min(h, w) < 8:
        return
    y, undo = apply_size_policy(x, 8, policy)
    assert y.shape[0] % 8 == 0 and y.shape[1] % 8 == 0
    meta = {"size_policy": policy, "original_width": str(w), "original_height": str(h)}
    back = undo_size_policy(y, meta)
    if policy == "pad":
        np.testing.assert_array_equal(back, x)
    elif policy == "resize":
        assert back.shape == x.shape
    else:
        assert back.shape == (h // 8 * 8, w // 8 * 8, 3)


def test_latent_file_round_trip(tmp_path):
    z = torch.randn(4, 3, 5)
    write_latent(tmp_path / "z.safetensors", z, {"format": "vaecli.latent", "k": "v"})
    meta = latent_is_complete(tmp_path / "z.safetensors")
    assert meta is not None and meta["k"] == "v"
    lf = read_latent(tmp_path / "z.safetensors")
    assert torch.equal(lf.tensor, z) and lf.meta == meta
    np.save(tmp_path / "z.npy", z[None].numpy())
    lf = read_latent(tmp_path / "z.npy")
    assert torch.equal(lf.tensor, z) and lf.meta is None


@pytest.mark.parametrize("orientation, size", [(1, (40, 24)), (6, (24, 40)), (8, (24, 40)), (3, (40, 24))])
def test_image_size_from_the_header_follows_exif_orientation(tmp_path, orientation, size):
    """The size the batch engine groups by, before decoding: as displayed, which is what read_image gives."""
    from PIL import Image

    from vaecli.io import image_size, read_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "x.jpg"
    Image.new("RGB", (40, 24), (200, 10, 10)).save(path, exif=exif.tobytes())
    with open(path, "rb") as fh:
        assert image_size(fh) == size
    assert read_image(path).shape[:2] == size[::-1]


def test_latent_shape_from_the_header(tmp_path):
    import numpy as np

    from vaecli.latents import latent_shape

    np.save(tmp_path / "z.npy", np.zeros((1, 4, 5, 7), dtype=np.float16))
    with open(tmp_path / "z.npy", "rb") as fh:
        assert latent_shape(fh, ".npy") == (4, 5, 7)
