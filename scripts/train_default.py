"""Train vaecli's embedded default model: a small SD-layout AutoencoderKL (8x down, 4 latent channels).

Everything that decides the result is in this file and in scripts/default_data.py (the images, with the
source and licence of each): the architecture, the losses, the optimizer, the schedule and the seed. Where
to write, how many steps, the device and how many CPU threads are arguments. The shipped weights (version 2)
fine-tune version 1 (the weights of commit bfe7a13, trained from scratch with RECIPE on photographs and
wallpapers) on the mixed training set of scripts/default_data.py with MIXED:

    python scripts/default_data.py --cache ~/.cache/vaecli-default-data        # images: fetch and render
    for f in diffusion_pytorch_model.safetensors config.json; do
        git show bfe7a13:vaecli/default_model/$f > /tmp/v1/$f; done
    nice -n 19 python scripts/train_default.py --out /tmp/train/v2 --init /tmp/v1 --steps 2000 --threads 1
    python scripts/train_default.py --out /tmp/train/v2 --export vaecli/default_model

On a GPU, `--device cuda` trains in bfloat16 autocast (weights, optimizer and EMA stay float32); a larger
`--batch` is then the way to use it. One CPU thread, because the shipped model was trained niced on a
2-core machine shared with other jobs: with two threads every parallel region waits for the thread that
shares a core with a higher-priority process, which made steps ~10x slower than with one thread.

Checkpoints (EMA weights, fp32) go to <out>/. The best checkpoint by PSNR on fixed crops of the *training*
images (validation images are never trained on, nor used to pick a checkpoint) is exported with `--export`,
which also measures the scaling factor on the training images and checks fp16/bf16 encoding and decoding
for overflow on crops of validation images.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import default_data  # noqa: E402
from vaecli.config import VAEConfig  # noqa: E402
from vaecli.models.kl import AutoencoderKL, DiagonalGaussian  # noqa: E402
from vaecli.weights import load_vae, save_vae  # noqa: E402

SEED = 20261126

# The architecture: SD's VAE module structure (4 levels, mid attention, quant convs) at small width.
CONFIG = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 128, 128),  # SD: (128, 256, 512, 512)
    layers_per_block=1,  # SD: 2
    latent_channels=4,
    norm_num_groups=16,  # SD: 32; 16 keeps >= 2 channels per group at 32 channels
    sample_size=512,
    scaling_factor=1.0,  # measured after training, see export()
    shift_factor=None,
    force_upcast=False,  # decided after training, see export()
)


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters (steps come from the command line)."""

    batch: int = 4  # crops per step
    crop_sizes: tuple[int, ...] = (64, 96, 128)  # one drawn per step, shared by the batch
    scale_range: tuple[float, float] = (0.35, 1.0)  # crop side in source pixels = crop / scale, then resized
    lr: float = 3e-4  # AdamW peak learning rate
    lr_min: float = 2e-5  # cosine floor
    warmup: int = 60  # linear warm-up steps
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    w_l1: float = 1.0  # mean absolute error on [-1, 1] pixels
    w_ssim: float = 0.2  # 1 - SSIM (11x11 Gaussian window, sigma 1.5) on [0, 1] pixels
    w_mse: float = 0.0  # mean squared error on [-1, 1] pixels (what PSNR measures)
    w_kl: float = 2e-6  # per-pixel KL: summed KL / (H * W * 3)
    w_colour: float = 0.0  # MSE of the 8x8 means (one per latent cell): colour and tone where detail is lost
    hue_rotate: float = 0.0  # probability of rotating a crop's hue by a random angle (YIQ chroma plane)
    ema: float = 0.998  # EMA decay of the weights that are checkpointed and shipped
    val_every: int = 200  # steps between validation + checkpoint


# Version 1's first stage (from scratch, photographs and wallpapers; see MODEL_CARD.md for its second stage).
RECIPE = Recipe()
# Version 2: fine-tunes version 1 on the mixed set. Screens, scans and noisy pictures are mostly cropped at
# their native scale (NATIVE): resampling would blur the pixel-sharp text and the noise that make them what
# they are. The MSE term optimises what PSNR measures.
# Version 1 turned saturated greens grey-brown (pure green came back as (58, 105, 98)): the colour term and
# random hue rotations (which turn every photo's reds and blues into greens and teals too) aim at that.
MIXED = Recipe(lr=2e-4, lr_min=1e-5, warmup=100, w_mse=2.0, w_colour=4.0, hue_rotate=0.3, val_every=250)
# Share of each kind among training crops (within a kind, the listing's weights), and the probability that a
# crop of that kind is taken at native scale instead of a random downscale in scale_range.
KIND_SHARE = {"photo": 0.3, "scan": 0.15, "art": 0.2, "screen": 0.2, "noisy": 0.15}
NATIVE = {"photo": 0.25, "scan": 0.6, "art": 0.5, "screen": 0.75, "noisy": 0.85}
INIT_LOGVAR = -6.0  # initial bias of the log-variance half of quant_conv (from-scratch runs only)


