"""Models from the Hugging Face Hub (optional extra `hub`): fetch only a VAE's own files, and say exactly why
when that fails (extra missing, offline, gated, not logged in, misspelled, no such revision or file).

A Hub source is `owner/name` (a VAE repo, or a pipeline repo whose VAE is in `vae/`) or
`owner/name/path/to/file.safetensors` (one single-file checkpoint in a repo). Nothing else is downloaded:
not the UNet, the text encoders or full checkpoints that a pipeline repo also holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import safejson
from .errors import WeightsError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
EXTRA_HINT = "pip install 'vaecli[hub]'"


@dataclass(frozen=True)
class HubSource:
    """What to fetch: a repo (with optional subfolder) or one file in it."""

    repo_id: str
    filename: str | None = None  # a single weights file inside the repo
    subfolder: str | None = None  # a diffusers model folder inside the repo (e.g. "vae")
    revision: str | None = None  # branch, tag or commit
    variant: str | None = None  # e.g. "fp16": diffusion_pytorch_model.fp16.safetensors


def parse(source: str, subfolder: str | None = None, revision: str | None = None,
          variant: str | None = None) -> HubSource | None:
    """A HubSource when `source` has the form of a Hub id (owner/name[/path/file.ext]), else None."""
    parts = source.split("/")
    if len(parts) < 2 or not REPO_ID.fullmatch("/".join(parts[:2])) or any(p in ("", ".", "..") for p in parts):
        return None
    if len(parts) == 2:
        return HubSource("/".join(parts), None, subfolder, revision, variant)
    filename = "/".join(parts[2:])
    if not filename.lower().endswith(WEIGHT_SUFFIXES):
        return None
    return HubSource("/".join(parts[:2]), filename, subfolder, revision, variant)


def weights_names(variant: str | None) -> tuple[str, ...]:
    """diffusers' weight file names for a variant, safetensors first."""
    infix = f".{variant}" if variant else ""
    return (f"diffusion_pytorch_model{infix}.safetensors", f"diffusion_pytorch_model{infix}.bin")


def fetch(src: HubSource) -> Path:
    """A local path for `src`: the cached file, or a cached folder holding config.json and one weights file.

    Tries the local cache first (works offline), then the Hub. Raises WeightsError with the reason.
    """
    try:
        import huggingface_hub  # noqa: F401 - optional extra
    except ImportError:
        raise WeightsError(
            f"{src.repo_id!r} is not a local file or folder; to load it from the Hugging Face Hub, install "
            f"the hub extra: {EXTRA_HINT}"
        ) from None
    try:
        return _fetch(src, offline=True)
    except _NotCached:
        pass
    _check_reachable(src)
    return _fetch(src, offline=False)


REACH_TIMEOUT_S = 3.0  # a TCP connect to the Hub; huggingface_hub's own retries took ~23 s to give up offline


def _check_reachable(src: HubSource) -> None:
    """Fail fast when the Hub's host cannot be reached at all (no network, no DNS): one TCP connect with a
    short timeout instead of the client's retries. Skipped behind a proxy, which may reach what we cannot."""
    import os
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return
    failure: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
        except OSError as exc:
            failure.append(exc.strerror or type(exc).__name__)

    # getaddrinfo has no timeout of its own: the connect runs in a thread that is abandoned if it hangs
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(REACH_TIMEOUT_S + 0.5)
    if probe.is_alive() or failure:
        why = failure[0] if failure else "no answer"
        raise WeightsError(
            f"{_where(src)}: not in the local cache, and the Hub ({host}) cannot be reached ({why}): connect once "
            "to download it, set HF_ENDPOINT to a mirror, or pass a local path"
        )


class _NotCached(Exception):
    """The files are not in the local cache (only raised by offline attempts)."""


