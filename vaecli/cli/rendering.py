"""What a run looks like: the one JSON document, error lines, the progress bar, summaries and tables."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from .. import signals
from ..discovery import NO_INPUTS
from ..files import json_path, remove_own_temp_files
from .output import ITEMS_FAILED, USAGE, err_console, one_line, out_console, print_json, printable, secondary_rank


def document(
    command: str | None = None, items: Sequence[Mapping[str, Any]] = (), *, ok: int = 0, failed: int = 0,
    skipped: int = 0, head: Mapping[str, Any] | None = None, **tail: Any,
) -> dict[str, Any]:
    """The JSON document of every command, in one key order: command, the command's own fields (`head`),
    ok/failed/skipped, items, then `tail` (error, pending, ...). A run's report builds its own (to_dict)."""
    doc: dict[str, Any] = {"command": command} if command else {}
    doc.update(head or {})
    doc.update(ok=ok, failed=failed, skipped=skipped, items=list(items))
    doc.update(tail)
    return doc


def item_record(name: str, notes: Sequence[str] = (), error: str | None = None) -> dict[str, Any]:
    """One item of a document that is not a file's (a bench row, a model), shaped as a file's item."""
    record: dict[str, Any] = {"input": name, "output": None, "status": "ok", "notes": list(notes)}
    if error is not None:
        record.update(status="failed", error=error)
    return record


def error_message(message: str) -> None:
    """`error: <message>` on stderr, one escaped line."""
    err_console.print(f"[bold red]error:[/] {escape(printable(one_line(message)))}", soft_wrap=True)


def usage(message: str, as_json: bool) -> typer.Exit:
    """The command as given cannot run: one error line, under --json the document saying so; exit 2."""
    error_message(message)
    if as_json:
        print_json(document(error=message))
    return typer.Exit(USAGE)


def interrupted(as_json: bool, results: list[Any] | None, command: str | None = None) -> None:
    """The report of a run ended by Ctrl-C, SIGTERM or SIGHUP: this process's temp files removed, one line
    on stderr, and under --json the document with the items finished so far. Signals arriving from here on
    are ignored, so the document is printed whole."""
    signals.reporting()
    remove_own_temp_files()
    done = [r for r in results or [] if r.status in ("ok", "failed", "skipped")]
    pending = len(results or []) - len(done)
    if results is None:
        err_console.print("interrupted: before any item ran", soft_wrap=True)
    else:
        err_console.print(
            f"interrupted: {len(done)} item(s) finished and kept, {pending} not done; run the same command again "
            "to finish",
            soft_wrap=True,
        )
    if as_json:
        counts = {status: sum(r.status == status for r in done) for status in ("ok", "failed", "skipped")}
        print_json(document(command, [r.to_dict() for r in done], **counts, pending=pending, interrupted=True,
                            error=f"interrupted ({signals.name()})"))


def error_line(item: Any, debug: bool) -> None:
    """`error: <input>: <reason>` on stderr, escaped (and the traceback with --debug)."""
    line = f"{printable(item.input)}: {printable(one_line(item.error or ''))}"
    err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
    if debug and item.detail:
        sys.stderr.write(item.detail)


class Live:
    """The progress callback of a run: each failed item's error line on stderr the moment it fails, and a
    Rich bar (done/total, ok, failed, skipped, images/s, ETA) when enabled. Called from the thread that
    finished the item (often a writer's); Rich's console serialises the output."""

    def __init__(self, bar: Any, debug: bool) -> None:
        self.bar, self.debug = bar, debug
        self.printed: set[int] = set()  # ids of the items whose error line is out (finish skips them)
        self.task = bar.add_task("", total=None, rate="", tally="") if bar is not None else None
        self.start = time.perf_counter()

    def __call__(self, counts: Any) -> None:
        item = counts.item
        if item is not None and item.status == "failed":
            error_line(item, self.debug)
            self.printed.add(id(item))
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self.start
        rate = f"{counts.done / elapsed:.2f} img/s" if elapsed > 0 and counts.done else ""
        tallies = (("failed", counts.failed), ("skipped", counts.skipped))
        parts = [f"{counts.ok} ok"] + [f"{n} {name}" for name, n in tallies if n]
        self.bar.update(self.task, completed=counts.done, total=counts.total, rate=rate, tally=", ".join(parts))


@contextmanager
def progress(label: str, quiet: bool, debug: bool = False) -> Iterator[Live]:
    """The run's progress callback (Live); its bar is drawn on stderr unless quiet or stderr is no terminal."""
    if quiet or not err_console.is_terminal:
        yield Live(None, debug)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tally]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    with bar:
        yield Live(bar, debug)


