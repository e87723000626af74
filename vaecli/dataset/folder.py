"""The folder layout: one latent file per image under OUT in the vaecli, kohya or comfyui format.

Every file embeds its manifest record (safetensors metadata or a 0-d string array in a kohya .npz), so a
later run decides from the file alone whether it may be reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import safejson
from ..discovery import Item
from ..files import check_regular
from ..io import atomic_write
from .options import RECORD_KEY, DatasetOptions


def output_paths(item: Item, out: Path, options: DatasetOptions) -> tuple[Path, Path | None]:
    """(file holding the latent, separate file of the flipped latent or None)."""
    if options.kohya_next_to_images:
        main = item.input.with_suffix(".npz")
    else:
        assert item.output is not None
        main = item.output
    flipped = flipped_path(main) if options.flip and options.format == "comfyui" else None
    return main, flipped


def flipped_path(main: Path) -> Path:
    """The ComfyUI file of a flipped latent, beside its main file."""
    return main.with_name(main.name[: -len(".latent")] + ".flipped.latent")


def read_record(path: Path, fmt: str) -> dict[str, Any] | None:
    """The manifest record embedded in a latent file; None when missing, partial, or not ours."""
    try:
        check_regular(path)  # a FIFO or device there would block the readers below
        if fmt == "kohya":
            with np.load(path, allow_pickle=False) as npz:
                if RECORD_KEY not in npz.files or "latents" not in npz.files:
                    return None
                text = str(npz[RECORD_KEY])
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(RECORD_KEY, "")
        rec = safejson.loads(text)
        return rec if isinstance(rec, dict) else None
    except Exception:  # noqa: BLE001 - any failure means "not a usable output": it is re-encoded
        return None


def write_outputs(
    record: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    main: Path,
    flipped: Path | None,
    fmt: str,
    file_meta: dict[str, str],
) -> None:
    """Write one item's file(s) atomically, each embedding `record` and our latent metadata (so `vaecli
    decode` reads every format); the main file last (it marks completion)."""
    from safetensors.torch import save_file

    from ..exports import META_KEY, kohya_arrays, text_array, write_comfyui, write_kohya

    text = json.dumps(record, sort_keys=True)
    meta = {**file_meta, RECORD_KEY: text}
    if fmt == "vaecli":
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(main, lambda tmp: save_file(data, str(tmp), metadata=meta))
    elif fmt == "kohya":
        arrays = kohya_arrays(tensors, record)
        arrays[RECORD_KEY] = np.array(text)  # 0-d unicode arrays: np.load reads them without pickle
        arrays[META_KEY] = text_array(file_meta)
        write_kohya(main, arrays)
    else:
        if flipped is not None:
            write_comfyui(flipped, tensors["latent_flipped"], meta)
        write_comfyui(main, tensors["latent"], meta)