def _fetch(src: HubSource, offline: bool) -> Path:
    """One attempt, from the cache only (offline) or from the Hub; offline misses raise _NotCached."""
    download = _downloader(src, offline)
    if src.filename is not None:
        found = _try(download, src.filename)
        if found is not None:
            return Path(found)
        if offline:
            raise _NotCached()
        raise WeightsError(f"{_where(src)}: no file {src.filename!r}")
    folders = [src.subfolder] if src.subfolder else ["", "vae"]  # a VAE repo, or a pipeline's vae/
    for folder in folders:
        config = _try(download, _join(folder, "config.json"))
        if config is None or not _is_vae_config(Path(config)):
            continue
        for name in weights_names(src.variant):
            weights = _try(download, _join(folder, name))
            if weights is not None:
                return Path(weights).parent
        if offline:
            raise _NotCached()
        raise WeightsError(
            f"{_where(src)}: {_join(folder, 'config.json')} is there but none of "
            f"{', '.join(_join(folder, n) for n in weights_names(src.variant))}"
            + (" (is the variant right?)" if src.variant else "")
        )
    if offline:
        raise _NotCached()
    looked = " or ".join(_join(f, "config.json") for f in folders)
    raise WeightsError(
        f"{_where(src)}: no AutoencoderKL config at {looked}; name the VAE's folder with --subfolder, or one "
        "weights file as owner/name/path/file.safetensors"
    )


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _where(src: HubSource) -> str:
    return f"Hub repo {src.repo_id}" + (f" at revision {src.revision}" if src.revision else "")


def _is_vae_config(path: Path) -> bool:
    try:
        data = safejson.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (
        data.get("_class_name") == "AutoencoderKL" or ("latent_channels" in data and "block_out_channels" in data)
    )


def _try(download: Callable[[str], str], filename: str) -> str | None:
    """The downloaded path, or None when the repo (or, offline, the cache) lacks that file."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return download(filename)
    except (EntryNotFoundError, _NotCached):
        return None


def _downloader(src: HubSource, offline: bool) -> Callable[[str], str]:
    from huggingface_hub import hf_hub_download

    def download(filename: str) -> str:
        try:
            return hf_hub_download(src.repo_id, filename, revision=src.revision, local_files_only=offline)
        except Exception as exc:  # noqa: BLE001 - classified below into one actionable line
            raise _classify(exc, src, filename, offline) from None

    return download


def _classify(exc: Exception, src: HubSource, filename: str, offline: bool) -> Exception:
    """huggingface_hub's exception -> _NotCached (try online), EntryNotFoundError (file absent) or WeightsError."""
    from huggingface_hub import errors as e

    where = _where(src)
    if offline and isinstance(exc, (e.LocalEntryNotFoundError, e.EntryNotFoundError)):
        return _NotCached()
    if isinstance(exc, e.LocalEntryNotFoundError):
        return WeightsError(
            f"{where}: not in the local cache, and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1, or a "
            "network problem); connect once to download it, or pass a local path"
        )
    if isinstance(exc, e.EntryNotFoundError):
        return exc  # the caller tries the next candidate
    if isinstance(exc, e.GatedRepoError):
        return WeightsError(
            f"{where} is gated: accept its conditions on https://huggingface.co/{src.repo_id} with your account, "
            "then log in here (`hf auth login`, or set HF_TOKEN)"
        )
    if isinstance(exc, e.RevisionNotFoundError):
        return WeightsError(f"{where}: no revision {src.revision!r} (a branch, tag or commit of that repo)")
    if isinstance(exc, e.RepositoryNotFoundError):
        return WeightsError(
            f"no Hub repo {src.repo_id!r}: check the spelling; if it is private, log in (`hf auth login`, or set "
            "HF_TOKEN) with an account that can read it"
        )
    if isinstance(exc, e.HfHubHTTPError):
        return WeightsError(f"{where}: the Hub refused {filename}: {_first_line(exc)}")
    if isinstance(exc, (OSError, ValueError)):
        return WeightsError(f"{where}: cannot fetch {filename}: {_first_line(exc)}")
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(src: HubSource) -> dict[str, Any]:
    """What was asked for, for ModelInfo notes and --json."""
    return {k: v for k, v in vars(src).items() if v is not None}