def finish(report: Any, as_json: bool, debug: bool, table: Table | None = None, live: Live | None = None) -> None:
    """Print the failures not printed as they happened (stderr), then the JSON document or a summary;
    exit 1 when some item failed."""
    if secondary_rank():  # torchrun: rank 0 reports every rank's items, errors included
        raise typer.Exit(ITEMS_FAILED if report.count("failed") else 0)
    for r in report.items:
        if r.status == "failed" and (live is None or id(r) not in live.printed):
            error_line(r, debug)
    doc = report.to_dict()
    if not report.items:
        raise usage(NO_INPUTS, as_json)
    if as_json:
        print_json(doc)
    else:
        if table is not None:
            out_console.print(table)
        summary(report, doc)
    if doc["failed"]:
        raise typer.Exit(ITEMS_FAILED)


def summary(report: Any, doc: dict[str, Any]) -> None:
    """The lines a person reads after a run: counts and speed, retries, events, notes, tiles, cleanup."""
    rate = f", {doc['images_per_s']:.2f} img/s" if doc.get("images_per_s") else ""
    line = (
        f"{report.command}: [green]{doc['ok']} ok[/], {doc['skipped']} skipped, "
        f"[{'red' if doc['failed'] else 'green'}]{doc['failed']} failed[/] in {doc['elapsed_s']:.2f} s{rate}"
    )
    if doc.get("device_busy_share") is not None and doc.get("images_per_s"):
        line += f"; model busy {doc['device_busy_share']:.0%} of the time"
    if doc.get("mean_psnr") is not None:
        line += f"; mean PSNR {doc['mean_psnr']:.2f} dB, mean SSIM {doc['mean_ssim']:.4f}"
    out_console.print(line)
    retries = [(r.input, x) for r in report.items for x in r.retries]
    if retries:
        kinds = sorted({f"{x['stage']} {x['from_dtype']}->{x['to_dtype']}" for _, x in retries})
        out_console.print(f"precision retries (non-finite output): {len(retries)} ({', '.join(kinds)})")
    for event in sorted(set(report.events)):
        out_console.print(f"event: {escape(printable(event))} (x{report.events.count(event)})")
    for note in getattr(report, "notes", []):
        out_console.print(f"note: {escape(printable(str(note)))}")
    if doc.get("tiles"):
        out_console.print(f"tiled: {doc['tiles']} tile calls")
    if doc.get("temp_files_removed"):
        out_console.print(f"removed {doc['temp_files_removed']} temporary file(s) left by an interrupted run")


def dataset_summary(report: Any) -> None:
    """The lines a dataset run adds before its summary: shards written and reused, sources gone missing."""
    if report.shards:
        doc = report.to_dict()
        out_console.print(f"shards: {doc['shards_ok']} written, {doc['shards_skipped']} reused, "
                          f"{doc['shards_failed']} failed; index {escape(str(report.manifest))}")
    for miss in getattr(report, "missing", []):
        source = printable(str(miss.get("source", miss)))
        out_console.print(f"missing source (latent kept, dropped from manifest): {escape(source)}")


