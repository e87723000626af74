"""The folder layout: one latent file per image under OUT (or beside it, where the container allows), in the
container of --format.

Every file embeds its manifest record (vaecli.latents: Container.write_item, read_record), so a later run
decides from the file alone whether it may be reused.
"""

from __future__ import annotations

from pathlib import Path

from ..discovery import Item
from .options import DatasetOptions


def output_paths(item: Item, out: Path, options: DatasetOptions) -> tuple[Path, Path | None]:
    """(file holding the latent, separate file of the flipped latent or None)."""
    container = options.container()
    if options.kohya_next_to_images:
        main = item.input.with_suffix(container.suffix)
    else:
        assert item.output is not None
        main = item.output
    flipped_path = container.flipped_path if options.flip else None  # None: the flipped latent is in the main file
    return main, flipped_path(main) if flipped_path is not None else None
