"""Training and validation images of the embedded default model: every kind users feed a VAE.

    python scripts/default_data.py --cache DIR      # fetch the Debian packages, write DIR/images/ and the listing

Nothing here is committed but this script: it downloads the Debian packages of SOURCES with `apt-get
download` (no install, no root needed once the lists are fresh), unpacks them under DIR/root with
`dpkg-deb -x`, reads the images shipped in the scikit-image, scikit-learn and matplotlib wheels, renders the
synthetic images (text pages, UI-like screenshots, terminals, charts, comic pages, colour patterns) and
degrades photographs into scans and noisy phone pictures. Everything is seeded: the same packages give the
same files. The result is DIR/images/{train,val}/<kind>/<name>.png and DIR/images/listing.tsv (name, role,
kind, sampling weight, source, licence, path), which scripts/train_default.py and scripts/eval_default.py read.

Kinds: photo, scan (old photographs and documents, scanned), art (digital art, clip art, game art, comics),
screen (screenshots, text, charts), noisy (photographs with sensor noise and heavy JPEG). Validation images
are never trained on: they come from other files (held-out photos, other clip-art files, other game art,
packages under GPL/LGPL that are used for evaluation only), other seeds of the generators, and a font
family (FreeFont) that training never renders.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SEED = 20261127
KINDS = ("photo", "scan", "art", "screen", "noisy")

# Debian packages (bookworm versions used for the shipped model) -> licence of the images we take from them.
PACKAGES = {
    "lomiri-wallpapers": "20.04.0-2",
    "lomiri-wallpapers-16.04": "20.04.0-2",
    "lomiri-wallpapers-20.04": "20.04.0-2",
    "ukui-wallpapers": "20.04.3-1.1",
    "plasma-workspace-wallpapers": "4:5.27.5-2",
    "mate-backgrounds": "1.26.0-1",
    "gnome-backgrounds": "43.1-1",
    "sway-backgrounds": "1.7-6",
    "tango-icon-theme": "0.8.90-11",
    "openclipart-png": "1:0.18+dfsg-19",
    "flare-game": "1.14-1",
    "fonts-dejavu-core": "2.37-6",
    "fonts-liberation": "1:1.07.4-11",
    "fonts-comic-neue": "2.51-4",
    "fonts-freefont-ttf": "20120503-10",
}

BG = "usr/share/backgrounds"
KDE = "usr/share/wallpapers"
CLIPART = "usr/share/openclipart/png"
FLARE = "usr/share/games/flare/mods"
FONTS = "usr/share/fonts"


@dataclass(frozen=True)
class Source:
    """One image file (or wheel image) that is used as it is, or as the base of derived images."""

    name: str
    kind: str  # one of KINDS
    role: str  # "train", "val", or "base" (only degraded copies are used; see DERIVED)
    origin: str  # package or wheel
    licence: str
    credit: str
    ref: str  # "skimage:NAME", "sklearn:FILE", "mpl:FILE", or a path under the unpacked packages
    weight: float = 1.0  # relative sampling frequency in training


def _lomiri(n: str, author: str, lic: str, role: str = "train", pack: str = "lomiri-wallpapers-16.04") -> Source:
    return Source(f"lomiri-{n.split('_by_')[0]}", "photo", role, pack, lic, author, f"{BG}/{n}.jpg", 1.5)


SOURCES: tuple[Source, ...] = (
    # ---- photographs (train): the previous model's training photographs
    Source("astronaut", "photo", "train", "scikit-image", "public domain", "NASA", "skimage:astronaut", 2.0),
    Source("rocket", "photo", "train", "scikit-image", "public domain", "SpaceX", "skimage:rocket", 2.0),
    Source("hubble_deep_field", "photo", "train", "scikit-image", "public domain", "NASA", "skimage:hubble_deep_field"),
    Source("immunohistochemistry", "photo", "train", "scikit-image", "no known copyright restrictions",
           "scikit-image", "skimage:immunohistochemistry"),
    Source("retina", "photo", "train", "scikit-image", "CC0 1.0", "Mikael Häggström", "skimage:retina"),
    Source("china", "photo", "train", "scikit-learn", "CC-BY 2.0", "danielbuechele (Flickr)", "sklearn:china.jpg", 2.0),
    Source("camera", "photo", "train", "scikit-image", "CC0", "Lav Varshney", "skimage:camera", 0.7),
    Source("coins", "photo", "train", "scikit-image", "no known copyright restrictions", "Brooklyn Museum",
           "skimage:coins", 0.5),
    Source("brick", "photo", "train", "scikit-image", "CC0", "CC0Textures", "skimage:brick", 0.7),
    Source("grass", "photo", "train", "scikit-image", "CC0", "linolafett", "skimage:grass", 0.7),
    Source("gravel", "photo", "train", "scikit-image", "CC0", "CC0Textures", "skimage:gravel", 0.7),
    _lomiri("Bridge_by_Sander_Klootwijk", "Sander Klootwijk", "CC-BY-SA 4.0"),
    _lomiri("Dragonfly_by_Bolly", "Bolly", "CC-BY-SA 4.0"),
    _lomiri("Picture_0B_by_freespace", "Trevor \"Freespace\"", "CC-BY 4.0"),
    _lomiri("Picture_1A_by_freespace", "Trevor \"Freespace\"", "CC-BY 4.0"),
    _lomiri("Wine_by_Jakkub_Mede", "Jakub Mede", "CC-BY 4.0"),
    _lomiri("aitzgorri_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
    _lomiri("analogpattern_by_Peter_Nerlich", "Peter Nerlich", "CC-BY-SA 4.0"),
    _lomiri("free_by_Peter_Nerlich", "Peter Nerlich", "CC-BY-SA 4.0"),
    _lomiri("friends_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
    _lomiri("greentock_by_Peter_Nerlich", "Peter Nerlich", "CC-BY-SA 4.0"),
    _lomiri("life_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
    _lomiri("picosdeeuropa_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
    _lomiri("seeding_by_Clements_Engelhardt", "Clemens Engelhardt", "CC0 1.0"),
    _lomiri("sunset_by_Aitzol_Berasategi", "Aitzol Berasategi", "CC-BY 4.0"),
    _lomiri("Kleiber_by_Lukas_Baubkus", "Lukas Baubkus", "CC-BY-SA 3.0", pack="lomiri-wallpapers-20.04"),
    # ---- photographs (val): the previous model card's held-out set, unchanged, so figures stay comparable
    Source("chelsea", "photo", "val", "scikit-image", "CC0", "Stefan van der Walt", "skimage:chelsea"),
    Source("coffee", "photo", "val", "scikit-image", "CC0", "Rachel Michetti", "skimage:coffee"),
    Source("flower", "photo", "val", "scikit-learn", "CC-BY 2.0", "vultilion (Flickr)", "sklearn:flower.jpg"),
    *(Source(f"mate-{n}", "photo", "val", "mate-backgrounds", "GPL-2+ (evaluation only)", author,
             f"{BG}/mate/nature/{n}.jpg")
      for n, author in (("Aqua", "Charles Barbin"), ("Dune", "Marco Cogoni, Hylke Bons"),
                        ("LadyBird", "Charles Barbin"), ("RainDrops", "blackcombwhistler07"),
                        ("Storm", "Sergey Nazarov"), ("Wood", "Jean-François Fortin Tam"))),
    *(Source(f"kde-{n}", "photo", "val", "plasma-workspace-wallpapers", "LGPL-3 (evaluation only)", author,
             f"{KDE}/{n}/contents/images/{f}")
      for n, author, f in (("Autumn", "RJ Quiralta", "1920x1200.jpg"), ("BytheWater", "Maciej Wiklo", "1920x1200.jpg"),
                           ("ColorfulCups", "Dmitri Popov", "2560x1600.jpg"),
                           ("Path", "Risto Saukonpää", "1920x1200.jpg"))),
    # ---- bases of held-out scans and noisy pictures (other photographs of the evaluation-only packages)
    *(Source(f"mate-{n}", "photo", "base", "mate-backgrounds", "GPL-2+ (evaluation only)",
             "see the package's copyright", f"{BG}/mate/nature/{n}.jpg")
      for n in ("Blinds", "FreshFlower", "Garden", "GreenMeadow", "TwoWings", "YellowFlower")),
    # ---- real scans (val: there are too few to train on, and they are the best test of the kind)
    Source("page", "scan", "val", "scikit-image", "no licence stated (evaluation only)", "scikit-image",
           "skimage:page"),
    Source("grace_hopper", "scan", "val", "matplotlib", "public domain (US Navy photograph)", "US Navy",
           "mpl:grace_hopper.jpg"),
    # ---- digital art (train): wallpapers
    *(Source(f"ukui-{Path(n).stem}", "art", "train", "ukui-wallpapers", "CC-BY-SA 3.0", "Ubuntu Kylin contributors",
             f"{BG}/{n}", 0.5)
      for n in ("2004default.jpg", "calla.png", "city.png", "desert.png", "firstgeneration.jpg", "fluent-color.png",
                "focal-ubuntukylin.png", "goldfish.png", "rhythm.jpg", "rollpaper.png", "string.jpg", "the-mouse.jpg")),
    *(Source(f"kde-{n}", "art", "train", "plasma-workspace-wallpapers", "CC-BY-SA 4.0", author,
             f"{KDE}/{n}/contents/images/5120x2880.{ext}", 0.5)
      for n, author, ext in (("Altai", "Alesya Khoteeva", "png"), ("Flow", "Sandra Smukaste", "jpg"),
                             ("Honeywave", "Ken Vermette", "jpg"), ("IceCold", "Santiago Cézar", "png"),
                             ("Kay", "ruvkr", "png"), ("MilkyWay", "ruvkr", "png"), ("Patak", "Áron Kovács", "png"),
                             ("SafeLanding", "KDE Visual Design Group", "jpg"), ("Shell", "Lucas Andrade", "jpg"),
                             ("Volna", "Nikita Babin", "jpg"))),
    *(Source(f"lomiri-{n.split('_by_')[0]}", "art", "train", "lomiri-wallpapers-20.04", "CC-BY-SA 4.0", author,
             f"{BG}/{n}.jpg", 0.7)
      for n, author in (("Fossa_by_Jasper_Roks", "Jasper Roks"), ("Infinite-Sea_by_Aury88", "Aury88"),
                        ("Painting-Colors_by__herobrine7gamer", "herobrine7gamer"),
                        ("umang_by_Abhishek_Mudgal", "Abhishek Mudgal"))),
    Source("lomiri-warty-final", "art", "train", "lomiri-wallpapers", "CC-BY-SA 3.0", "Nathaniel McCallum",
           f"{BG}/warty-final-ubuntu.png", 0.5),
    *(Source(f"gnome-{n}", "art", "train", "gnome-backgrounds", "CC-BY-SA 3.0", "GNOME design team (Jakub Steiner)",
             f"{BG}/gnome/{n}.webp", 0.5)
      for n in ("adwaita-l", "grid-d", "licorice-l", "pixels-l", "symbolic-d", "truchet-l", "vnc-l", "wood-d")),
    Source("sway-blue", "art", "train", "sway-backgrounds", "MIT (Expat)", "Drew DeVault",
           f"{BG}/sway/Sway_Wallpaper_Blue_1920x1080.png", 0.5),
    # ---- game art (flare-game, CC-BY-SA 3.0+: painted portraits, tilesets, menu backgrounds)
    *(Source(f"flare-{Path(p).stem}", "art", "train", "flare-game", "CC-BY-SA 3.0+", "Clint Bellanger and others",
             f"{FLARE}/{p}", 0.6)
      for p in ("fantasycore/images/tilesets/tileset_cave.png", "fantasycore/images/tilesets/tileset_dungeon.png",
                "fantasycore/images/tilesets/tileset_grassland.png",
                "fantasycore/images/tilesets/tileset_snowplains.png",
                "fantasycore/images/menus/backgrounds/badlands.png",
                "fantasycore/images/menus/backgrounds/fire_temple.png",
                "empyrean_campaign/images/parallax/nebula.png")),
    Source("flare-ice_palace", "art", "val", "flare-game", "CC-BY-SA 3.0+", "Clint Bellanger and others",
           f"{FLARE}/fantasycore/images/menus/backgrounds/ice_palace.png"),
    # ---- digital art (val, evaluation only: GPL)
    *(Source(f"mate-{Path(n).stem}", "art", "val", "mate-backgrounds", "GPL-2+ (evaluation only)",
             "see the package's copyright", f"{BG}/mate/{n}")
      for n in ("abstract/Elephants.jpg", "abstract/Flow.png")),
)

CLIPART_LICENCE = "public domain (Open Clip Art Library dedication)"
FLARE_LICENCE = "CC-BY-SA 3.0+"
OWN = "generated by this script (no third-party content)"
FONT_TRAIN = ("truetype/dejavu/DejaVuSans.ttf", "truetype/dejavu/DejaVuSans-Bold.ttf",
              "truetype/dejavu/DejaVuSerif.ttf",
              "truetype/dejavu/DejaVuSansMono.ttf", "truetype/liberation/LiberationSans-Regular.ttf",
              "truetype/liberation/LiberationSerif-Regular.ttf", "truetype/liberation/LiberationMono-Regular.ttf",
              "truetype/liberation/LiberationSans-Bold.ttf", "opentype/comic-neue/ComicNeue-Regular.otf")
FONT_VAL = ("truetype/freefont/FreeSans.ttf", "truetype/freefont/FreeSerif.ttf", "truetype/freefont/FreeMono.ttf",
            "truetype/freefont/FreeSansBold.ttf")
MONO = {"train": ("truetype/dejavu/DejaVuSansMono.ttf", "truetype/liberation/LiberationMono-Regular.ttf"),
        "val": ("truetype/freefont/FreeMono.ttf",)}
COMIC_FONT = {"train": "opentype/comic-neue/ComicNeue-Bold.otf", "val": "truetype/freefont/FreeSansBold.ttf"}
LONG_SIDE = {"train": 1024, "val": 771}  # images are downscaled (Lanczos) to at most this long side once


# ------------------------------------------------------------------------------------------------- fetching


def fetch(cache: Path) -> Path:
    """Download and unpack the Debian packages (once); returns the unpacked root."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    if not (root / ".unpacked").exists():
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".unpacked").touch()
    return root


