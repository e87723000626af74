"""`--engine ray`: the shards of a run as a Ray Dataset, the VAE as an actor pool through `map_batches`.

Each row is one input shard; each actor holds one VAE (one GPU with --device cuda, else one CPU) and runs
the same `process_shard` as the local engine, so outputs, indexes and resume are those of every other
engine. Ray schedules rows onto actors; by Ray Data's defaults an actor that dies is restarted and its
shard retried (the dead one's temporary file is removed at the end). Shards already finished are settled
in the driver and never reach the cluster. OUT must be a file system every node writes to (a shared mount
on a multi-node cluster).
"""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..batch import Progress, batch_sizer
from ..errors import ConfigError
from ..models.kl import AutoencoderKL
from ..pipeline import RunOptions
from .distributed import torchrun_env
from .encoder import DatasetEncoder
from .locations import ShardInput, need
from .options import DatasetOptions, EngineOptions
from .report import DatasetReport
from .shard_run import ShardShare
from .shards import ShardJob, ShardOutcome, Tally, check_shard, process_shard


class ShardWorker:
    """A Ray Data actor: loads the VAE once, then encodes the shards of each batch of rows it is given."""

    def __init__(self, vae: AutoencoderKL, options: DatasetOptions, run: RunOptions, out: str, layout: str,
                 device: str) -> None:
        import torch

        use_cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        vae = vae.to("cuda" if use_cuda else "cpu")
        size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
        self.job = ShardJob(DatasetEncoder(vae, options, run), Path(out), layout, size, batch_for)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for url, kind, name in zip(batch["url"], batch["kind"], batch["name"], strict=True):
            outcome = process_shard(self.job, ShardInput(str(url), str(kind), str(name)), Tally(None))
            outcomes.append(pickle.dumps(outcome))
        return {"outcome": np.array(outcomes, dtype=object)}


def prepare_with_ray(
    vae: AutoencoderKL,
    shards: list[ShardInput],
    out: Path,
    options: DatasetOptions,
    run: RunOptions,
    shard: tuple[int, int] | None,
    progress: Progress | None,
    engine: EngineOptions,
) -> DatasetReport:
    """Encode every shard on a Ray cluster; the driver settles finished shards and writes OUT/index.json."""
    if shard is not None or torchrun_env() is not None:
        raise ConfigError("--engine ray spreads the shards over the cluster itself; drop --shard (and torchrun)")
    ray = need("ray", "ray", "--engine ray")
    need("ray.data", "ray", "--engine ray")
    vae = vae if next(vae.parameters()).device.type == "cpu" else copy.deepcopy(vae).cpu()
    share = ShardShare(vae, shards, out, options, run)
    tally = Tally(progress)
    outcomes, todo = [], []
    for src in shards:
        settled = check_shard(share.job, src)[0]
        if settled is None:
            todo.append(src)
        else:
            tally.add(len(settled.results), settled.results)
            outcomes.append(settled)
    if todo:
        outcomes += _run_on_cluster(ray, vae, todo, share.job, options, run, engine, tally)
    outcomes.sort(key=lambda o: o.shard.url)
    report = share.report(outcomes, (0, 1), 0)
    share.merge(report, clean=True)  # the actors are done: temp files of dead ones can go
    return report


def _run_on_cluster(
    ray: Any,
    vae: AutoencoderKL,
    todo: list[ShardInput],
    job: ShardJob,
    options: DatasetOptions,
    run: RunOptions,
    engine: EngineOptions,
    tally: Tally,
) -> list[ShardOutcome]:
    """The shards to encode as rows of a Ray Dataset, mapped by a pool of ShardWorker actors."""
    started = not ray.is_initialized()
    if started:
        # Quiet: Ray's INFO lines would crowd the one-line-per-failure output on stderr.
        ray.init(address=engine.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own progress and --json own the terminal
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        gpus = engine.device == "cuda" or (engine.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        resources = ray.cluster_resources()
        workers = engine.workers or max(1, int(resources.get("GPU" if gpus else "CPU", 1)))
        rows = [{"url": s.url, "kind": s.kind, "name": s.name} for s in todo]
        mapped = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardWorker,
            batch_size=1,  # one shard per call: a shard is the unit of work, of publication and of retry
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
            fn_constructor_kwargs={"vae": vae, "options": options, "run": run, "out": str(job.out),
                                   "layout": job.layout, "device": "cuda" if gpus else "cpu"},
            num_cpus=1,
            num_gpus=1 if gpus else 0,
        )
        outcomes = []
        for row in mapped.iter_rows():
            outcome: ShardOutcome = pickle.loads(row["outcome"])
            tally.add(len(outcome.results), outcome.results)
            outcomes.append(outcome)
        return outcomes
    finally:
        if started:
            ray.shutdown()
