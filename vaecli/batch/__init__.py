"""Folder walking, batching by size, I/O overlapped with compute, resume, per-item results.

One core function per command (`encode_paths`, `decode_paths`, `roundtrip_paths`); each returns a Report
and never raises for a bad item: per-item failures are values. Reading runs in a thread pool ahead of the
model (a bounded prefetch window), writing in another pool behind it, so the model stays busy. One module
per concern:

  engine.py       Engine (threads, header probes, prefetch, ordering, batches launched one ahead), the Job
                  protocol (probe, load, key, compute, save), Loaded and Skip
  run.py          run_job: the prelude every command shares (checks, discovery, Runner, batch sizes, engine,
                  report), and the steps the command Jobs share
  encode.py       EncodeJob and encode_paths
  decode.py       DecodeJob and decode_paths
  roundtrip.py    RoundtripJob and roundtrip_paths
  options.py      EncodeOptions, DecodeOptions, RoundtripOptions
  report.py       ItemResult, Counts, Report
  sizes.py        size policies and their undo
  sources.py      reading inputs (bytes and hash in one read) and the engine's header probes
  reuse.py        whether an existing output is current
  latent_meta.py  decode's checks of our metadata (version, maker) and of tiny-autoencoder previews
  model.py        opening the model, and what reports and outputs record of it
"""

from ..discovery import Item, OutputNames, check_layout, check_output_root, discover
from ..pipeline import RunOptions
from .decode import DecodeJob, decode_paths
from .encode import EncodeJob, encode_paths
from .engine import Engine, Job, Loaded, Skip, failure_message, io_threads
from .latent_meta import check_meta_header
from .model import model_identity, model_notes, model_summary, open_model
from .options import DecodeOptions, EncodeOptions, RoundtripOptions
from .report import Counts, ItemResult, Progress, Report
from .reuse import reuse_output, wanted
from .roundtrip import RoundtripJob, diff_path, roundtrip_paths
from .run import (
    Discovery,
    RunContext,
    batch_sizer,
    image_names,
    latent_names,
    note_batch,
    posterior_noise,
    prepare_run,
    run_job,
)
from .sizes import (
    SIZE_POLICIES,
    apply_size_policy,
    check_size_policy,
    decoded_size,
    encoded_side,
    encoded_size,
    prepare_pixels,
    resample,
    restore_size,
    undo_size_policy,
)
from .sources import BYTES_PER_PIXEL_MAX, image_probe, latent_probe, read_source

__all__ = [
    "BYTES_PER_PIXEL_MAX",
    "Counts",
    "DecodeJob",
    "DecodeOptions",
    "Discovery",
    "EncodeJob",
    "EncodeOptions",
    "Engine",
    "Item",
    "ItemResult",
    "Job",
    "Loaded",
    "OutputNames",
    "Progress",
    "Report",
    "RoundtripJob",
    "RoundtripOptions",
    "RunContext",
    "RunOptions",
    "SIZE_POLICIES",
    "Skip",
    "apply_size_policy",
    "batch_sizer",
    "check_layout",
    "check_meta_header",
    "check_output_root",
    "check_size_policy",
    "decode_paths",
    "decoded_size",
    "diff_path",
    "discover",
    "encode_paths",
    "encoded_side",
    "encoded_size",
    "failure_message",
    "image_names",
    "image_probe",
    "io_threads",
    "latent_names",
    "latent_probe",
    "model_identity",
    "model_notes",
    "model_summary",
    "note_batch",
    "open_model",
    "posterior_noise",
    "prepare_pixels",
    "prepare_run",
    "read_source",
    "resample",
    "restore_size",
    "reuse_output",
    "roundtrip_paths",
    "run_job",
    "undo_size_policy",
    "wanted",
]