def load(ref: str, root: Path) -> Image.Image:
    """An RGB image from a wheel or from the unpacked packages (alpha composited on white)."""
    if ref.startswith("skimage:"):
        import skimage.data

        return Image.fromarray(getattr(skimage.data, ref.split(":", 1)[1])()).convert("RGB")
    if ref.startswith("sklearn:"):
        import sklearn.datasets

        return Image.open(Path(sklearn.datasets.__file__).parent / "images" / ref.split(":", 1)[1]).convert("RGB")
    if ref.startswith("mpl:"):
        import matplotlib

        return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / ref.split(":", 1)[1]).convert("RGB")
    return on_background(Image.open(root / ref), (255, 255, 255))


def on_background(img: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Composite an image with alpha on a flat colour; RGB as is."""
    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, colour + (255,))
    return Image.alpha_composite(bg, img).convert("RGB")


def fit(img: Image.Image, long_side: int) -> Image.Image:
    """Downscale (never upscale) so the long side is at most long_side."""
    w, h = img.size
    if max(w, h) <= long_side:
        return img
    s = long_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


# ------------------------------------------------------------------------------------ synthetic renderers

Rng = np.random.Generator


def font(root: Path, rel: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(root / FONTS / rel), size)


def vivid(rng: Rng) -> tuple[int, int, int]:
    """A saturated colour: the RGB cube's edges (pure and mixed primaries, greens and teals included)."""
    c = rng.permutation([255, int(rng.integers(0, 256)), int(rng.integers(0, 60))])
    return tuple(int(v * rng.uniform(0.55, 1.0)) for v in c)  # type: ignore[return-value]


def pastel(rng: Rng, dark: bool = False) -> tuple[int, int, int]:
    base = rng.integers(20, 70, 3) if dark else rng.integers(200, 256, 3)
    return tuple(int(v) for v in base)  # type: ignore[return-value]


def corpus() -> tuple[list[str], list[str]]:
    """Prose (docstrings) and code lines from Python's standard library, the text of rendered pages."""
    import inspect
    import json
    import pathlib

    prose, code = [], []
    for mod in (argparse, csv, json, pathlib, textwrap, subprocess, io, inspect):
        src = inspect.getsource(mod)
        code += [ln for ln in src.splitlines() if ln.strip()]
        for obj in vars(mod).values():
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                prose.append(" ".join(doc.split()))
    return prose, code


def text_page(rng: Rng, root: Path, fonts: tuple[str, ...], text: list[str]) -> Image.Image:
    """A document: headings and paragraphs of several sizes, sometimes coloured links and two columns."""
    w, h = int(rng.integers(560, 1000)), int(rng.integers(500, 1000))
    img = Image.new("RGB", (w, h), pastel(rng) if rng.random() < 0.3 else (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = int(rng.integers(10, 40))
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    while y < h - 20:
        if rng.random() < 0.2:
            f = font(root, str(rng.choice(fonts)), int(rng.integers(18, 34)))
            d.text((20, y), str(rng.choice(text))[:40], font=f, fill=vivid(rng) if rng.random() < 0.4 else ink)
            y += int(f.size * 1.6)
            continue
        size = int(rng.integers(9, 18))
        f = font(root, str(rng.choice(fonts)), size)
        chars = max(20, int((w - 40) / (size * 0.55)))
        for line in textwrap.wrap(str(rng.choice(text)), chars)[: int(rng.integers(2, 8))]:
            d.text((20, y), line, font=f, fill=(20, 60, 200) if rng.random() < 0.08 else ink)
            y += int(size * 1.4)
        y += size
    return img


def terminal(rng: Rng, root: Path, monos: tuple[str, ...], code: list[str]) -> Image.Image:
    """A terminal or code editor: monospace text in syntax colours on a dark or light background."""
    w, h = int(rng.integers(500, 1000)), int(rng.integers(360, 800))
    dark = rng.random() < 0.7
    img = Image.new("RGB", (w, h), pastel(rng, dark=True) if dark else (250, 250, 245))
    d = ImageDraw.Draw(img)
    size = int(rng.integers(10, 17))
    f = font(root, str(rng.choice(monos)), size)
    palette = [vivid(rng) for _ in range(4)] + [(220, 220, 220) if dark else (30, 30, 30)] * 3
    i = int(rng.integers(0, len(code)))
    for y in range(6, h - size, int(size * 1.3)):
        line = code[i % len(code)][: int(w / (size * 0.6))]
        i += 1
        x = 8
        if rng.random() < 0.3:  # line numbers in a gutter
            d.text((x, y), f"{i % 1000:4d}", font=f, fill=(120, 120, 120))
            x += int(size * 3)
        for word in line.split(" "):
            d.text((x, y), word, font=f, fill=palette[int(rng.integers(0, len(palette)))])
            x += int(f.getlength(word + " "))
    return img


def ui_screen(rng: Rng, root: Path, fonts: tuple[str, ...], text: list[str], icons: list[Image.Image],
              photos: list[Image.Image]) -> Image.Image:
    """An application window: title bar, toolbar of icons, sidebar list, buttons, fields, a picture, text."""
    w, h = int(rng.integers(640, 1100)), int(rng.integers(420, 800))
    dark = rng.random() < 0.35
    bg, fg = ((40, 42, 46), (225, 225, 225)) if dark else ((245, 245, 245), (30, 30, 30))
    accent = vivid(rng)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    f = font(root, str(rng.choice(fonts)), int(rng.integers(11, 15)))
    d.rectangle((0, 0, w, 30), fill=accent if rng.random() < 0.5 else pastel(rng, dark))
    d.text((12, 8), str(rng.choice(text))[:50], font=f, fill=fg)
    for k, col in enumerate(((230, 80, 70), (240, 190, 50), (80, 190, 80))):
        d.ellipse((w - 80 + 22 * k, 9, w - 66 + 22 * k, 23), fill=col)
    x = 8
    for ic in icons[: int(rng.integers(4, 12))]:  # toolbar
        img.paste(ic, (x, 36), ic)
        x += ic.width + 10
    side = int(rng.integers(140, 240))
    d.rectangle((0, 70, side, h), fill=tuple(max(0, c - 12) for c in bg))
    y = 80
    for k in range(int(rng.integers(6, 18))):
        if k == 2:
            d.rectangle((4, y - 3, side - 4, y + 19), fill=accent)
        ic = icons[int(rng.integers(0, len(icons)))]
        img.paste(ic.resize((16, 16)), (10, y), ic.resize((16, 16)))
        d.text((32, y), str(rng.choice(text))[:22], font=f, fill=fg)
        y += 26
    x0, y0 = side + 20, 86
    pic = photos[int(rng.integers(0, len(photos)))]
    pw = int(rng.integers(120, max(121, (w - x0) // 2)))
    thumb = pic.resize((pw, max(1, pw * pic.height // pic.width)), Image.LANCZOS)
    img.paste(thumb, (x0, y0))
    tx = x0 + pw + 16
    for line in textwrap.wrap(str(rng.choice(text)), max(10, (w - tx) // 7))[:10]:
        d.text((tx, y0), line, font=f, fill=fg)
        y0 += 18
    y0 = max(y0, 86 + thumb.height) + 16
    for _ in range(int(rng.integers(1, 4))):  # fields and buttons
        d.rounded_rectangle((x0, y0, x0 + 220, y0 + 26), 4, outline=(150, 150, 150), fill=pastel(rng, dark))
        d.text((x0 + 6, y0 + 6), str(rng.choice(text))[:24], font=f, fill=fg)
        d.rounded_rectangle((x0 + 236, y0, x0 + 326, y0 + 26), 6, fill=vivid(rng))
        d.text((x0 + 250, y0 + 6), "OK", font=f, fill=(255, 255, 255))
        y0 += 40
    d.rectangle((w - 12, 70, w - 2, h), fill=tuple(max(0, c - 25) for c in bg))  # scrollbar
    return img


def chart(rng: Rng, root: Path, val: bool) -> Image.Image:
    """A matplotlib figure (line, bar, scatter or pie), as in reports and notebooks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    rel = FONT_VAL[0] if val else FONT_TRAIN[0]
    font_manager.fontManager.addfont(str(root / FONTS / rel))
    plt.rcParams["font.family"] = font_manager.FontProperties(fname=str(root / FONTS / rel)).get_name()
    fig, ax = plt.subplots(figsize=(rng.uniform(5, 9), rng.uniform(3.5, 6)), dpi=int(rng.integers(70, 110)))
    kind = int(rng.integers(0, 4))
    x = np.linspace(0, 10, 200)
    if kind == 0:
        for k in range(int(rng.integers(1, 5))):
            ax.plot(x, np.sin(x * rng.uniform(0.3, 2)) * rng.uniform(0.5, 3) + k, lw=rng.uniform(1, 3),
                    label=f"run {k}")
        ax.legend()
    elif kind == 1:
        n = int(rng.integers(3, 12))
        ax.bar([f"q{k}" for k in range(n)], rng.uniform(1, 10, n), color=[np.array(vivid(rng)) / 255 for _ in range(n)])
    elif kind == 2:
        ax.scatter(rng.normal(size=300), rng.normal(size=300), c=rng.uniform(size=300), cmap=str(rng.choice(
            ["viridis", "plasma", "coolwarm", "tab10"])), s=rng.uniform(5, 40))
    else:
        n = int(rng.integers(3, 7))
        ax.pie(rng.uniform(1, 5, n), labels=[f"part {k}" for k in range(n)],
               colors=[np.array(vivid(rng)) / 255 for _ in range(n)])
    ax.set_title(f"Figure {int(rng.integers(1, 99))}: measured values")
    ax.grid(rng.random() < 0.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(buf).convert("RGB")


def comic_page(rng: Rng, root: Path, font_rel: str, text: list[str], clips: list[Image.Image]) -> Image.Image:
    """A comic page: panels with black borders, flat colour and halftone backgrounds, clip art, speech bubbles."""
    w, h = int(rng.integers(560, 900)), int(rng.integers(600, 1000))
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(1, 3))
    pw, ph = (w - 10) // cols, (h - 10) // rows
    f = font(root, font_rel, int(rng.integers(12, 20)))
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = 10 + c * pw, 10 + r * ph, 10 + (c + 1) * pw - 10, 10 + (r + 1) * ph - 10
            d.rectangle((x0, y0, x1, y1), fill=pastel(rng) if rng.random() < 0.6 else vivid(rng))
            if rng.random() < 0.4:  # halftone dots
                col, step = vivid(rng), int(rng.integers(5, 10))
                for yy in range(y0, y1, step):
                    for xx in range(x0 + (yy // step % 2) * step // 2, x1, step):
                        d.ellipse((xx, yy, xx + step // 3, yy + step // 3), fill=col)
            clip = clips[int(rng.integers(0, len(clips)))]
            s = min((x1 - x0) * 0.7 / clip.width, (y1 - y0) * 0.7 / clip.height)
            cl = clip.resize((max(1, int(clip.width * s)), max(1, int(clip.height * s))), Image.LANCZOS)
            img.paste(cl, (x0 + int(rng.integers(0, max(1, x1 - x0 - cl.width))), y1 - cl.height), cl)
            bx, by = x0 + 10, y0 + 10
            words = textwrap.wrap(str(rng.choice(text)).upper(), 18)[:3]
            bw = max(int(f.getlength(t)) for t in words) + 20 if words else 40
            d.ellipse((bx - 6, by - 6, bx + bw, by + 22 * len(words) + 12), fill=(255, 255, 255), outline=(0, 0, 0),
                      width=2)
            for k, t in enumerate(words):
                d.text((bx + 6, by + 4 + 22 * k), t, font=f, fill=(0, 0, 0))
            d.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=int(rng.integers(2, 5)))
    return img


def pattern(rng: Rng) -> Image.Image:
    """Flat saturated colours, gradients, stripes and checks: the colours and edges photos rarely have."""
    w, h = int(rng.integers(400, 900)), int(rng.integers(400, 900))
    img = Image.new("RGB", (w, h), vivid(rng))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 30))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        shape = int(rng.integers(0, 4))
        if shape == 0:
            d.rectangle((x0, y0, x1, y1), fill=vivid(rng))
        elif shape == 1:
            d.ellipse((x0, y0, x1, y1), fill=vivid(rng), outline=vivid(rng), width=int(rng.integers(0, 6)))
        elif shape == 2:
            step = int(rng.integers(3, 24))
            a, b = vivid(rng), vivid(rng)
            for k, xx in enumerate(range(x0, x1, step)):
                d.rectangle((xx, y0, xx + step - 1, y1), fill=a if k % 2 else b)
        else:
            a, b = np.array(vivid(rng), float), np.array(vivid(rng), float)
            t = np.linspace(0, 1, x1 - x0)[None, :, None]
            grad = (a * (1 - t) + b * t).repeat(y1 - y0, 0).astype(np.uint8)
            img.paste(Image.fromarray(grad), (x0, y0))
    return img


# ------------------------------------------------------------------------------------------- degradations


def old_photo_scan(img: Image.Image, rng: Rng) -> Image.Image:
    """A scanned print: faded or sepia colours, lifted blacks, grain, blur, dust and scratches, paper border."""
    a = np.asarray(img).astype(np.float32) / 255
    grey = a.mean(2, keepdims=True)
    if rng.random() < 0.4:  # sepia
        a = grey * np.array([1.07, 0.92, 0.72])
    else:  # faded colour print with a colour cast
        a = grey + (a - grey) * rng.uniform(0.3, 0.8)
        a = a * rng.uniform(0.85, 1.1, 3)
    a = 0.08 + a * rng.uniform(0.7, 0.88)  # lifted blacks, dull whites
    hh, ww = a.shape[:2]
    yy, xx = np.mgrid[0:hh, 0:ww]
    vign = 1 - rng.uniform(0.1, 0.35) * (((yy / hh - 0.5) ** 2 + (xx / ww - 0.5) ** 2) * 2)
    a = a * vign[..., None] + rng.normal(0, rng.uniform(0.01, 0.04), a.shape[:2])[..., None]
    out = Image.fromarray((a.clip(0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    d = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(10, 60))):  # dust
        x, y, r = int(rng.integers(0, ww)), int(rng.integers(0, hh)), int(rng.integers(1, 3))
        d.ellipse((x, y, x + r, y + r), fill=(235, 230, 220) if rng.random() < 0.7 else (30, 25, 20))
    for _ in range(int(rng.integers(0, 4))):  # scratches
        x = int(rng.integers(0, ww))
        d.line((x, 0, x + int(rng.integers(-30, 30)), hh), fill=(225, 220, 210), width=1)
    border = int(rng.integers(8, 30))
    page = Image.new("RGB", (ww + 2 * border, hh + 2 * border), (236, 230, 214))
    page.paste(out.rotate(rng.uniform(-1.5, 1.5), Image.BICUBIC, fillcolor=(236, 230, 214)), (border, border))
    return page


def document_scan(img: Image.Image, rng: Rng) -> Image.Image:
    """A scanned printed page: paper tone, uneven light, slight rotation and blur, scanner noise, JPEG."""
    a = np.asarray(img.convert("L") if rng.random() < 0.5 else img).astype(np.float32) / 255
    if a.ndim == 2:
        a = a[..., None].repeat(3, 2)
    paper = np.array([rng.uniform(0.85, 0.97), rng.uniform(0.83, 0.95), rng.uniform(0.75, 0.9)])
    a = a * paper + (1 - a) * 0.06 * rng.uniform(0.5, 2)
    hh, ww = a.shape[:2]
    light = 1 - rng.uniform(0.05, 0.25) * np.linspace(0, 1, ww)[None, :] ** 2
    a = a * light[..., None] + rng.normal(0, 0.015, a.shape)
    out = Image.fromarray((a.clip(0, 1) * 255).astype(np.uint8))
    out = out.rotate(rng.uniform(-2, 2), Image.BICUBIC, expand=False, fillcolor=(60, 60, 60))
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return jpeg(out, int(rng.integers(50, 90)))


def noisy_photo(img: Image.Image, rng: Rng) -> Image.Image:
    """A phone picture in poor light: shot and read noise with chroma blotches, sharpening, strong JPEG."""
    a = np.asarray(img).astype(np.float32) / 255
    gain = rng.uniform(0.6, 1.0)  # underexposure, pushed back up
    a = a * gain
    photons = rng.uniform(200, 1500)
    a = rng.poisson(a * photons) / photons + rng.normal(0, rng.uniform(0.005, 0.03), a.shape)
    chroma = rng.normal(0, rng.uniform(0.0, 0.03), (a.shape[0] // 4 + 1, a.shape[1] // 4 + 1, 3))
    a = a + np.kron(chroma, np.ones((4, 4, 1)))[: a.shape[0], : a.shape[1]]
    a = a / gain
    out = Image.fromarray((a.clip(0, 1) * 255).astype(np.uint8))
    if rng.random() < 0.6:
        out = out.filter(ImageFilter.UnsharpMask(radius=rng.uniform(1, 2.5), percent=int(rng.integers(60, 160))))
    return jpeg(out, int(rng.integers(25, 75)))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# ---------------------------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class Item:
    """One image of the listing."""

    name: str
    role: str
    kind: str
    weight: float
    origin: str
    licence: str
    make: Callable[[], Image.Image]


def clip_art(root: Path, rng: Rng, n: int, skip: set[Path]) -> list[Path]:
    """n clip-art files drawn without replacement (directories with duplicates counted once), not in skip."""
    files = sorted({p.name: p for p in (root / CLIPART).rglob("*.png")}.values())
    files = [f for f in files if f not in skip and "gradient" not in str(f) and "icons" not in str(f)]
    return [files[i] for i in rng.choice(len(files), n, replace=False)]


def items(root: Path) -> Iterator[Item]:
    """Every image of the listing, each with a function that renders it."""
    rng = np.random.default_rng(SEED)
    prose, code = corpus()
    split = len(prose) * 4 // 5  # val pages render other text than training pages
    text = {"train": prose[:split], "val": prose[split:]}
    fonts = {"train": FONT_TRAIN, "val": FONT_VAL}
    icons = [Image.open(p).convert("RGBA") for p in sorted((root / "usr/share/icons/Tango/32x32").rglob("*.png"))]
    for s in SOURCES:
        if s.role != "base":
            yield Item(s.name, s.role, s.kind, s.weight, s.origin, s.licence, lambda s=s: load(s.ref, root))
    train_clips = clip_art(root, rng, 70, set())
    val_clips = clip_art(root, rng, 8, set(train_clips))
    for role, clips in (("train", train_clips[:50]), ("val", val_clips[:4])):
        for p in clips:
            yield Item(f"clipart-{p.stem}", role, "art", 0.4, "openclipart-png", CLIPART_LICENCE,
                       lambda p=p: load(str(p.relative_to(root)), root))
    clip_imgs = {role: [fit(Image.open(p).convert("RGBA"), 400) for p in files]
                 for role, files in (("train", train_clips[50:]), ("val", val_clips[4:]))}
    portraits = sorted((root / FLARE).glob("*/images/portraits/*.png"))
    sheets = [portraits[i:i + 6] for i in range(0, len(portraits), 6)]
    for k, sheet in enumerate(sheets):
        role = "val" if k == len(sheets) - 1 else "train"
        yield Item(f"flare-portraits-{k}", role, "art", 0.6, "flare-game", FLARE_LICENCE,
                   lambda sheet=sheet, k=k: portrait_sheet(root, sheet, np.random.default_rng(SEED + 100 + k)))
    photos = [s for s in SOURCES if s.kind == "photo" and s.role == "train"]
    bases = [s for s in SOURCES if s.role == "base"]
    n = {"train": (24, 24, 16, 20, 16, 20), "val": (3, 2, 1, 2, 1, 0)}  # ui, text, terminal, charts, comics, patterns
    for role in ("train", "val"):
        r = np.random.default_rng(SEED + (1 if role == "train" else 2))
        thumbs = [fit(load(s.ref, root), 400) for s in (photos if role == "train" else bases)]
        seeds = iter(r.integers(0, 2**31, 1000))
        nui, ntext, nterm, nchart, ncomic, npat = n[role]
        for k in range(nui):
            yield Item(f"ui-{k}", role, "screen", 1.0, "generated", OWN + "; Tango icons (public domain); fonts",
                       _seeded(next(seeds),
                               lambda g, role=role, th=thumbs: ui_screen(g, root, fonts[role], text[role], icons, th)))
        for k in range(ntext):
            yield Item(f"text-{k}", role, "screen", 1.0, "generated", OWN + "; fonts",
                       _seeded(next(seeds), lambda g, role=role: text_page(g, root, fonts[role], text[role])))
        for k in range(nterm):
            yield Item(f"terminal-{k}", role, "screen", 1.0, "generated", OWN + "; Python stdlib source (PSF)",
                       _seeded(next(seeds), lambda g, role=role: terminal(g, root, MONO[role], code)))
        for k in range(nchart):
            yield Item(f"chart-{k}", role, "screen", 0.7, "generated (matplotlib)", OWN,
                       _seeded(next(seeds), lambda g, role=role: chart(g, root, role == "val")))
        for k in range(ncomic):
            yield Item(f"comic-{k}", role, "art", 1.0, "generated", OWN + "; Open Clip Art (public domain)",
                       _seeded(next(seeds),
                               lambda g, role=role: comic_page(g, root, COMIC_FONT[role], text[role], clip_imgs[role])))
        for k in range(npat):
            yield Item(f"pattern-{k}", role, "art", 1.5, "generated", OWN, _seeded(next(seeds), pattern))
        # degraded photographs and documents: training degrades training photos, validation the base photos
        srcs = photos if role == "train" else bases
        nscan, ndoc, nnoisy = (24, 12, 30) if role == "train" else (4, 2, 6)
        for k in range(nscan):
            s = srcs[k % len(srcs)]
            yield Item(f"oldscan-{k}-{s.name}", role, "scan", 1.0, s.origin, s.licence + "; degraded by this script",
                       _seeded(next(seeds),
                               lambda g, s=s, role=role: old_photo_scan(fit(load(s.ref, root), LONG_SIDE[role] - 60),
                                                                        g)))
        for k in range(ndoc):
            yield Item(f"docscan-{k}", role, "scan", 1.0, "generated", OWN + "; fonts",
                       _seeded(next(seeds),
                               lambda g, role=role: document_scan(text_page(g, root, fonts[role], text[role]), g)))
        for k in range(nnoisy):
            s = srcs[(k * 7 + 3) % len(srcs)]
            yield Item(f"noisy-{k}-{s.name}", role, "noisy", 1.0, s.origin, s.licence + "; degraded by this script",
                       _seeded(next(seeds),
                               lambda g, s=s, role=role: noisy_photo(fit(load(s.ref, root), LONG_SIDE[role]), g)))


def portrait_sheet(root: Path, files: list[Path], rng: Rng) -> Image.Image:
    """Game portraits (320x320) side by side on a dark panel, as a character-selection screen shows them."""
    img = Image.new("RGB", (3 * 330 + 10, 2 * 330 + 10), pastel(rng, dark=True))
    for k, p in enumerate(files):
        im = Image.open(p).convert("RGBA")
        img.paste(im, (10 + (k % 3) * 330, 10 + (k // 3) * 330), im)
    return img


def _seeded(seed: int, fn: Callable[[Rng], Image.Image]) -> Callable[[], Image.Image]:
    return lambda: fn(np.random.default_rng(int(seed)))


def build(cache: Path) -> Path:
    """Render every image of the listing under cache/images; returns the listing's path."""
    root = fetch(cache)
    out = cache / "images"
    rows = []
    for it in items(root):
        path = out / it.role / it.kind / f"{it.name}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            img = fit(it.make(), LONG_SIDE[it.role])
            tmp = path.with_suffix(".tmp.png")
            img.save(tmp, compress_level=1)
            tmp.replace(path)
        rows.append((it.name, it.role, it.kind, it.weight, it.origin, it.licence, str(path.relative_to(out))))
    listing = out / "listing.tsv"
    with listing.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(("name", "role", "kind", "weight", "origin", "licence", "path"))
        w.writerows(rows)
    return listing


@dataclass(frozen=True)
class Entry:
    """One row of the listing."""

    name: str
    role: str
    kind: str
    weight: float
    origin: str
    licence: str
    path: Path


def read_listing(cache: Path, role: str | None = None) -> list[Entry]:
    """The listing written by build(), optionally only one role."""
    out = cache / "images"
    with (out / "listing.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    entries = [Entry(r["name"], r["role"], r["kind"], float(r["weight"]), r["origin"], r["licence"], out / r["path"])
               for r in rows]
    return [e for e in entries if role is None or e.role == role]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vaecli-default-data")
    args = ap.parse_args()
    listing = build(args.cache)
    entries = read_listing(args.cache)
    for role in ("train", "val"):
        counts = {k: sum(1 for e in entries if e.role == role and e.kind == k) for k in KINDS}
        print(role, sum(counts.values()), counts)
    print(f"wrote {listing}")


if __name__ == "__main__":
    main()
