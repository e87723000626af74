"""Throughput of the shard pipeline against the folder pipeline, and of Ray against one process.

    python scripts/bench_shards.py [--images 300 --shards 6 --repeats 3 --bucket-resolution 256]

Makes an img2dataset-style shard set (scripts/make_shards.py: the same images as tar shards and as a
folder), then times `prepare_dataset` with the default model, alternating the variants in every round
(the CPU may be shared): folder (one process), tar shards (one process), tar shards with --engine ray and
2 workers (a local Ray cluster of 2 CPUs started once before timing; each timed run includes starting its
actors and shipping them the model; its workers run at the driver's priority, not Ray's default nice 15,
which starves them when other jobs share the CPU). Prints images/s per run, medians, and the ratios the targets name:
tar / folder >= 0.9, ray / tar >= 0.9. Two rates per shard run: end to end (the whole call), and steady
(images over the span from the first shard's start to the last shard's end, as the workers report it:
what a long run converges to, without the fixed start of Ray's actors, ~7 s here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-resolution", type=int, default=256)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--json", type=Path, help="also write the runs and medians here")
    a = p.parse_args()

    import torch

    from vaecli.batch import open_model
    from vaecli.dataset import DatasetOptions, EngineOptions, prepare_dataset

    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    work = Path(tempfile.mkdtemp(prefix="vaecli-bench-shards-"))
    make.make_shards(work / "set", a.images, a.shards, 300, 800, seed=0, parquet=False)
    vae = open_model(None, None, "cpu")
    options = DatasetOptions(bucket_resolution=a.bucket_resolution)
    variants = {
        "folder": ([str(work / "set/folder")], EngineOptions()),
        "tar": ([str(work / "set/tar/*.tar")], EngineOptions()),
    }
    if not a.no_ray:
        import os

        import ray

        # Ray runs its workers at nice 15 by default; on a machine shared with other jobs that starves the
        # actors against the one-process run (nice 0). Equal priority makes the comparison about the engine.
        os.environ["RAY_worker_niceness"] = "0"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        variants["ray2"] = ([str(work / "set/tar/*.tar")], EngineOptions("ray", workers=2))
    print(f"default model, {a.images} images in {a.shards} shards, bucket resolution {a.bucket_resolution}, "
          f"torch threads {torch.get_num_threads()} (driver); Ray actors: 1 CPU each")
    runs: dict[str, list[float]] = {k: [] for k in variants}
    steady: dict[str, list[float]] = {k: [] for k in variants if k != "folder"}
    names = list(variants)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            inputs, engine = variants[name]
            out = work / f"out-{name}-{r}"
            t = time.perf_counter()
            report = prepare_dataset(vae, inputs, out, options, engine=engine)
            elapsed = time.perf_counter() - t
            rate = report.computed / elapsed
            runs[name].append(rate)
            line = f"round {r}: {name:6s} {report.computed} images in {elapsed:6.1f} s = {rate:.2f} img/s"
            if name in steady:
                span = max(s["finished_at"] for s in report.shards) - min(s["started_at"] for s in report.shards)
                steady[name].append(report.computed / span)
                line += f"; steady {steady[name][-1]:.2f} img/s over {span:.1f} s"
            print(line)
            shutil.rmtree(out)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    steady_medians = {k: statistics.median(v) for k, v in steady.items()}
    print("medians end to end (img/s): " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    print("medians steady (img/s): " + ", ".join(f"{k} {v:.2f}" for k, v in steady_medians.items()))
    print(f"tar / folder, end to end = {medians['tar'] / medians['folder']:.3f} (target >= 0.9)")
    paired = {"tar/folder": _paired(runs, "tar", "folder")}
    if "ray2" in medians:
        print(f"ray (2 workers) / tar (one process): end to end {medians['ray2'] / medians['tar']:.3f}, "
              f"steady {steady_medians['ray2'] / steady_medians['tar']:.3f} (target >= 0.9)")
        paired["ray2/tar end to end"] = _paired(runs, "ray2", "tar")
        paired["ray2/tar steady"] = _paired(steady, "ray2", "tar")
    # The load of a shared CPU drifts between rounds; the ratio within each round compares like with like.
    print("median of per-round ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    if a.json:
        doc = {"runs": runs, "steady": steady, "medians": medians, "steady_medians": steady_medians, "paired": paired,
               "args": {k: str(v) for k, v in vars(a).items()}}
        a.json.write_text(json.dumps(doc, indent=1))
    shutil.rmtree(work)
    if not a.no_ray:
        ray.shutdown()


def _paired(runs: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=False))


if __name__ == "__main__":
    main()
