"""Train vaecli's embedded default model: a small SD-layout AutoencoderKL (8x down, 4 latent channels).

Everything that decides the result is in this file: the image list (with source and licence of each), the
architecture, the losses, the optimizer, the schedule and the seed. Only where to write, how many steps and
how many CPU threads are arguments. The shipped model comes from two stages. Stage 1 trains from scratch:

    apt-get install ukui-wallpapers plasma-workspace-wallpapers mate-backgrounds   # image sources, see DATA
    nice -n 10 python scripts/train_default.py --out /tmp/train/run --steps 5000 --threads 1

The shipped model is stage 2: `--stage 2` fine-tunes stage 1's best weights on stage 1's images plus the
photographs marked `stage=2` in DATA, with an MSE term added to the loss (see FINETUNE and MODEL_CARD.md):

    apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04   # the stage-2 photographs
    nice -n 5 python scripts/train_default.py --out /tmp/train/run --stage 2 --steps 11000 --threads 1
    python scripts/train_default.py --out /tmp/train/run --stage 2 --export vaecli/default_model

One thread, because the shipped model was trained niced on a 2-core machine shared with other jobs: with two
threads every parallel region waits for the thread that shares a core with a higher-priority process, which
made steps ~10x slower than with one thread. On an idle machine --threads 2 is faster (same result up to
floating-point summation order).

Checkpoints (EMA weights, fp32) go to <out>/ (stage 2: <out>/stage2/). A stage's best checkpoint by PSNR
on fixed crops of its *training* images (held-out images are never trained on) is exported with `--export`,
which also measures the scaling factor on the training images and checks fp16/bf16 encoding and decoding
for overflow on crops of three held-out photos.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaecli.config import VAEConfig  # noqa: E402
from vaecli.model import AutoencoderKL  # noqa: E402
from vaecli.weights import save_vae  # noqa: E402

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
    ema: float = 0.998  # EMA decay of the weights that are checkpointed and shipped
    val_every: int = 200  # steps between validation + checkpoint
    channel_shuffle: float = 0.0  # probability of permuting the RGB channels of a crop (all hues get seen)


RECIPE = Recipe()
# Stage 2 fine-tunes stage 1's best EMA weights with a fresh optimizer on stage 1's images plus the stage-2
# photographs (landscapes, foliage, close-ups: what stage 1 lacked, it rendered saturated greens brown), with
# an MSE term added so that training optimises what PSNR measures. An earlier stage 2 that permuted RGB
# channels instead of adding photographs (channel_shuffle=0.5) did not fix the greens and lowered held-out PSNR.
FINETUNE = Recipe(lr=1.5e-4, lr_min=1e-5, warmup=50, w_mse=2.0, val_every=500)
INIT_LOGVAR = -6.0  # initial bias of the log-variance half of quant_conv


# ----------------------------------------------------------------------------------------------- the images
# role: "train" images are cropped for training and measure the scaling factor; "heldout" images are never
# seen in training (scripts/eval_default.py reports on them). Images under licences other than PD/CC0/CC-BY/
# CC-BY-SA (GPL, LGPL) are only ever held out: they are evaluated, never trained on and never redistributed.
SKIMAGE = "scikit-image wheel (skimage.data)"
SKLEARN = "scikit-learn wheel (sklearn/datasets/images)"
UKUI = "Debian package ukui-wallpapers 20.04.3-1.1 (/usr/share/backgrounds)"
KDE = "Debian package plasma-workspace-wallpapers 4:5.27.5-2 (/usr/share/wallpapers)"
MATE = "Debian package mate-backgrounds 1.26.0-1 (/usr/share/backgrounds/mate)"
LOMIRI16 = "Debian package lomiri-wallpapers-16.04 20.04.0-2 (/usr/share/backgrounds)"
LOMIRI20 = "Debian package lomiri-wallpapers-20.04 20.04.0-2 (/usr/share/backgrounds)"
KDE_DIR = "/usr/share/wallpapers"


@dataclass(frozen=True)
class Photo:
    name: str
    role: str  # "train" or "heldout"
    source: str  # where the file comes from
    licence: str
    credit: str
    ref: str  # skimage function name, sklearn file name, or absolute path
    weight: float = 1.0  # relative sampling frequency in training
    kind: str = "photo"  # "photo", "texture" (grey photo texture), "art" (digital render)
    stage: int = 1  # first training stage that uses the image (stage 2 trains on stage 1's images too)


DATA: tuple[Photo, ...] = (
    # training: photographs
    Photo("astronaut", "train", SKIMAGE, "public domain", "NASA (Eileen Collins)", "astronaut", 2.0),
    Photo("rocket", "train", SKIMAGE, "public domain", "SpaceX", "rocket", 2.0),
    Photo("hubble_deep_field", "train", SKIMAGE, "public domain", "NASA", "hubble_deep_field", 1.0),
    Photo("immunohistochemistry", "train", SKIMAGE, "no known copyright restrictions", "scikit-image",
          "immunohistochemistry", 1.0),
    Photo("retina", "train", SKIMAGE, "CC0 1.0", "Mikael Häggström (Wikimedia Commons)", "retina", 1.0),
    Photo("china", "train", SKLEARN, "CC-BY 2.0", "danielbuechele (Flickr)", "china.jpg", 2.0),
    Photo("camera", "train", SKIMAGE, "CC0", "Lav Varshney", "camera", 1.0, "texture"),
    Photo("coins", "train", SKIMAGE, "no known copyright restrictions", "Brooklyn Museum", "coins", 0.5, "texture"),
    Photo("brick", "train", SKIMAGE, "CC0", "CC0Textures (Bricks25)", "brick", 1.0, "texture"),
    Photo("grass", "train", SKIMAGE, "CC0", "linolafett (DeviantArt)", "grass", 1.0, "texture"),
    Photo("gravel", "train", SKIMAGE, "CC0", "CC0Textures (Gravel04)", "gravel", 1.0, "texture"),
    # training: digital art (colour gradients, sharp edges)
    *(
        Photo(f"ukui-{n}", "train", UKUI, "CC-BY-SA 3.0", "Ubuntu Kylin community contributors",
              f"/usr/share/backgrounds/{n}", 0.4, "art")
        for n in ("2004default.jpg", "calla.png", "city.png", "desert.png", "firstgeneration.jpg",
                  "fluent-color.png", "focal-ubuntukylin.png", "goldfish.png", "rhythm.jpg", "rollpaper.png",
                  "string.jpg", "the-mouse.jpg")
    ),
    *(
        Photo(f"kde-{n}", "train", KDE, "CC-BY-SA 4.0", author, f"{KDE_DIR}/{n}/contents/images/{f}", 0.4, "art")
        for n, author, f in (
            ("Altai", "Alesya Khoteeva", "5120x2880.png"),
            ("Flow", "Sandra Smukaste", "5120x2880.jpg"),
            ("Honeywave", "Ken Vermette", "5120x2880.jpg"),
            ("IceCold", "Santiago Cézar", "5120x2880.png"),
            ("Kay", "ruvkr", "5120x2880.png"),
            ("MilkyWay", "ruvkr", "5120x2880.png"),
            ("Patak", "Áron Kovács", "5120x2880.png"),
            ("SafeLanding", "KDE Visual Design Group", "5120x2880.jpg"),
            ("Shell", "Lucas Andrade", "5120x2880.jpg"),
            ("Volna", "Nikita Babin", "5120x2880.jpg"),
        )
    ),
    # stage 2: photographs of the Ubuntu Touch wallpaper contests (licences from the package's copyright file)
    *(
        Photo(f"lomiri-{n.split('_by_')[0]}", "train", LOMIRI16 if pack == 16 else LOMIRI20, lic, author,
              f"/usr/share/backgrounds/{n}.jpg", 1.5, "photo", 2)
        for pack, n, author, lic in (
            (16, "Bridge_by_Sander_Klootwijk", "Sander Klootwijk", "CC-BY-SA 4.0"),
            (16, "Dragonfly_by_Bolly", "Bolly", "CC-BY-SA 4.0"),
            (16, "Picture_0B_by_freespace", "Trevor \"Freespace\"", "CC-BY 4.0"),
            (16, "Picture_1A_by_freespace", "Trevor \"Freespace\"", "CC-BY 4.0"),
            (16, "Wine_by_Jakkub_Mede", "Jakub Mede", "CC-BY 4.0"),
            (16, "aitzgorri_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
            (16, "analogpattern_by_Peter_Nerlich", "Peter Nerlich", "CC-BY-SA 4.0"),
            (16, "free_by_Peter_Nerlich", "Peter Nerlich", "CC-BY-SA 4.0"),
            (16, "friends_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
            (16, "greentock_by_Peter_Nerlich", "Peter Nerlich", "CC-BY-SA 4.0"),
            (16, "life_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
            (16, "picosdeeuropa_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
            (16, "seeding_by_Clements_Engelhardt", "Clemens Engelhardt", "CC0 1.0"),
            (16, "sunset_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
            (20, "Kleiber_by_Lukas_Baubkus", "Lukas Baubkus", "CC-BY-SA 3.0"),
        )
    ),
    # held out: never trained on
    Photo("chelsea", "heldout", SKIMAGE, "CC0", "Stefan van der Walt", "chelsea"),
    Photo("coffee", "heldout", SKIMAGE, "CC0", "Rachel Michetti", "coffee"),
    Photo("flower", "heldout", SKLEARN, "CC-BY 2.0", "vultilion (Flickr)", "flower.jpg"),
    *(
        Photo(f"mate-{n}", "heldout", MATE, "GPL-2+ (evaluation only)", author,
              f"/usr/share/backgrounds/mate/nature/{n}.jpg")
        for n, author in (
            ("Aqua", "Charles Barbin"),
            ("Dune", "Marco Cogoni, Hylke Bons"),
            ("LadyBird", "Charles Barbin"),
            ("RainDrops", "blackcombwhistler07"),
            ("Storm", "Sergey Nazarov"),
            ("Wood", "Jean-François Fortin Tam"),
        )
    ),
    *(
        Photo(f"kde-{n}", "heldout", KDE, "LGPL-3 (evaluation only)", author, f"{KDE_DIR}/{n}/contents/images/{f}")
        for n, author, f in (
            ("Autumn", "RJ Quiralta", "1920x1200.jpg"),
            ("BytheWater", "Maciej Wiklo", "1920x1200.jpg"),
            ("ColorfulCups", "Dmitri Popov", "2560x1600.jpg"),
            ("Path", "Risto Saukonpää", "1920x1200.jpg"),
        )
    ),
)

TRAIN_LONG_SIDE = 1024  # training images larger than this are downscaled once at load (Lanczos)
EVAL_WIDTH = 771  # held-out wallpapers are evaluated at this width (not a multiple of 8), aspect kept


def load_photo(photo: Photo, long_side: int | None = None, width: int | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array, optionally downscaled (never upscaled) with Lanczos."""
    if "/" in photo.ref:
        img = Image.open(photo.ref)
    elif photo.ref.endswith(".jpg"):
        import sklearn.datasets

        img = Image.open(Path(sklearn.datasets.__file__).parent / "images" / photo.ref)
    else:
        import skimage.data

        img = Image.fromarray(getattr(skimage.data, photo.ref)())
    img = img.convert("RGB")
    w, h = img.size
    scale = 1.0
    if long_side is not None and max(w, h) > long_side:
        scale = long_side / max(w, h)
    if width is not None and w > width:
        scale = width / w
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return np.asarray(img)