# ------------------------------------------------------------------------------------------------- losses


def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of (N, C, H, W) images in [0, 1] (Gaussian 11x11 window, sigma 1.5, valid region)."""
    c = a.shape[1]
    g = _gauss_window().to(a)
    wx = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)  # (C, 1, 1, 11)
    wy = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)  # (C, 1, 11, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a**2
    sbb = blur(b * b) - mu_b**2
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean()


def loss_terms(model: AutoencoderKL, x: torch.Tensor, gen: torch.Generator, r: Recipe) -> dict[str, torch.Tensor]:
    """Reconstruction and KL losses of a batch in [-1, 1]; 'total' is the weighted sum."""
    post = DiagonalGaussian(model.encode(x).moments.float())  # fp32 KL and noise under autocast
    y = model.decode(post.sample(gen)).float()
    l1 = (y - x).abs().mean()
    mse = (y - x).pow(2).mean()
    s = ssim((y.float().clamp(-1, 1) + 1) / 2, (x.float() + 1) / 2)
    kl = post.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
    colour = (F.avg_pool2d(y, 8) - F.avg_pool2d(x.float(), 8)).pow(2).mean()
    total = r.w_l1 * l1 + r.w_mse * mse + r.w_ssim * (1 - s) + r.w_kl * kl + r.w_colour * colour
    return {"total": total, "l1": l1, "mse": mse, "ssim": s, "kl": kl, "colour": colour}


# --------------------------------------------------------------------------------------------------- data


def load_rgb(path: Path) -> torch.Tensor:
    """A (3, H, W) uint8 tensor of an image of the listing."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(c: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the chroma of a (3, H, W) RGB crop by `angle` in the YIQ plane (luma kept; clamped later)."""
    cos, sin = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    m = torch.linalg.inv(RGB_TO_YIQ) @ rot @ RGB_TO_YIQ  # (3, 3): RGB -> RGB
    return torch.einsum("ij,jhw->ihw", m, c)


class Crops:
    """Random augmented crops from the training images, held in memory as uint8 tensors."""

    def __init__(self, entries: list[default_data.Entry], seed: int) -> None:
        self.images = [load_rgb(e.path) for e in entries]
        self.kinds = [e.kind for e in entries]
        self.grey = [bool((im[0] == im[1]).all() and (im[1] == im[2]).all()) for im in self.images]
        per_kind = {k: sum(e.weight for e in entries if e.kind == k) for k in KIND_SHARE}
        w = np.array([KIND_SHARE[e.kind] * e.weight / per_kind[e.kind] for e in entries])
        self.probs = w / w.sum()
        self.rng = np.random.default_rng(seed)

    def crop(self, size: int, r: Recipe, i: int | None = None) -> torch.Tensor:
        """One augmented (3, size, size) crop in [-1, 1] (of image i, or of one drawn by weight)."""
        rng = self.rng
        if i is None:
            i = int(rng.choice(len(self.images), p=self.probs))
        img = self.images[i]
        _, h, w = img.shape
        scale = 1.0 if rng.random() < NATIVE[self.kinds[i]] else rng.uniform(*r.scale_range)
        side = min(int(round(size / scale)), h, w)
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        c = img[:, y0:y0 + side, x0:x0 + side].float().div(255).unsqueeze(0)  # (1, 3, side, side)
        if side != size:  # also upscales images smaller than the crop
            c = F.interpolate(c, size=(size, size), mode="bicubic", antialias=side > size, align_corners=False)
        c = c[0].clamp(0, 1)
        if rng.random() < 0.5:
            c = c.flip(2)
        if rng.random() < 0.2 and self.kinds[i] != "screen":  # upside-down text is not what screens show
            c = c.flip(1)
        if rng.random() < 0.25 and self.kinds[i] != "screen":
            c = c.transpose(1, 2)
        if self.grey[i] and rng.random() < 0.7:  # grey images: a random tint so colour is seen too
            c = c * torch.from_numpy(rng.uniform(0.6, 1.0, size=(3, 1, 1))).float()
        # colour jitter: brightness, contrast, saturation
        mean = c.mean()
        c = (c - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.9, 1.1)
        grey = c.mean(0, keepdim=True)
        c = (c - grey) * rng.uniform(0.8, 1.25) + grey
        if r.hue_rotate and rng.random() < r.hue_rotate:
            c = rotate_hue(c, rng.uniform(0, 2 * math.pi))
        return c.clamp(0, 1) * 2 - 1

    def batch(self, r: Recipe) -> torch.Tensor:
        size = int(self.rng.choice(r.crop_sizes))
        return torch.stack([self.crop(size, r) for _ in range(r.batch)]).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, r: Recipe) -> float:
    """Linear warm-up then cosine decay to lr_min."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, steps - r.warmup)
    return r.lr_min + 0.5 * (r.lr - r.lr_min) * (1 + math.cos(math.pi * min(t, 1.0)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two batches in [-1, 1], after 8-bit quantisation."""
    qa = ((a.float().clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.float().clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).pow(2).mean().item()
    return 10 * math.log10(255**2 / max(mse, 1e-10))


def validation_set(crops: Crops, per_kind: int = 8) -> torch.Tensor:
    """Fixed 192-px crops of *training* images, per_kind of each kind (a separate RNG: training is unaffected)."""
    saved = crops.rng
    crops.rng = np.random.default_rng(SEED + 1)
    out = []
    for kind in KIND_SHARE:
        idx = [i for i, k in enumerate(crops.kinds) if k == kind]
        for i in crops.rng.choice(idx, per_kind, replace=len(idx) < per_kind):
            out.append(crops.crop(192, Recipe(scale_range=(0.5, 1.0)), int(i)))
    crops.rng = saved
    return torch.stack(out).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: AutoencoderKL, val: torch.Tensor, device: torch.device) -> float:
    model.eval()
    out = torch.cat([model(val[i:i + 8].to(device)).cpu() for i in range(0, len(val), 8)])
    return psnr(out, val)


