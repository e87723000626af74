"""What is at an output path before a run writes it: one OutputState, shared by image and latent outputs.

It lives below images (io.py) and latent containers (latents/) because both judge their outputs the same way
first (missing, a folder, a symlink, empty) and only then by their own format.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .files import file_kind


@dataclass
class OutputState:
    """What is at an output path before a run writes it.

    status: missing, blocked (a folder, FIFO, device: cannot be replaced), incomplete (empty, truncated or
    unreadable: remade), foreign (a complete file without our record: replaced only with --overwrite), ours.
    """

    status: str
    record: dict[str, str] = field(default_factory=dict)  # our provenance (images) or metadata (latents)
    detail: str = ""


def path_state(path: Path) -> OutputState | None:
    """The state of a path that is missing, not a regular file, or a symlink; None for a regular file
    (whose state only its format's reader can tell)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return OutputState("missing")
    except OSError as exc:
        return OutputState("blocked", detail=f"cannot inspect it: {exc.strerror or exc}")
    if stat.S_ISLNK(st.st_mode):
        return OutputState("foreign", detail="it is a symlink (vaecli never writes one)")
    if not stat.S_ISREG(st.st_mode):
        return OutputState("blocked", detail=f"it is {file_kind(st.st_mode)}")
    if st.st_size == 0:
        return OutputState("incomplete", detail="empty file")
    return None