def heldout_images() -> list[tuple[Photo, np.ndarray]]:
    """The held-out photos as evaluated: skimage/sklearn at native size, wallpapers at EVAL_WIDTH."""
    out = []
    for p in DATA:
        if p.role == "heldout":
            out.append((p, load_photo(p, width=EVAL_WIDTH if "/" in p.ref else None)))
    return out


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
    post = model.encode(x)
    y = model.decode(post.sample(gen))
    l1 = (y - x).abs().mean()
    mse = (y - x).pow(2).mean()
    s = ssim((y.float().clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    kl = post.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
    total = r.w_l1 * l1 + r.w_mse * mse + r.w_ssim * (1 - s) + r.w_kl * kl
    return {"total": total, "l1": l1, "mse": mse, "ssim": s, "kl": kl}


# --------------------------------------------------------------------------------------------------- data


class Crops:
    """Random augmented crops from the training images, held in memory as float tensors in [0, 1]."""

    def __init__(self, photos: list[Photo], seed: int) -> None:
        self.images = [  # each (3, H, W) uint8
            torch.from_numpy(load_photo(p, long_side=TRAIN_LONG_SIDE).copy()).permute(2, 0, 1) for p in photos
        ]
        self.kinds = [p.kind for p in photos]
        w = torch.tensor([p.weight for p in photos])
        self.probs = w / w.sum()
        self.rng = np.random.default_rng(seed)

    def crop(self, size: int, r: Recipe) -> torch.Tensor:
        """One augmented (3, size, size) crop in [-1, 1]."""
        rng = self.rng
        i = int(rng.choice(len(self.images), p=self.probs.numpy()))
        img = self.images[i]
        _, h, w = img.shape
        scale = rng.uniform(*r.scale_range)
        side = min(int(round(size / scale)), h, w)
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        c = img[:, y0:y0 + side, x0:x0 + side].float().div(255).unsqueeze(0)  # (1, 3, side, side)
        if side != size:
            c = F.interpolate(c, size=(size, size), mode="bicubic", antialias=side > size, align_corners=False)
        c = c[0].clamp(0, 1)
        if rng.random() < 0.5:
            c = c.flip(2)
        if rng.random() < 0.2:
            c = c.flip(1)
        if rng.random() < 0.25:
            c = c.transpose(1, 2)
        if self.kinds[i] == "texture":  # grey textures: give them a random tint so colour is seen too
            c = c * torch.from_numpy(rng.uniform(0.6, 1.0, size=(3, 1, 1))).float()
        # colour jitter: brightness, contrast, saturation
        mean = c.mean()
        c = (c - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.85, 1.15)
        grey = c.mean(0, keepdim=True)
        c = (c - grey) * rng.uniform(0.7, 1.3) + grey
        if r.channel_shuffle and rng.random() < r.channel_shuffle:  # no draw in stage 1: its crops stay put
            c = c[torch.from_numpy(rng.permutation(3))]
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
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).pow(2).mean().item()
    return 10 * math.log10(255**2 / max(mse, 1e-10))


def validation_set(crops: Crops) -> torch.Tensor:
    """16 fixed 192-px crops of training images (a separate RNG, so training crops are unaffected)."""
    saved = crops.rng
    crops.rng = np.random.default_rng(SEED + 1)
    val = torch.stack([crops.crop(192, Recipe(scale_range=(0.5, 1.0))) for _ in range(16)])
    crops.rng = saved
    return val.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: AutoencoderKL, val: torch.Tensor) -> float:
    model.eval()
    out = torch.cat([model(val[i:i + 4]) for i in range(0, len(val), 4)])
    return psnr(out, val)


