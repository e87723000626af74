"""Tiling on a real photo with the default model: tiled results against untiled ones."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaecli
from vaecli.plans import REFERENCE
from vaecli.tiling import Grid, tiled_decode, tiled_encode_moments

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two [-1, 1] images after 8-bit quantisation (what saved files would show)."""
    qa, qb = ((a.clamp(-1, 1) + 1) * 127.5).round(), ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def case():
    vae = vaecli.load_vae()
    x = torch.from_numpy(np.asarray(Image.open(PHOTO).convert("RGB")).copy()).permute(2, 0, 1)[None]
    x = x.float() / 127.5 - 1
    x = x[..., : x.shape[-2] // 8 * 8, : x.shape[-1] // 8 * 8]
    with torch.no_grad():
        z = vae.encode_moments(x)[:, :4]
        return vae, x, z, vae.decode(z)


def test_tiled_decode_matches_untiled(case):
    vae, _, z, ref = case
    with torch.no_grad():
        y, report = tiled_decode(vae, z, 128, 32)
    h, w = z.shape[-2:]
    assert report.grid == (len(Grid.fit(h, 16, 4).starts), len(Grid.fit(w, 16, 4).starts))  # 16-cell tiles
    assert report.tiles == report.grid[0] * report.grid[1] > 6
    assert y.shape == ref.shape
    assert psnr(y, ref) >= 45.0
    assert (y - ref).abs().max() < 0.1  # worst pixel: under 13 of 255 levels


def test_tiled_encode_matches_untiled(case):
    vae, x, z, ref = case
    with torch.no_grad():
        moments, report = tiled_encode_moments(vae, x, 128, 32)
        assert report.tiles > 6
        assert (moments[:, :4] - z).abs().max() < 0.05 * z.abs().max()
        assert psnr(vae.decode(moments[:, :4]), ref) >= 45.0


def test_tiles_of_several_images_keep_their_own_statistics(case):
    """Two different images tiled in one call give what each gives alone."""
    vae, x, z, _ = case
    other = torch.flip(x, dims=[-1]) * 0.5 - 0.3  # another image: mirrored, darker, lower contrast
    with torch.no_grad():
        z2 = vae.encode_moments(other)[:, :4]
        both, _ = tiled_decode(vae, torch.cat([z, z2]), 128, 32)
        alone, _ = tiled_decode(vae, z2, 128, 32)
    torch.testing.assert_close(both[1:], alone, atol=2e-3, rtol=0)


def test_fused_layers_compute_the_same(tiny_model):
    """Running norm-free layers inside the neighbouring resnets' sweeps (_Lockstep.run) gives what running
    every layer as its own lockstep step gives, on a model with two resnets per level."""
    from vaecli.tiling import _Lockstep

    vae = tiny_model(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8)
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 80, 112) * 2 - 1, 5, 1, 2)
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        trunk = dec.trunk(vae.encode_moments(x)[:, :4])
        cases = [
            (x, 4, [enc.conv_in, *(m for b in enc.down_blocks for m in (*b.resnets, *(b.downsamplers or [])))],
             (enc.conv_in,)),
            (trunk, 1, [m for b in dec.up_blocks for m in (*b.resnets, *(b.upsamplers or []))],
             (dec.up_blocks[1].upsamplers[0],)),
        ]
        for src, scale, modules, recompute in cases:
            fused, plain = _Lockstep(src, scale, 8, 4, 4, REFERENCE), _Lockstep(src, scale, 8, 4, 4, REFERENCE)
            fused.start()
            plain.start()
            assert len(fused.chunks) > 2
            fused.run(modules, recompute)
            for m in modules:
                plain.step(m)
            for a, b in zip(fused.chunks, plain.chunks, strict=True):
                assert a.x.shape == b.x.shape
                torch.testing.assert_close(a.x.float(), b.x.float(), atol=5e-3 * b.x.float().abs().max().item(), rtol=0)


def test_per_tile_statistics_are_the_worse_fallback(case):
    """The memory fallback (each tile normalized by itself, as other tools do) is measurably worse: the
    bounds above separate it from whole-image statistics."""
    vae, _, z, ref = case
    with torch.no_grad():
        y, _ = tiled_decode(vae, z, 128, 32, whole_image_stats=False)
    assert y.shape == ref.shape and psnr(y, ref) < 40.0


def test_tiling_runs_the_plans_layout_and_kernels(monkeypatch, tiny_model):
    """Tiles take the plan: its layout for every tile, and with kernels on, the Triton GroupNorm kernels both
    for the pooled statistics (moments of each tile's owned cells) and for normalizing by them (apply)."""
    pytest.importorskip("triton")
    from vaecli.kernels import groupnorm_silu as gn
    from vaecli.plans import plan_for

    vae = tiny_model(block_out_channels=(16, 16), norm_num_groups=4)
    cfg = vae.config
    z = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 8, 8), 3, 1, 1) * 3
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 16, 16) * 2 - 1, 3, 1, 1)
    used = {"moments": 0, "apply": 0}
    for name in used:
        real = getattr(gn, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            used[_name] += int(gn.supported(args[0], args[1] if _name == "moments" else args[1].shape[1]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(gn, name, counted)
    # CUDA plans on CPU tensors: NHWC tiles with the kernels, NCHW without
    on, off = plan_for("cuda", cfg, "on"), plan_for("cuda", cfg, "off")
    with torch.no_grad():
        y_on, rep = tiled_decode(vae, z, 12, 4, plan=on)  # f = 2: 2x2 tiles of 6 cells on an 8x8 latent
        y_off, _ = tiled_decode(vae, z, 12, 4, plan=off)
        m_on, _ = tiled_encode_moments(vae, x, 12, 4, plan=on)
        m_off, _ = tiled_encode_moments(vae, x, 12, 4, plan=off)
    assert rep.tiles > 1 and used["moments"] > 0 and used["apply"] > 0
    # Tiles wait between layers in fp16: last-bit differences of the two norm implementations can round
    # to neighbouring fp16 values, hence a tolerance of a few fp16 ulps.
    torch.testing.assert_close(y_on, y_off, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(m_on, m_off, atol=2e-3, rtol=1e-3)
