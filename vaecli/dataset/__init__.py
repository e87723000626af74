"""Dataset preparation: aspect-ratio buckets, resize and crop, latent caches with a manifest, sharding.

`prepare_dataset` encodes a folder of images into bucket-sized latents under OUT and writes
OUT/manifest.jsonl (one JSON object per image). One module per concern:

  options.py      DatasetOptions (one CLI flag per field), their checks, constants
  buckets.py      kohya's bucket list, bucket choice, resize-to-cover and crop windows
  encoder.py      the per-image steps all pipelines share: place, encode, record, file metadata
  folder.py       the folder layout: where each image's latent file(s) go, in the container of --format
  manifest.py     manifest.jsonl, shard manifests and their merge
  distributed.py  --shard i/n (Slurm arrays) and torchrun: dealing work, barriers, local devices
  jobs.py         the pipelines as Jobs on the batch engine: FolderJob (image files), SampleJob (shard samples)
  report.py       DatasetReport
  core.py         prepare_dataset: folders here, shards dispatched to the shard pipeline
  locations.py    shard lists: brace expansion, globs, local paths and fsspec URLs, input identity
  sample.py       a sample in, an encoded sample out, latent file bytes
  webdataset.py   WebDataset tars: reading samples, writing latent shards
  parquet.py      parquet shards: reading an image column, writing latent rows
  formats.py      which reader and writer a shard kind and a layout take
  shards.py       one input shard -> one published output shard and its index; OUT/index.json
  shard_run.py    one process's share of the shards (all, --shard i/n, a torchrun rank)
  ray_engine.py   --engine ray: shards as a Ray Dataset, the VAE as an actor pool (map_batches)
  musubi_job.py   --format musubi: each image's musubi-tuner latent cache (a Job run by batch.run_job)
"""

from .buckets import BucketChoice, crop_box, make_buckets, select_bucket
from .core import prepare_dataset
from .distributed import bind_local_device, parse_shard, resolve_shard, shard_items, torchrun_env
from .encoder import DatasetEncoder, Placement, settings_sha256
from .folder import output_paths
from .manifest import MergeResult, merge_manifests, read_manifest, shard_manifest_name, write_manifest
from .musubi_job import MusubiOptions, export_musubi
from .options import (
    DATASET_VERSION,
    LOGVAR_RANGE,
    MANIFEST,
    RESAMPLE,
    DatasetOptions,
    EngineOptions,
    check_options,
)
from .report import DatasetReport

__all__ = [
    "BucketChoice",
    "DATASET_VERSION",
    "DatasetEncoder",
    "DatasetOptions",
    "DatasetReport",
    "EngineOptions",
    "LOGVAR_RANGE",
    "MANIFEST",
    "MergeResult",
    "MusubiOptions",
    "Placement",
    "RESAMPLE",
    "bind_local_device",
    "check_options",
    "crop_box",
    "export_musubi",
    "make_buckets",
    "merge_manifests",
    "output_paths",
    "parse_shard",
    "prepare_dataset",
    "read_manifest",
    "resolve_shard",
    "select_bucket",
    "settings_sha256",
    "shard_items",
    "shard_manifest_name",
    "torchrun_env",
    "write_manifest",
]
