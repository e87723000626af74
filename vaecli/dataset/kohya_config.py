"""Bucket settings from a kohya-ss sd-scripts dataset config (`--dataset_config dataset.toml`), so that a
`--format kohya` cache is made with exactly the buckets kohya computes when it trains on it.

Read from sd-scripts' library/config_util.py (same at v0.9.1, 8f4ee8fc, and main, 48d368fa): a value is
looked up in the subset, then its dataset, then [general], then kohya's command line, then kohya's
defaults (DreamBoothDatasetParams: enable_bucket false, min_bucket_reso 256, max_bucket_reso 1024,
bucket_reso_steps 64, bucket_no_upscale false). Our own flags stand for kohya's command line. With
enable_bucket, kohya rounds min_bucket_reso down and max_bucket_reso up to the step
(adjust_min_max_bucket_reso_by_steps) and requires min <= resolution <= max; without it, every image goes
to the one bucket resolution x resolution.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

KOHYA_DEFAULTS: dict[str, Any] = {
    "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
    "bucket_no_upscale": False, "flip_aug": False, "random_crop": False, "alpha_mask": False, "resolution": None,
}
BUCKET_KEYS = (
    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
)
# kohya's names for our flags (its command line): given flags fill what the config leaves out
FLAG_NAMES = {"resolution": "--bucket-resolution", "min_bucket_reso": "--min-bucket-size",
              "max_bucket_reso": "--max-bucket-size", "bucket_reso_steps": "--bucket-step",
              "bucket_no_upscale": "--no-upscale", "flip_aug": "--flip"}


@dataclass(frozen=True)
class KohyaBuckets:
    """The DatasetOptions fields a kohya config decides."""

    bucket_resolution: int
    bucket_step: int
    min_bucket_size: int
    max_bucket_size: int
    no_upscale: bool
    flip: bool

    def as_options(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_kohya_config(path: str | Path, inputs: Sequence[str | Path], flags: Mapping[str, Any]) -> KohyaBuckets:
    """The bucket settings kohya uses for the dataset of `inputs` in the config at `path`.

    flags: our flags the user gave, by kohya name (resolution, min_bucket_reso, ...): kohya's command line.
    A flag that the config also sets to another value is refused (kohya would use the config's).
    """
    config = _load_toml(Path(path))
    general = _table(config.get("general", {}), "[general]")
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError(f"{path}: no [[datasets]] in this kohya dataset config")
    chosen = _choose_dataset(Path(path), datasets, general, inputs, flags)
    dataset, subsets = chosen
    lookup = _Lookup([dataset, general], flags)
    for key in (*BUCKET_KEYS, "flip_aug"):
        lookup.conflict(key, path)
    per_subset = [_Lookup([s, dataset, general], flags) for s in subsets] or [lookup]
    for key, why in (("random_crop", "kohya cannot cache latents with random_crop"),
                     ("alpha_mask", "vaecli writes no alpha_mask array, so kohya would re-cache (v0.9.1) or fail")):
        if any(s.get(key) for s in per_subset):
            raise ConfigError(f"{path}: {key} = true: not supported ({why}); drop it from the config to cache")
    return _buckets(lookup, any(s.get("flip_aug") for s in per_subset), path)


def _buckets(lookup: _Lookup, flip: bool, path: str | Path) -> KohyaBuckets:
    resolution = _resolution(lookup.get("resolution"), path)
    if not lookup.get("enable_bucket"):
        if resolution % 8:
            raise ConfigError(f"{path}: resolution {resolution} without buckets is not a multiple of 8")
        return KohyaBuckets(resolution, 8, resolution, resolution, False, flip)  # one bucket: resolution^2
    step = _positive_int(lookup.get("bucket_reso_steps"), "bucket_reso_steps", path)
    lo = _positive_int(lookup.get("min_bucket_reso"), "min_bucket_reso", path)
    hi = _positive_int(lookup.get("max_bucket_reso"), "max_bucket_reso", path)
    lo -= lo % step  # kohya's adjust_min_max_bucket_reso_by_steps
    hi += (step - hi % step) % step
    if not lo <= resolution <= hi:
        raise ConfigError(
            f"{path}: kohya needs min_bucket_reso {lo} <= resolution {resolution} <= max_bucket_reso {hi}"
        )
    return KohyaBuckets(resolution, step, lo, hi, bool(lookup.get("bucket_no_upscale")), flip)


class _Lookup:
    """kohya's value search: the config tables in order, then the command line (our flags), then defaults."""

    def __init__(self, tables: list[Mapping[str, Any]], flags: Mapping[str, Any]) -> None:
        self.tables, self.flags = tables, flags

    def get(self, key: str) -> Any:
        for table in self.tables:
            if table.get(key) is not None:
                return table[key]
        if self.flags.get(key) is not None:
            return self.flags[key]
        return KOHYA_DEFAULTS.get(key)

    def conflict(self, key: str, path: str | Path) -> None:
        in_config = next((t[key] for t in self.tables if t.get(key) is not None), None)
        given = self.flags.get(key)
        if in_config is not None and given is not None and _norm(in_config) != _norm(given):
            raise ConfigError(f"{FLAG_NAMES.get(key, key)} {given} contradicts {key} = {in_config} in {path} "
                              "(kohya uses the config's value); drop the flag")


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _choose_dataset(
    path: Path, datasets: list[dict[str, Any]], general: Mapping[str, Any], inputs: Sequence[str | Path],
    flags: Mapping[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dataset whose subsets' image_dir are the inputs; any dataset when all share their bucket settings."""
    entries = [(d, [_table(s, "a subset") for s in d.get("subsets", []) or []]) for d in datasets]
    wanted = {_identity(i) for i in inputs} - {None}
    matching = [e for e in entries if any(_identity(s.get("image_dir", "")) in wanted for s in e[1])]
    if len(matching) == 1:
        return matching[0]
    candidates = matching or entries
    settings = {tuple(str(_Lookup([d, general], flags).get(k)) for k in BUCKET_KEYS) for d, _ in candidates}
    if len(settings) == 1:
        return candidates[0]
    dirs = [s.get("image_dir", "?") for _, subs in candidates for s in subs]
    raise ConfigError(f"{path}: its datasets have different bucket settings and none has exactly the inputs as "
                      f"image_dir ({', '.join(map(str, dirs[:6]))}); encode one dataset's image_dir at a time")


def _identity(path: Any) -> tuple[int, int] | None:
    try:
        st = os.stat(Path(str(path)).expanduser())
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolution(value: Any, path: str | Path) -> int:
    if value is None:
        raise ConfigError(f"{path}: no resolution in the config; give it there or as --bucket-resolution")
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{path}: resolution {value}: only square resolutions are supported")
        value = value[0]
    return _positive_int(value, "resolution", path)


def _positive_int(value: Any, key: str, path: str | Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: {key} must be a positive whole number, not {value!r}")
    return value


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"kohya dataset config: {where} is not a table")
    return value


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError("--kohya-config needs Python 3.11 (tomllib) or the tomli package") from None
    from ..files import open_regular

    try:
        with open_regular(path) as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, ValueError) as exc:  # InputError is a ValueError: a missing file, a FIFO
        raise ConfigError(f"{path}: cannot read the kohya dataset config ({exc})") from None
