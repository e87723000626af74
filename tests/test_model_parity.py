"""Our AutoencoderKL against diffusers' on identical random weights: encode moments, decode, forward."""

from __future__ import annotations

import pytest
import torch

import vaecli
from conftest import twin_of
from vaecli.models.kl import AutoencoderKL

TOL = dict(atol=1e-5, rtol=0)  # fp32, max abs error

CONFIGS = {
    "sd-like-groups8": dict(block_out_channels=[16, 32, 32, 32], layers_per_block=2, norm_num_groups=8),
    "flux-like-16ch-no-quant": dict(
        block_out_channels=[32, 32, 64], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        norm_num_groups=16,
    ),
    "no-mid-attention-layers1": dict(
        block_out_channels=[32, 64], layers_per_block=1, mid_block_add_attention=False, norm_num_groups=32,
    ),
    "layers3-groups4-gelu": dict(block_out_channels=[8, 16, 16], layers_per_block=3, norm_num_groups=4, act_fn="gelu"),
    "rgba-in-out": dict(block_out_channels=[16, 16], in_channels=4, out_channels=4, norm_num_groups=8),
}


def pair(reference, **config):
    ref = reference(**config)
    return ref, twin_of(ref)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [(32, 48), (40, 24)])
def test_parity(reference, name, size):
    ref, ours = pair(reference, **CONFIGS[name])
    torch.manual_seed(1)
    x = torch.rand(2, ref.config.in_channels, *size) * 2 - 1
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x)
        torch.testing.assert_close(mine.mean, theirs.mean, **TOL)
        torch.testing.assert_close(mine.logvar, theirs.logvar, **TOL)
        torch.testing.assert_close(mine.std, theirs.std, **TOL)
        z = theirs.mean
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **TOL)
        torch.testing.assert_close(ours(x), ref(x).sample, **TOL)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        torch.testing.assert_close(
            ours(x, sample_posterior=True, generator=g1), ref(x, sample_posterior=True, generator=g2).sample, **TOL
        )


def test_small_models_bit_identical_through_load_vae(reference, tmp_path):
    """load_vae keeps diffusers' NCHW layout, and the default plan is diffusers' exact sequence of operations."""
    ref = reference(**CONFIGS["sd-like-groups8"])
    ref.save_pretrained(tmp_path)
    vae = vaecli.load_vae(tmp_path)
    assert vae.encoder.conv_in.weight.is_contiguous()  # NCHW on the CPU
    x = torch.rand(1, 3, 64, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x).mean, ref.encode(x).latent_dist.mean)
        z = torch.randn(1, 4, 8, 5)
        assert torch.equal(vae.decode(z), ref.decode(z).sample)


def test_posterior_statistics(reference):
    ref, ours = pair(reference, **CONFIGS["no-mid-attention-layers1"])
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x)
        torch.testing.assert_close(mine.var, theirs.var, **TOL)
        torch.testing.assert_close(mine.mode(), theirs.mode(), **TOL)
        torch.testing.assert_close(mine.kl(), theirs.kl(), atol=1e-3, rtol=1e-5)
        other_ref = ref.encode(x.flip(-1)).latent_dist
        other = ours.encode(x.flip(-1))
        torch.testing.assert_close(mine.kl(other), theirs.kl(other_ref), atol=1e-3, rtol=1e-5)
        s = theirs.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(mine.nll(s), theirs.nll(s), atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(
            mine.sample(torch.Generator().manual_seed(3)), s, **TOL
        )


def test_logvar_clamped(tiny_model):
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    post = vaecli.DiagonalGaussian(moments)
    assert post.logvar.max().item() == 20.0
    moments[:, 4:] = -100.0
    assert vaecli.DiagonalGaussian(moments).logvar.min().item() == -30.0
    assert tiny_model(block_out_channels=(8,), norm_num_groups=4).config.downsample_factor == 1


def test_gradient_checkpointing_same_gradients(reference):
    _, ours = pair(reference, **CONFIGS["sd-like-groups8"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours(x, checkpointing=checkpointing).square().mean().backward()
        grads.append(ours.encoder.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_half_precision_groupnorm_runs_in_fp32(reference):
    """Under bf16 the norms accumulate in fp32: output stays close to the fp32 reference."""
    ref, ours = pair(reference, **CONFIGS["sd-like-groups8"])
    half = AutoencoderKL(ours.config).eval()
    half.load_state_dict(ours.state_dict())
    half = half.to(torch.bfloat16)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out = half.decode(z.bfloat16()).float()
        torch.testing.assert_close(out, ref.decode(z).sample, atol=0.1, rtol=0.05)