def roundtrip_table(report: Any) -> Table:
    """Per image: PSNR, SSIM, max abs error ("-" where the image has none: failed or skipped)."""
    table = Table(title="roundtrip", show_lines=False)
    columns = (("input", "left"), ("status", "left"), ("PSNR dB", "right"), ("SSIM", "right"), ("max err", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify, min_width=len(name), overflow="fold")  # type: ignore[arg-type]
    for r in report.items:
        m = r.metrics
        table.add_row(
            escape(printable(r.input)),
            r.status,
            f"{m['psnr']:.2f}" if "psnr" in m else "-",
            f"{m['ssim']:.4f}" if "ssim" in m else "-",
            str(m["max_abs_error"]) if "max_abs_error" in m else "-",
        )
    return table


def bench_table(rows: list[dict[str, Any]], title: str = "bench") -> Table:
    """The bench rows as a table that fits 80 columns (no frame, whole headers; cells fold, never cut)."""
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("op", "res", "batch", "dtype", "tiling", "ms/img", "img/s", "busy", "peak MiB", "warm-up s"):
        table.add_column(name, justify="left" if name in ("op", "dtype", "tiling") else "right",
                         min_width=len(name), overflow="fold")
    for r in rows:
        peak = r.get("peak_memory_bytes")
        table.add_row(
            str(r.get("op")),
            str(r.get("resolution")),
            str(r.get("batch_size")),
            str(r.get("dtype")),
            str(r.get("tiling")),
            _fmt(r.get("ms_per_img"), ".1f"),
            _fmt(r.get("img_per_s"), ".2f"),
            _fmt(r.get("device_busy"), ".0%"),
            _fmt(peak / 2**20 if isinstance(peak, (int, float)) else None, ".0f"),
            _fmt(r.get("warmup_s"), ".2f"),
        )
    return table


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def bench_report(rows: list[dict[str, Any]], others: list[dict[str, Any]], versus: str | None, as_json: bool) -> bool:
    """Print bench's rows (and the --versus model's) as the document or tables; True when some row failed."""
    failed = [r for r in rows + others if r.get("error")]
    for r in failed:
        what = f"{r.get('op')} {r.get('resolution')}"
        err_console.print(f"[red]error:[/] {what}: {escape(printable(one_line(str(r['error']))))}", soft_wrap=True)
    if as_json:
        items = [item_record(f"{r.get('op')} {r.get('resolution')}", error=_error_of(r)) for r in rows]
        extra = {"versus": {"model": versus, "results": others}} if versus is not None else {}
        print_json(document("bench", items, ok=len(rows) - len(failed), failed=len(failed), head={"results": rows},
                            **extra))
        return bool(failed)
    out_console.print(bench_table(rows))
    if versus is not None:
        out_console.print(bench_table(others, title=f"bench: --versus {escape(printable(versus))}"))
        for r in rows:
            if r.get("speedup_vs") is not None:
                out_console.print(f"{r['op']} {r['resolution']}: {r['ms_per_img']:.1f} ms vs "
                                  f"{r['versus_ms_per_img']:.1f} ms, {r['speedup_vs']:.2f}x the speed")
    out_console.print("busy: share of a call's time the device computed (the rest: host work and waiting)")
    return bool(failed)


def _error_of(row: Mapping[str, Any]) -> str | None:
    return str(row["error"]) if row.get("error") else None


def info_fields(vae: Any) -> dict[str, Any]:
    """What `info` says about a model, in the order of its JSON document (after "command")."""
    cfg, minfo = vae.config, vae.info
    return {
        "model": minfo.name,
        "path": json_path(minfo.path),
        "layout": minfo.layout,
        "config_source": minfo.config_source,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "family": cfg.family,
        "class_name": cfg.class_name,
        "downsample_factor": cfg.downsample_factor,
        "size_multiple": cfg.size_multiple,
        "latent_channels": cfg.latent_channels,
        "latent_spec": cfg.latent_spec.to_dict(),
        "normalization": cfg.latent_spec.describe(),
        "force_upcast": cfg.force_upcast,
        "weights_sha256": minfo.weights_sha256,
        "notes": list(minfo.notes),
        "config": cfg.to_dict(),
    }


def info_rows(vae: Any, fields: dict[str, Any]) -> list[tuple[str, str]]:
    """`info`'s lines for a person: the fields above, the family by name, the normalization's values."""
    from ..families import of_config

    cfg, spec = vae.config, vae.config.latent_spec
    rows = [(key, str(fields[key])) for key in ("model", "path", "layout", "config_source", "weights_sha256")]
    rows.append(("parameters", f"{fields['parameters']:,}"))
    rows.insert(1, ("family", f"{of_config(cfg).title}: {cfg.class_name}"))
    rows.append(("architecture", cfg.architecture()))
    norm = spec.describe()
    if spec.patch_size == 1:  # the values themselves (FLUX.2's hundreds of statistics: --json)
        norm += f" (scaling_factor {spec.scaling_factor:g}"
        norm += f", shift_factor {spec.shift_factor:g}" if spec.shift_factor else ""
        if spec.latents_mean is not None:
            norm += f", latents_mean {list(spec.latents_mean)}, latents_std {list(spec.latents_std or ())}"
        norm += ")"
    rows += [("latent normalization", norm), ("image sides", f"multiples of {cfg.size_multiple} pixels"),
             ("force_upcast", str(cfg.force_upcast))]
    return rows + [("note", note) for note in vae.info.notes]


def print_config(config: dict[str, Any]) -> None:
    out_console.print_json(json.dumps(config))


def print_fields(rows: list[tuple[str, str]]) -> None:
    """`key  value` lines: a table folded to a terminal's width, whole lines when piped (hashes and paths
    stay greppable and copyable)."""
    if not out_console.is_terminal:
        for key, value in rows:
            sys.stdout.write(f"{key}: {printable(value)}\n")
        sys.stdout.flush()
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(printable(value)))
    out_console.print(table)
