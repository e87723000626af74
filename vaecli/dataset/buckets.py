"""Aspect-ratio buckets, resize-to-cover and crops, as kohya-ss sd-scripts computes them.

Bucketing follows kohya-ss sd-scripts (library/model_util.py make_bucket_resolutions and
library/train_util.py BucketManager.select_bucket), so a kohya export lands in the bucket kohya computes.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


def make_buckets(
    resolution: int, step: int = 64, min_size: int | None = None, max_size: int | None = None
) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), sorted: sides multiples of `step` within [min, max], area <= resolution^2.

    The square bucket plus, for every width from min to max in steps, the tallest height that keeps the
    area (kohya's make_bucket_resolutions, so both tools produce the same list).
    """
    lo = min_size if min_size is not None else resolution // 2
    hi = max_size if max_size is not None else resolution * 2
    area = resolution * resolution
    side = int(math.sqrt(area) // step) * step
    buckets = {(side, side)}
    for width in range(lo, hi + 1, step):
        height = min(hi, (area // width) // step * step)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket and the size it is resized to before the crop (both width, height)."""

    bucket: tuple[int, int]
    resized: tuple[int, int]


def _round_to_step(x: float, step: int) -> int:
    n = int(x + 0.5)
    return n - n % step


def select_bucket(
    width: int, height: int, buckets: Sequence[tuple[int, int]], step: int, no_upscale: bool, max_area: int
) -> BucketChoice:
    """The bucket for an image of width x height, and the size that covers it (kohya's select_bucket).

    Resizing: the bucket with the nearest aspect ratio (an exact size match wins), then the smallest scale
    that covers it. no_upscale: images above max_area shrink to about max_area; the bucket is the image
    size rounded down to `step`, so small images are never enlarged.
    """
    aspect = width / height
    if not no_upscale:
        if (width, height) in buckets:
            bucket = (width, height)
        else:
            errors = [abs(bw / bh - aspect) for bw, bh in buckets]
            bucket = buckets[int(np.argmin(errors))]  # first of equal errors, as numpy's argmin
        bw, bh = bucket
        scale = bh / height if aspect > bw / bh else bw / width  # cover: the relatively shorter side fits
        return BucketChoice(bucket, (int(width * scale + 0.5), int(height * scale + 0.5)))
    if width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        # Round one side to the step and derive the other; keep whichever keeps the aspect ratio better.
        w1 = _round_to_step(rw, step)
        h1 = _round_to_step(w1 / aspect, step)
        h2 = _round_to_step(rh, step)
        w2 = _round_to_step(h2 * aspect, step)
        if h1 and w2 and abs(w1 / h1 - aspect) < abs(w2 / h2 - aspect):
            resized = (w1, int(w1 / aspect + 0.5))
        else:
            resized = (int(h2 * aspect + 0.5), h2)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] == 0 or bucket[1] == 0:
        raise InputError(
            f"image is {width}x{height}: with --no-upscale a side below --bucket-step {step} leaves no bucket"
        )
    return BucketChoice(bucket, resized)


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], random_crop: bool, seed: int, key: str) -> list[int]:
    """[left, top, right, bottom] of the bucket-sized window in the resized image (centre, or seeded random)."""
    (rw, rh), (bw, bh) = resized, bucket
    if random_crop:
        digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()  # any file name
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return [left, top, left + bw, top + bh]
