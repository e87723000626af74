"""The commands that look at a model rather than convert files: bench (speed, memory) and info (what it is)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer

from ..choices import DEFAULTS, Device
from ..errors import VaecliError
from .app import command, guard
from .options import MODEL, BenchFlags, DebugOpt, JsonOpt, ModelFlags, ReportFlags, expand_groups
from .output import ITEMS_FAILED, print_json
from .rendering import bench_report, document, info_fields, info_rows, item_record, print_config, print_fields, usage
from .settings import bench_settings, load_model

ResolutionOpt = Annotated[list[int], typer.Option(
    "--resolution", "-r", metavar="PIXELS", min=8, help="Square side; repeat for several.")]
VersusOpt = Annotated[str | None, typer.Option(
    "--versus", metavar="MODEL", help="Also time MODEL (e.g. the full VAE beside its tiny one) with the same "
    "settings, and give this model's speed-up over it per row.", rich_help_panel=MODEL)]
WarmupOpt = Annotated[int, typer.Option(
    "--warmup", metavar="N", min=0, help="Untimed runs first (the first one's time is reported).")]
ItersOpt = Annotated[int, typer.Option("--iters", metavar="N", min=1, help="Timed runs.")]


@command("Time encode and decode: ms/image, images/s, peak memory.")
@expand_groups
def bench(
    *,
    model: ModelFlags,
    resolution: ResolutionOpt = [DEFAULTS.bench_resolution],  # noqa: B006 - Typer copies it
    versus: VersusOpt = None,
    run: BenchFlags,
    warmup: WarmupOpt = DEFAULTS.bench_warmup,
    iters: ItersOpt = DEFAULTS.bench_iters,
    report: ReportFlags,
) -> None:
    """Time encode and decode per resolution: ms/image, images/s, peak memory."""
    with guard(report.as_json, report.debug, "bench"):
        try:
            from ..bench import run_bench
        except ImportError as exc:
            raise usage(f"bench is not available in this installation ({exc})", report.as_json) from None
        if run.batch_size == 0:
            raise VaecliError("bench needs a numeric --batch-size (auto sizes batches per image during conversion)")
        model.check()
        settings = bench_settings(run, resolution, warmup, iters)
        rows = run_bench(model=model.model, family=model.family.value if model.family else None,
                         subfolder=model.subfolder, revision=model.revision, variant=model.variant, **settings)
        others = run_bench(model=versus, **settings) if versus is not None else []
        add_speedups(rows, others)
        if bench_report(rows, others, versus, report.as_json):
            raise typer.Exit(ITEMS_FAILED)


def add_speedups(rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> None:
    """Each row gets the --versus model's ms/image for the same op and resolution, and the speed-up."""
    by_key = {(o.get("op"), o.get("resolution")): o for o in others if not o.get("error")}
    for r in rows:
        other = by_key.get((r.get("op"), r.get("resolution")))
        if other is None or r.get("error") or not r.get("ms_per_img"):
            continue
        r["versus_ms_per_img"] = other["ms_per_img"]
        r["speedup_vs"] = round(other["ms_per_img"] / r["ms_per_img"], 3)


InfoModelArg = Annotated[str | None, typer.Argument(
    metavar="MODEL", help="Model folder, weights file or Hub id; default: the embedded model.")]


@dataclass(frozen=True)
class InfoModelFlags(ModelFlags):
    """info's model flags: --model is another way to give its MODEL argument."""

    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="MODEL", help="The same as MODEL, as the other commands take it.",
        rich_help_panel=MODEL)] = None


@command("A model's layout, config, normalization and sha256.")
@expand_groups
def info(
    model_arg: InfoModelArg = None,
    *,
    model: InfoModelFlags,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a model's layout, config, parameter count, latent normalization, weights sha256 and notes."""
    with guard(as_json, debug, "info"):
        if model_arg is not None and model.model is not None and model_arg != model.model:
            raise VaecliError(f"two models named: {model_arg} and --model {model.model}; give one")
        if model_arg is not None:
            model = replace(model, model=model_arg)
        vae = load_model(model, Device.cpu, as_json, debug)
        fields = info_fields(vae)
        if as_json:
            item = item_record(vae.info.name, notes=vae.info.notes)
            print_json(document("info", [item], ok=1, head=fields))
            return
        print_fields(info_rows(vae, fields))
        print_config(fields["config"])