def train(
    out: Path, steps: int, log: Callable[[str], None], r: Recipe = RECIPE, init: Path | None = None, stage: int = 1
) -> None:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    crops = Crops([p for p in DATA if p.role == "train" and p.stage <= stage], SEED)
    val = validation_set(crops)
    model = AutoencoderKL(CONFIG).to(memory_format=torch.channels_last)
    with torch.no_grad():
        # Residual branches start at zero (as in ADM's res blocks), so every resnet and attention starts as the
        # identity and the shallow path learns first; this trained markedly faster in short pilots.
        for name, module in model.named_modules():
            if name.endswith((".conv2", ".to_out.0")):
                module.weight.zero_()
                module.bias.zero_()
        # A small initial posterior std (0.05): unit noise would drown the early, small latents.
        model.quant_conv.bias[CONFIG.latent_channels:] = INIT_LOGVAR
    if init is not None:
        model.load_state_dict(torch.load(init, map_location="cpu", weights_only=True)["state"], strict=True)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params} ({n_params / 1e6:.2f} M); {len(crops.images)} training images; steps {steps}")
    best = -1.0
    t0 = time.time()
    acc: dict[str, float] = {}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, r)
        model.train()
        x = crops.batch(r)
        terms = loss_terms(model, x, gen, r)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        decay = min(r.ema, (1 + step) / (10 + step))  # short EMA early on, so early checkpoints are usable
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v.item()
        if (step + 1) % 50 == 0:
            n = 50
            log(
                f"step {step + 1} lr {lr_at(step, steps, r):.2e} loss {acc['total'] / n:.4f} l1 {acc['l1'] / n:.4f} "
                f"ssim {acc['ssim'] / n:.4f} kl {acc['kl'] / n:.2f} {(time.time() - t0) / (step + 1):.2f}s/step"
            )
            acc = {}
        if (step + 1) % r.val_every == 0 or step + 1 == steps:
            p = evaluate(ema, val)
            state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
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
def training_latent_std(model: AutoencoderKL) -> float:
    """Std of the posterior-mode latents over all training images (at training resolution)."""
    zs = []
    for p in DATA:
        if p.role != "train":
            continue
        x = torch.from_numpy(load_photo(p, long_side=TRAIN_LONG_SIDE).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        zs.append(model.encode(pad8(x)[0]).mode().flatten())
    return torch.cat(zs).std().item()


@torch.no_grad()
def reduced_precision_ok(model: AutoencoderKL, log: Callable[[str], None]) -> bool:
    """Encode and decode held-out crops in fp16 and bf16; True when all is finite and close to fp32.

    128-px crops of three held-out photos: half-precision convolutions are very slow on CPUs.
    """
    ok = True
    for p, arr in heldout_images()[:3]:
        h, w = arr.shape[:2]
        y0, x0 = max(0, (h - 128) // 2), max(0, (w - 128) // 2)
        x = torch.from_numpy(arr[y0:y0 + 128, x0:x0 + 128].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        xp, h, w = pad8(x)
        z = model.encode(xp).mode()
        ref = model.decode(z)
        for dt in (torch.float16, torch.bfloat16):
            low = copy.deepcopy(model).to(dt)
            y = low.decode(z.to(dt)).float()
            enc = low.encode(xp.to(dt)).mode().float()
            finite = bool(torch.isfinite(y).all() and torch.isfinite(enc).all())
            diff = (y - ref).abs().max().item() if finite else float("inf")
            log(f"{p.name} {str(dt).removeprefix('torch.')}: finite {finite}, max |decode - fp32| {diff:.4f}")
            ok &= finite and diff < 0.25
    return ok


def export(ckpt: Path, folder: Path, log: Callable[[str], None]) -> None:
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = AutoencoderKL(CONFIG)
    model.load_state_dict(data["state"], strict=True)
    model.eval()
    std = training_latent_std(model)
    fp16_ok = reduced_precision_ok(model, log)
    model.config = CONFIG.replace(scaling_factor=round(1.0 / std, 5), force_upcast=not fp16_ok)
    log(f"checkpoint step {data['step']} (val {data['psnr']:.2f} dB): latent std {std:.4f} -> "
        f"scaling_factor {model.config.scaling_factor}; force_upcast {model.config.force_upcast}")
    save_vae(model, folder, dtype=torch.float16)
    log(f"wrote {folder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/train/run"), help="checkpoint and log folder")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2), help="2: fine-tune <out>/best.pt into <out>/stage2")
    ap.add_argument("--export", type=Path, default=None, help="write the stage's checkpoint as a diffusers folder here")
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
        # Each stage exports its best checkpoint by PSNR on fixed crops of its own training images.
        export(args.out / "best.pt" if args.stage == 1 else args.out / "stage2" / "best.pt", args.export, log)
        return
    recipe = RECIPE if args.stage == 1 else FINETUNE
    log(f"stage {args.stage} recipe {recipe}; config {json.dumps(CONFIG.to_dict())}; seed {SEED}; threads {args.threads}")
    if args.stage == 1:
        train(args.out, args.steps, log)
    else:
        (args.out / "stage2").mkdir(exist_ok=True)
        train(args.out / "stage2", args.steps, log, FINETUNE, init=args.out / "best.pt", stage=2)


if __name__ == "__main__":
    main()