def new_model(init: Path | None) -> AutoencoderKL:
    """CONFIG from scratch (identity residual branches, small posterior std), or the weights of a model folder."""
    if init is not None:
        model = load_vae(init)
        assert model.config.replace(scaling_factor=1.0, force_upcast=False) == CONFIG, "init is not CONFIG"
        return model.float().train()
    model = AutoencoderKL(CONFIG)
    with torch.no_grad():
        # Residual branches start at zero (as in ADM's res blocks), so every resnet and attention starts as the
        # identity and the shallow path learns first; this trained markedly faster in short pilots.
        for name, module in model.named_modules():
            if name.endswith((".conv2", ".to_out.0")):
                module.weight.zero_()
                module.bias.zero_()
        # A small initial posterior std (0.05): unit noise would drown the early, small latents.
        model.quant_conv.bias[CONFIG.latent_channels:] = INIT_LOGVAR
    return model


def train(out: Path, steps: int, log: Callable[[str], None], r: Recipe, data: Path, init: Path | None,
          device: torch.device) -> None:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    crops = Crops(default_data.read_listing(data, "train"), SEED)
    val = validation_set(crops)
    model = new_model(init).to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
    # bf16 autocast on GPUs (fp32 master weights); fp32 on CPUs, where bf16 convolutions are slow
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params} ({n_params / 1e6:.2f} M); {len(crops.images)} training images; steps {steps}; {device}")
    best = evaluate(ema, val, device)
    log(f"val step 0: EMA PSNR {best:.2f} dB")
    t0 = time.time()
    acc: dict[str, float] = {}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, r)
        model.train()
        x = crops.batch(r).to(device, non_blocking=True)
        with autocast():
            terms = loss_terms(model, x, gen, r)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        decay = r.ema if init is not None else min(r.ema, (1 + step) / (10 + step))  # short EMA early from scratch
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v.item()
        if (step + 1) % 50 == 0:
            n = 50
            log(
                f"step {step + 1} lr {lr_at(step, steps, r):.2e} loss {acc['total'] / n:.4f} l1 {acc['l1'] / n:.4f} "
                f"mse {acc['mse'] / n:.5f} colour {acc['colour'] / n:.5f} ssim {acc['ssim'] / n:.4f} "
                f"kl {acc['kl'] / n:.2f} "
                f"{(time.time() - t0) / (step + 1):.2f}s/step"
            )
            acc = {}
        if (step + 1) % r.val_every == 0 or step + 1 == steps:
            p = evaluate(ema, val, device)
            state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
            torch.save({"step": step + 1, "psnr": p, "state": state}, out / "last.pt")
            if p > best:
                best = p
                torch.save({"step": step + 1, "psnr": p, "state": state}, out / "best.pt")
            log(f"val step {step + 1}: EMA PSNR {p:.2f} dB (best {best:.2f}) elapsed {(time.time() - t0) / 60:.1f} min")
    log(f"done: {steps} steps in {(time.time() - t0) / 60:.1f} min, best val PSNR {best:.2f} dB")


