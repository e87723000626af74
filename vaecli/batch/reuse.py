"""Existing outputs: whether one is current (ours, whole, made from exactly the same inputs) and kept, or
remade, or in the way."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError
from ..outputs import OutputState

_LABELS = {"source_sha256": "source file", "model_sha256": "model", "model_identity_sha256": "model config or weights"}


def reuse_output(state: OutputState, want: Mapping[str, str], overwrite: bool, path: Path) -> tuple[bool, str | None]:
    """(skip, note) for an existing output: skip when it is ours, whole, and made from exactly `want`.

    A stale or incomplete output is remade (with a note saying why). A file that is not ours is never
    replaced without `overwrite`: InputError, as for a path that cannot be replaced at all.
    """
    if state.status == "missing":
        return False, None
    if state.status == "blocked":
        raise InputError(f"cannot replace the output {path}: {state.detail}")
    if state.status == "foreign":
        if overwrite:
            return False, f"replaced {path.name}, which was not written by vaecli"
        raise InputError(
            f"the output {path} already exists and {state.detail}; pass --overwrite to replace it, "
            "or choose another output folder"
        )
    if overwrite:
        return False, None
    if state.status == "incomplete":
        return False, f"replaced an incomplete output ({state.detail})"
    changed = [_LABELS.get(k, k) for k, v in want.items() if state.record.get(k, "") != v]
    if not changed:
        return True, None
    return False, f"replaced a stale output (changed: {', '.join(changed)})"


def wanted(record: Mapping[str, str]) -> dict[str, str]:
    """The entries of a provenance record that decide whether an output is current (not version or name)."""
    return {k: v for k, v in record.items() if k not in ("vaecli_version", "source")}