# ------------------------------------------------------------------------------------------------- export


def pad8(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Replicate-pad (N, C, H, W) to multiples of 8; returns the padded tensor and the original H, W."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % 8, 0, (-h) % 8), mode="replicate"), h, w


@torch.no_grad()
def training_latent_std(model: AutoencoderKL, data: Path) -> float:
    """Std of the posterior-mode latents over all training images (each whole, at training resolution)."""
    zs = []
    for e in default_data.read_listing(data, "train"):
        x = load_rgb(e.path)[None].float() / 127.5 - 1  # (1, 3, H, W)
        zs.append(model.encode(pad8(x)[0]).mode().flatten())
    return torch.cat(zs).std().item()


@torch.no_grad()
def reduced_precision_ok(model: AutoencoderKL, data: Path, log: Callable[[str], None]) -> bool:
    """Encode and decode validation crops in fp16 and bf16; True when all is finite and close to fp32.

    128-px crops of one validation image per kind: half-precision convolutions are very slow on CPUs.
    """
    ok = True
    entries = default_data.read_listing(data, "val")
    for kind in default_data.KINDS:
        e = next(e for e in entries if e.kind == kind)
        arr = load_rgb(e.path)
        _, h, w = arr.shape
        y0, x0 = max(0, (h - 128) // 2), max(0, (w - 128) // 2)
        x = arr[:, y0:y0 + 128, x0:x0 + 128][None].float() / 127.5 - 1  # (1, 3, 128, 128)
        xp, h, w = pad8(x)
        z = model.encode(xp).mode()
        ref = model.decode(z)
        for dt in (torch.float16, torch.bfloat16):
            low = copy.deepcopy(model).to(dt)
            y = low.decode(z.to(dt)).float()
            enc = low.encode(xp.to(dt)).mode().float()
            finite = bool(torch.isfinite(y).all() and torch.isfinite(enc).all())
            diff = (y - ref).abs().max().item() if finite else float("inf")
            log(f"{e.name} ({kind}) {str(dt).removeprefix('torch.')}: finite {finite}, max |decode - fp32| {diff:.4f}")
            ok &= finite and diff < 0.25
    return ok


def export(ckpt: Path, folder: Path, data: Path, log: Callable[[str], None]) -> None:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = AutoencoderKL(CONFIG)
    model.load_state_dict(saved["state"], strict=True)
    model.eval()
    std = training_latent_std(model, data)
    fp16_ok = reduced_precision_ok(model, data, log)
    model.config = CONFIG.replace(scaling_factor=round(1.0 / std, 5), force_upcast=not fp16_ok)
    log(f"checkpoint step {saved['step']} (val {saved['psnr']:.2f} dB): latent std {std:.4f} -> "
        f"scaling_factor {model.config.scaling_factor}; force_upcast {model.config.force_upcast}")
    save_vae(model, folder, dtype=torch.float16)
    log(f"wrote {folder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/train/v2"), help="checkpoint and log folder")
    ap.add_argument("--data", type=Path, default=Path.home() / ".cache" / "vaecli-default-data",
                    help="cache folder of scripts/default_data.py")
    ap.add_argument("--init", type=Path, default=None,
                    help="fine-tune this model folder with MIXED (else RECIPE from scratch)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=None, help="crops per step (default: the recipe's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export", type=Path, default=None, help="write <out>/best.pt as a diffusers folder here")
    ap.add_argument("--checkpoint", type=Path, default=None, help="with --export: this checkpoint instead of best.pt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logfile = (args.out / ("export.log" if args.export else "train.log")).open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    if args.export is not None:
        export(args.checkpoint or args.out / "best.pt", args.export, args.data, log)
        return
    recipe = MIXED if args.init is not None else RECIPE
    if args.batch is not None:
        recipe = replace(recipe, batch=args.batch)
    log(f"recipe {recipe}; kinds {KIND_SHARE}; native {NATIVE}; config {json.dumps(CONFIG.to_dict())}; "
        f"seed {SEED}; init {args.init}; threads {args.threads}")
    train(args.out, args.steps, log, recipe, args.data, args.init, torch.device(args.device))


if __name__ == "__main__":
    main()
