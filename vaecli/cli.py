"""The `vaecli` command: parse flags, build options, call one core function, render with Rich, exit code.

Exit codes: 0 every item ok (or skipped), 1 the run happened and some item failed, 2 the command as given
cannot run (bad option, an input path that does not exist, no inputs, an overlapping layout, a model that
cannot be loaded; nothing is read or written), 130 interrupted. `--json` prints exactly one JSON
document on stdout, also on parse errors and Ctrl-C; every line on stderr has its control characters escaped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from . import __version__, signals
from .discovery import NO_INPUTS, output_path
from .files import json_path
from .errors import VaecliError


class _HelpCommand(TyperCommand):
    """Help as plain text wrapped to the terminal (never cut short, also at 80 columns), options grouped
    under the headings of their rich_help_panel. Typer's Rich tables give 20-character descriptions and
    cut words with an ellipsis at 80 columns."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [self._argument_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    @staticmethod
    def _argument_name(param: Any) -> str:
        """INPUT... for a required list, [MODEL] for an optional value (typer would print {inputs}...)."""
        name = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
        return name if param.required else f"[{name}]"

    def format_options(self, ctx: Any, formatter: Any) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                record = (self._argument_name(param), (param.help or "") + ("  [required]" if param.required else ""))
            else:
                record = param.get_help_record(ctx)
            if record is None:
                continue
            default = "Arguments" if param.param_type_name == "argument" else "Options"
            groups.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        order = ["Arguments", "Options", *(g for g in groups if g not in ("Arguments", "Options"))]
        for name in order:
            if name in groups:
                with formatter.section(name):
                    formatter.write_dl(groups[name])


class _Signalled(BaseException):
    """A KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP: signals.py) outside a command's _guard (while it imports
    torch, or while options are parsed), carried past typer, which would turn it into a silent exit 130."""


class _Group(TyperGroup):
    """The command group, passing interrupts on to main() (which reports them) instead of typer's handler."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _Signalled() from exc

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Signalled() from exc


app = typer.Typer(
    cls=_Group,
    name="vaecli",
    help="Image <-> latent conversion with the KL autoencoder of latent diffusion (SD, SDXL, SD3, Flux VAEs).",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help (_HelpCommand)
)
# soft_wrap: a summary line stays one line in a pipe or log (Rich would wrap it at 80 columns there).
out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)

USAGE = 2
ITEMS_FAILED = 1
INTERRUPTED = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C (SIGTERM 143, SIGHUP 129: signals.py)
BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout was closed by its reader


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Family(str, Enum):
    sd = "sd"
    sdxl = "sdxl"
    sd3 = "sd3"
    flux = "flux"
    flux2 = "flux2"


class Tiling(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Kernels(str, Enum):  # plans.KERNEL_MODES
    auto = "auto"
    on = "on"
    off = "off"


class SizePolicy(str, Enum):
    pad = "pad"
    crop = "crop"
    resize = "resize"


class Alpha(str, Enum):
    white = "white"
    black = "black"
    drop = "drop"


class CacheFormat(str, Enum):
    vaecli = "vaecli"
    kohya = "kohya"
    comfyui = "comfyui"


class Layout(str, Enum):
    folder = "folder"
    tar = "tar"
    parquet = "parquet"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class ImageFormat(str, Enum):
    png = "png"
    jpg = "jpg"
    webp = "webp"


MODEL = "Model"
RUN = "Precision and memory"
OUTPUT = "Output"
DATASET = "Dataset preparation (--dataset)"
SHARDS = "Shards and engines (--dataset)"

# -- options shared by several commands (Annotated aliases keep each signature readable) ------------------
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", metavar="MODEL", help="Diffusers folder, single weights file or Hub id; default: the embedded model.", rich_help_panel=MODEL),
]
FamilyOpt = Annotated[
    Optional[Family],
    typer.Option("--family", help="Latent normalization for a single weights file without config (FLUX.2 files are "
                 "recognised by their batch-norm statistics); with a tiny autoencoder, the latent space it decodes "
                 "(files of another family are refused).", rich_help_panel=MODEL),
]
SubfolderOpt = Annotated[
    Optional[str],
    typer.Option("--subfolder", metavar="PATH", help="Model folder inside the --model folder or Hub repo (e.g. vae).", rich_help_panel=MODEL),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option("--revision", metavar="REV", help="Hub branch, tag or commit of --model.", rich_help_panel=MODEL),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option("--variant", metavar="NAME", help="Weights variant, e.g. fp16: diffusion_pytorch_model.fp16.safetensors.", rich_help_panel=MODEL),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run the model.", rich_help_panel=MODEL)]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Compute precision.", rich_help_panel=RUN)]
UpcastOpt = Annotated[
    Optional[bool],
    typer.Option("--upcast/--no-upcast", help="Run fp16 requests in fp32 (default: as the model's force_upcast says).", rich_help_panel=RUN),
]
TilingOpt = Annotated[Tiling, typer.Option("--tiling", help="Tiled encode/decode: auto (when memory requires), on, off.", rich_help_panel=RUN)]
TileSizeOpt = Annotated[int, typer.Option("--tile-size", metavar="PIXELS", min=8, help="Tile side in image pixels.", rich_help_panel=RUN)]
TileOverlapOpt = Annotated[int, typer.Option("--tile-overlap", metavar="PIXELS", min=0, help="Tile overlap in image pixels.", rich_help_panel=RUN)]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Run encode/decode as compiled programs (AOTInductor): one compile per input shape, cached "
        "under ~/.cache/vaecli/aoti, so later runs load it in about a second.",
        rich_help_panel=RUN,
    ),
]
KernelsOpt = Annotated[
    Kernels,
    typer.Option("--kernels", help="Triton kernels (fused GroupNorm+SiLU, upsample+conv): auto = where measured "
                 "faster (CUDA GPUs; docs/performance.md), on = wherever they can run, off = diffusers' exact "
                 "sequence of operations on every device (NCHW, native GroupNorm, nearest+conv, SDPA; no kernels and "
                 "none of the CPU's fast forms): its outputs bit for bit (untiled).", rich_help_panel=RUN),
]
SlicingOpt = Annotated[
    Optional[int], typer.Option("--slicing", metavar="N", min=1, help="Run each batch in slices of N images.", rich_help_panel=RUN)
]
def _batch_size(value: str | int) -> int:
    """--batch-size: a positive number, or auto (0 inside: sized from free memory per image size)."""
    if isinstance(value, int):  # the default
        return value
    if value.strip().lower() == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a positive integer nor 'auto'") from None
    if n < 1:
        raise typer.BadParameter("must be at least 1, or 'auto'")
    if n > MAX_BATCH:
        raise typer.BadParameter(f"{n} is more than {MAX_BATCH} images per model call; give at most {MAX_BATCH}, or 'auto'")
    return n


MAX_BATCH = 4096  # images per model call: far above what fits in any device's memory at 64 px


BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size", "-b", parser=_batch_size, metavar="N|auto",
        help="Images of one size per model call; auto: as many as fit in free memory (CUDA OOM still halves it).",
        rich_help_panel=RUN,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Recompute outputs that already exist.", rich_help_panel=OUTPUT)]
MaxPixelsOpt = Annotated[
    int, typer.Option("--max-pixels", metavar="N", min=0, help="Refuse larger images (0: no limit).", rich_help_panel=OUTPUT)
]
AlphaOpt = Annotated[
    Optional[Alpha],
    typer.Option("--alpha", help="Transparent pixels: composite over white or black, or drop alpha (--format kohya: "
                 "always dropped, as kohya does).", show_default="white", rich_help_panel=OUTPUT)
]
SizePolicyOpt = Annotated[
    SizePolicy,
    typer.Option("--size-policy", help="Sides not divisible by 8: pad (undone exactly), crop (centre) or resize.", rich_help_panel=OUTPUT),
]
SampleOpt = Annotated[bool, typer.Option("--sample", help="Sample the posterior instead of taking its mode.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Seed for --sample (implies it); noise depends on (seed, path).")]
InputsArg = Annotated[
    list[Path], typer.Argument(metavar="INPUT", help="Files or folders (searched recursively).", show_default=False)
]
EncodeInputsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUT",
        help="Files or folders (searched recursively); with --dataset also shards: .tar/.parquet files or URLs "
        "(s3://, gs://, hf://), brace lists like 'data/{00000..00099}.tar', globs.",
        show_default=False,
    ),
]

DEFAULT_MAX_PIXELS = 8192 * 8192


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and `python -m vaecli`.

    Option-parsing errors and Ctrl-C outside a command body are handled here, so that they too print one
    line on stderr, exit with their code, and under --json still print the one JSON document.
    """
    previous = signals.install()  # the console script did already (entry.py); `from vaecli.cli import main` callers too
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in (args[: args.index("--")] if "--" in args else args)
    _route_warnings()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stream(sys.stdout, "stdout"), _Stream(sys.stderr, "stderr")
    try:
        try:
            code = app(args=args, prog_name="vaecli", standalone_mode=False)
        except (KeyboardInterrupt, _Signalled):
            _interrupted(as_json, None)
            code = signals.exit_code()
        except Exception as exc:  # noqa: BLE001 - parse errors (click's, or typer's vendored click), Abort
            code = _parse_error(exc, as_json)
        sys.stdout.flush()
    except StdoutFailed as exc:
        code = _stdout_failed(exc, as_json)
    finally:
        sys.stdout, sys.stderr = saved
        if previous and not any(h is signals._handler for h in previous.values()):
            signals.restore(previous)  # a caller's own handlers (entry.py's are ours: kept to the end)
    sys.exit(code if isinstance(code, int) else 0)


class StdoutFailed(BaseException):
    """stdout cannot be written (closed, full, its reader gone): raised past every `except Exception`, so no
    handler mistakes it for a failure of the run's own work and tries to print to stdout again."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _Stream:
    """sys.stdout or sys.stderr for one CLI run. What a file name cannot be encoded as in the stream's
    encoding (PYTHONIOENCODING=ascii and café.png) is written as a backslash escape: printing never changes
    the outcome. stdout that cannot be written (closed: None; full; a reader gone) raises StdoutFailed;
    stderr that cannot be written is given up silently (there is nowhere left to say so)."""

    def __init__(self, stream: Any, role: str) -> None:
        self._stream, self._role, self._dead = stream, role, stream is None
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass

    def _fail(self, exc: BaseException) -> None:
        self._dead = True
        if self._role == "stdout":
            raise StdoutFailed(exc) from None

    def write(self, text: str) -> int:
        if self._dead:
            if self._role == "stdout":
                raise StdoutFailed(OSError(9, "stdout is closed"))
            return len(text)
        try:
            return self._stream.write(text)
        except UnicodeEncodeError:  # a stream that cannot be reconfigured
            encoding = getattr(self._stream, "encoding", None) or "ascii"
            return self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self._fail(exc)
            return len(text)

    def flush(self) -> None:
        if self._dead:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def isatty(self) -> bool:
        try:
            return not self._dead and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def _stdout_failed(failure: StdoutFailed, as_json: bool) -> int:
    """The exit code when stdout failed: 141 quietly when its reader went away (`| head`, as SIGPIPE would
    end the process), else one error line and 1 (the work may be done, the promised output is not); after
    a signal still 128 + N. Later writes to stdout (Python's own flush at exit) go to /dev/null."""
    exc = failure.exc
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(exc, BrokenPipeError):
        return signals.exit_code() if signals.was_signalled() else BROKEN_PIPE
    what = "the JSON document" if as_json else "the output"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    err_console.print(f"[bold red]error:[/] cannot write {what} to stdout ({escape(printable(reason))})", soft_wrap=True)
    return signals.exit_code() if signals.was_signalled() else ITEMS_FAILED


def _parse_error(exc: Exception, as_json: bool) -> int:
    """Report an exception raised outside a command body (while parsing options) in one line."""
    if type(exc).__name__ == "Abort":  # typer/click turn Ctrl-C during parsing into Abort
        _interrupted(as_json, None)
        return signals.exit_code()
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", USAGE))
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click.ClickException, either copy
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        code = int(exc.exit_code)
    else:
        message, hint, code = f"unexpected error ({type(exc).__name__}: {_one_line(str(exc))[:300]})", "", USAGE
    err_console.print(f"[bold red]error:[/] {escape(printable(_one_line(message)))}{escape(hint)}", soft_wrap=True)
    if as_json:
        _print_json({"ok": 0, "failed": 0, "skipped": 0, "items": [], "error": message})
    return code


def _route_warnings() -> None:
    """Warnings as one escaped line each (`warning: ...`), never Python's two-line source format; Pillow's
    are dropped: what they warn about (corrupt metadata, truncation) is checked and reported per item."""
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        err_console.print(f"warning: {escape(printable(_one_line(str(message))))}", soft_wrap=True)

    warnings.showwarning = show  # type: ignore[assignment]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vaecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Encode images to latents, decode latents to images, measure reconstruction quality."""


# ------------------------------------------------------------------------------------------------ helpers


def _usage(message: str, as_json: bool) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(printable(_one_line(message)))}", soft_wrap=True)
    if as_json:
        _print_json({"ok": 0, "failed": 0, "skipped": 0, "items": [], "error": message})
    return typer.Exit(USAGE)


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def printable(text: str) -> str:
    """`text` safe to print on one terminal line: control and format characters (newline, carriage return,
    escape sequences, bidirectional overrides) and undecodable bytes of file names become escapes, so a
    file name can never forge a line or recolour the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}" if ch not in "\n\r\t" else repr(ch)[1:-1])
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


def _interrupted(as_json: bool, results: list[Any] | None, command: str | None = None) -> None:
    """The report of a run ended by Ctrl-C, SIGTERM or SIGHUP: this process's temp files removed, one line
    on stderr, and under --json the document with the items finished so far. Signals arriving from here on
    are ignored, so the document is printed whole."""
    from .files import remove_own_temp_files

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
        doc: dict[str, Any] = {"command": command} if command else {}
        doc.update(
            ok=sum(r.status == "ok" for r in done),
            failed=sum(r.status == "failed" for r in done),
            skipped=sum(r.status == "skipped" for r in done),
            items=[r.to_dict() for r in done],
            pending=pending,
            interrupted=True,
            error=f"interrupted ({signals.name()})",
        )
        _print_json(doc)


def _secondary_rank() -> bool:
    """Under torchrun, a process other than rank 0: it prints no JSON document and no summary (rank 0's
    report holds every rank's items), so stdout carries exactly one document."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0
    except ValueError:
        return False


def _print_json(doc: dict[str, Any]) -> None:
    if _secondary_rank():
        return
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def _guard(as_json: bool, debug: bool, command: str | None = None) -> Iterator[None]:
    """Turn our errors into one line and exit 2; unexpected ones into one line (traceback with --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except VaecliError as exc:
        if debug:
            traceback.print_exc()
        raise _usage(str(exc), as_json) from None
    except KeyboardInterrupt as exc:
        _interrupted(as_json, getattr(exc, "results", None), command)
        raise typer.Exit(signals.exit_code()) from None
    except Exception as exc:  # noqa: BLE001 - a bug or an environment problem: still one line
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; --debug shows the traceback"
        raise _usage(f"unexpected error ({type(exc).__name__}: {_one_line(str(exc))[:300]}){hint}", as_json) from None


class _Live:
    """The progress callback of a run: each failed item's error line on stderr the moment it fails, and a
    Rich bar (done/total, ok, failed, skipped, images/s, ETA) when enabled. Called from the thread that
    finished the item (often a writer's); Rich's console serialises the output."""

    def __init__(self, bar: Any, debug: bool) -> None:
        self.bar, self.debug = bar, debug
        self.printed: set[int] = set()  # ids of the items whose error line is out (_finish skips them)
        self.task = bar.add_task("", total=None, rate="", tally="") if bar is not None else None
        self.start = time.perf_counter()

    def __call__(self, counts: Any) -> None:
        item = counts.item
        if item is not None and item.status == "failed":
            _error_line(item, self.debug)
            self.printed.add(id(item))
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self.start
        rate = f"{counts.done / elapsed:.2f} img/s" if elapsed > 0 and counts.done else ""
        parts = [f"{counts.ok} ok"] + [f"{n} {name}" for name, n in (("failed", counts.failed), ("skipped", counts.skipped)) if n]
        self.bar.update(self.task, completed=counts.done, total=counts.total, rate=rate, tally=", ".join(parts))


def _error_line(item: Any, debug: bool) -> None:
    """`error: <input>: <reason>` on stderr, escaped (and the traceback with --debug)."""
    line = f"{printable(item.input)}: {printable(_one_line(item.error or ''))}"
    err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
    if debug and item.detail:
        sys.stderr.write(item.detail)


@contextmanager
def _progress(label: str, enabled: bool, debug: bool = False) -> Iterator[_Live]:
    """The run's progress callback (_Live); its bar is drawn on stderr only when enabled."""
    if not enabled:
        yield _Live(None, debug)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
        yield _Live(bar, debug)


def _show_progress(quiet: bool) -> bool:
    return not quiet and err_console.is_terminal


@dataclass(frozen=True)
class ModelChoice:
    """The model flags of one command: --model, --family, --subfolder, --revision, --variant."""

    model: str | None = None
    family: Family | None = None
    subfolder: str | None = None
    revision: str | None = None
    variant: str | None = None

    def check(self) -> None:
        if self.model is None and (self.subfolder or self.revision or self.variant):
            raise VaecliError("--subfolder, --revision and --variant select files of a --model; give --model")


def _load(choice: ModelChoice, device: Device, as_json: bool, debug: bool) -> Any:
    from .batch import open_model
    from .pipeline import resolve_device

    choice.check()
    resolve_device(device.value)  # an unavailable device is its own usage error, not a load failure
    model = choice.model
    try:
        return open_model(
            model, choice.family.value if choice.family else None, device.value,
            subfolder=choice.subfolder, revision=choice.revision, variant=choice.variant,
        )
    except Exception as exc:  # noqa: BLE001 - any load failure is a usage error with one line
        if debug:
            traceback.print_exc()
        name = model or "the embedded default model"
        msg = str(exc) if isinstance(exc, VaecliError) else f"{type(exc).__name__}: {exc}"
        if model is None and not isinstance(exc, VaecliError):
            msg += " (is the default model installed? pass --model)"
        raise _usage(f"cannot load the model: {msg if name in msg else f'{name}: {msg}'}", as_json) from None


def _refuse_torchrun(command: str) -> None:
    """Only encode --dataset splits its work over torchrun's processes; anything else would run whole in
    every process, each writing the same outputs."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise VaecliError(f"{command} does not split its work over torchrun's processes (only encode --dataset "
                          "does); run it as a single process")


def _buckets(
    kohya_config: Path | None, inputs: list[str], resolution: int | None, step: int | None, lo: int | None,
    hi: int | None, no_upscale: bool, flip: bool,
) -> dict[str, Any]:
    """DatasetOptions' bucket fields: from our flags, or kohya's dataset config with our flags standing for
    kohya's command line (filling what the config leaves out)."""
    if kohya_config is None:
        return dict(bucket_resolution=resolution or 512, bucket_step=step or 64, min_bucket_size=lo,
                    max_bucket_size=hi, no_upscale=no_upscale, flip=flip)
    from .dataset.kohya_config import read_kohya_config

    flags = {"resolution": resolution, "bucket_reso_steps": step, "min_bucket_reso": lo, "max_bucket_reso": hi,
             "bucket_no_upscale": no_upscale or None, "flip_aug": flip or None}
    return read_kohya_config(kohya_config, inputs, flags).as_options()


def _run_options(
    dtype: DType, upcast: bool | None, tiling: Tiling, tile_size: int, tile_overlap: int, slicing: int | None,
    compile: bool = False, kernels: Kernels = Kernels.auto,
) -> Any:
    from .pipeline import DTYPES, RunOptions

    if tile_overlap >= tile_size:
        raise VaecliError(f"--tile-overlap {tile_overlap} must be smaller than --tile-size {tile_size}")
    return RunOptions(DTYPES[dtype.value], upcast, tiling.value, tile_size, tile_overlap, slicing, compile=compile,
                      kernels=kernels.value)


def _finish(report: Any, as_json: bool, debug: bool, table: Table | None = None, live: _Live | None = None) -> None:
    """Print the failures not printed as they happened (stderr), then the JSON document or a summary;
    exit 1 when some item failed."""
    if _secondary_rank():  # torchrun: rank 0 reports every rank's items, errors included
        raise typer.Exit(ITEMS_FAILED if report.count("failed") else 0)
    for r in report.items:
        if r.status == "failed" and (live is None or id(r) not in live.printed):
            _error_line(r, debug)
    doc = report.to_dict()
    if not report.items:
        raise _usage(NO_INPUTS, as_json)
    if as_json:
        _print_json(doc)
    else:
        if table is not None:
            out_console.print(table)
        _summary(report, doc)
    if doc["failed"]:
        raise typer.Exit(ITEMS_FAILED)


def _summary(report: Any, doc: dict[str, Any]) -> None:
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


# ------------------------------------------------------------------------------------------------ commands


@app.command(cls=_HelpCommand, short_help="Images to latent files; with --dataset a training cache.")
def encode(
    inputs: EncodeInputsArg,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", parser=output_path, help="Output folder for <rel>.safetensors latents.", show_default=False)],
    model: ModelOpt = None,
    family: FamilyOpt = None,
    subfolder: SubfolderOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    upcast: UpcastOpt = None,
    tiling: TilingOpt = Tiling.auto,
    tile_size: TileSizeOpt = 512,
    tile_overlap: TileOverlapOpt = 64,
    slicing: SlicingOpt = None,
    compile_model: CompileOpt = False,
    kernels: KernelsOpt = Kernels.auto,
    batch_size: BatchOpt = 4,
    sample: SampleOpt = False,
    seed: SeedOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Store raw VAE latents, not the model's normalized ones.", rich_help_panel=OUTPUT)] = False,
    size_policy: SizePolicyOpt = SizePolicy.pad,
    latent_dtype: Annotated[DType, typer.Option("--latent-dtype", help="Precision of the stored latents.", rich_help_panel=OUTPUT)] = DType.fp32,
    alpha: AlphaOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    overwrite: OverwriteOpt = False,
    dataset: Annotated[bool, typer.Option("--dataset", help="Prepare a training cache: aspect buckets, crops, manifest.jsonl, invalidation.", rich_help_panel=DATASET)] = False,
    bucket_resolution: Annotated[Optional[int], typer.Option("--bucket-resolution", metavar="PIXELS", min=8, help="Side of the square bucket whose area all buckets share (SD 1.x: 512, SDXL: 1024).", show_default="512", rich_help_panel=DATASET)] = None,
    bucket_step: Annotated[Optional[int], typer.Option("--bucket-step", metavar="PIXELS", min=8, help="Bucket sides are multiples of this.", show_default="64", rich_help_panel=DATASET)] = None,
    min_bucket_size: Annotated[Optional[int], typer.Option("--min-bucket-size", metavar="PIXELS", help="Shortest bucket side.", show_default="resolution/2; --format kohya: 256, as sd-scripts", rich_help_panel=DATASET)] = None,
    max_bucket_size: Annotated[Optional[int], typer.Option("--max-bucket-size", metavar="PIXELS", help="Longest bucket side.", show_default="resolution*2; --format kohya: 1024, as sd-scripts", rich_help_panel=DATASET)] = None,
    no_upscale: Annotated[bool, typer.Option("--no-upscale", help="Never enlarge: small images get a bucket that fits inside them.", rich_help_panel=DATASET)] = False,
    random_crop: Annotated[bool, typer.Option("--random-crop", help="Crop at a random offset (from --crop-seed and the path) instead of the centre.", rich_help_panel=DATASET)] = False,
    crop_seed: Annotated[int, typer.Option("--crop-seed", metavar="N", help="Seed of --random-crop.", rich_help_panel=DATASET)] = 0,
    flip: Annotated[bool, typer.Option("--flip", help="Also store the latent of the horizontally flipped image (latent_flipped).", rich_help_panel=DATASET)] = False,
    moments: Annotated[bool, typer.Option("--moments", help="Also store the posterior mean and logvar, to sample at training time.", rich_help_panel=DATASET)] = False,
    cache_format: Annotated[Optional[CacheFormat], typer.Option("--format", help="Latent files: vaecli (.safetensors + metadata), kohya (.npz for sd-scripts, its pixel conventions), comfyui (.latent for Load Latent).", show_default="vaecli", rich_help_panel=OUTPUT)] = None,
    flat: Annotated[bool, typer.Option("--flat", help="Every output at the top of OUT, named by the image's file name (ComfyUI lists only those); two images of one name: the second fails.", rich_help_panel=OUTPUT)] = False,
    kohya_next_to_images: Annotated[bool, typer.Option("--kohya-next-to-images", help="kohya format: write <stem>.npz beside each image instead of under OUT.", rich_help_panel=DATASET)] = False,
    kohya_config: Annotated[Optional[Path], typer.Option("--kohya-config", metavar="TOML", help="Bucket settings (resolution, buckets, flip_aug) from kohya's dataset config; implies --dataset --format kohya.", rich_help_panel=DATASET)] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Take shard i of n (i/n, 0-based), e.g. for Slurm arrays; under torchrun RANK/WORLD_SIZE are used.", rich_help_panel=DATASET)] = None,
    layout: Annotated[Optional[Layout], typer.Option("--layout", help="folder: a file per image (image inputs); tar (WebDataset) or parquet: one latent shard per input shard.", show_default="by input", rich_help_panel=SHARDS)] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", metavar="NAME", help="Shards: the tar member suffix (jpg) or parquet column (image) holding the image.", show_default="found", rich_help_panel=SHARDS)] = None,
    engine: Annotated[Engine, typer.Option("--engine", help="local: this process (with --shard or torchrun); ray: a Ray cluster, the VAE as an actor pool (pip install 'vaecli[ray]').", rich_help_panel=SHARDS)] = Engine.local,
    address: Annotated[Optional[str], typer.Option("--address", metavar="ADDR", help="Ray cluster to join (host:6379 or ray://host:10001).", show_default="RAY_ADDRESS, else a new local one", rich_help_panel=SHARDS)] = None,
    ray_workers: Annotated[int, typer.Option("--ray-workers", metavar="N", min=0, help="Ray VAE actors; 0: one per GPU (--device cuda) or per CPU of the cluster.", rich_help_panel=SHARDS)] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Encode images (files or folders) to latent files OUT/<rel>.safetensors with metadata.

    With --dataset: prepare a latent cache for training (buckets, crops, flips, OUT/manifest.jsonl), reusing
    latents whose source, model and settings are unchanged; runs sharded under torchrun or with --shard.
    """
    from .batch import EncodeOptions, check_layout, encode_paths, latent_names
    from .exports import CONTAINER_SUFFIX
    from .dataset.locations import is_url, shard_kind
    from .discovery import check_inputs_exist, require_inputs
    from .io import IMAGE_SUFFIXES

    with _guard(as_json, debug, "encode"):
        run = _run_options(dtype, upcast, tiling, tile_size, tile_overlap, slicing, compile_model, kernels)
        # Before the model loads: a missing path or an overlapping layout is refused at once (shards: later).
        check_inputs_exist([i for i in inputs if not (is_url(i) or shard_kind(i))])
        if kohya_config is not None:
            if cache_format not in (None, CacheFormat.kohya):
                raise VaecliError(f"--kohya-config makes a kohya cache; drop --format {cache_format.value}")
            dataset, cache_format = True, CacheFormat.kohya
        fmt = (cache_format or CacheFormat.vaecli).value
        check_layout(inputs, out, None if dataset else latent_names(CONTAINER_SUFFIX[fmt]))
        if not any(is_url(i) or shard_kind(i) for i in inputs):
            require_inputs(inputs, IMAGE_SUFFIXES, out)  # exit 2 before the model loads or anything is written
        if dataset:
            from .dataset import DatasetOptions, EngineOptions, bind_local_device, parse_shard, prepare_dataset

            ds = DatasetOptions(
                **_buckets(kohya_config, inputs, bucket_resolution, bucket_step, min_bucket_size, max_bucket_size,
                           no_upscale, flip),
                random_crop=random_crop, crop_seed=crop_seed, moments=moments, format=fmt,
                kohya_next_to_images=kohya_next_to_images, raw=raw, sample=sample or seed is not None,
                seed=seed or 0, latent_dtype=latent_dtype.value, alpha=alpha.value if alpha else None, max_pixels=max_pixels,
                batch_size=batch_size, overwrite=overwrite, layout=layout.value if layout else None,
                image_column=image_column, flat=flat,
            )
            part = parse_shard(shard) if shard else None
            spread = EngineOptions(engine.value, address, ray_workers, device.value)
            bind_local_device()  # under torchrun with CUDA: this rank's GPU
            # With Ray the driver only holds the weights for the actors; each actor picks its own device.
            vae = _load(ModelChoice(model, family, subfolder, revision, variant), Device.cpu if engine == Engine.ray else device, as_json, debug)
            with _progress("dataset", _show_progress(quiet), debug) as progress:
                report = prepare_dataset(vae, inputs, out, ds, run, shard=part, progress=progress, engine=spread)
            if not as_json and not _secondary_rank():
                if report.shards:
                    doc = report.to_dict()
                    out_console.print(f"shards: {doc['shards_ok']} written, {doc['shards_skipped']} reused, "
                                      f"{doc['shards_failed']} failed; index {escape(str(report.manifest))}")
                for miss in getattr(report, "missing", []):
                    source = printable(str(miss.get("source", miss)))
                    out_console.print(f"missing source (latent kept, dropped from manifest): {escape(source)}")
            _finish(report, as_json, debug, live=progress)
            return
        _refuse_torchrun("encode without --dataset")
        dataset_only = {"--bucket-resolution": bucket_resolution is not None, "--bucket-step": bucket_step is not None,
                        "--min-bucket-size": min_bucket_size is not None, "--max-bucket-size": max_bucket_size is not None,
                        "--crop-seed": crop_seed != 0, "--shard": shard is not None, "--flip": flip, "--moments": moments, "--no-upscale": no_upscale,
                        "--random-crop": random_crop, "--kohya-next-to-images": kohya_next_to_images, "--layout": layout is not None,
                        "--image-column": image_column is not None, "--engine": engine != Engine.local,
                        "--address": address is not None, "--ray-workers": ray_workers != 0}
        given = [name for name, on in dataset_only.items() if on]
        if given:
            raise VaecliError(f"{', '.join(given)} only {'apply' if len(given) > 1 else 'applies'} with --dataset")
        options = EncodeOptions(
            batch_size=batch_size,
            raw=raw,
            sample=sample or seed is not None,
            seed=seed or 0,
            size_policy=size_policy.value,
            latent_dtype=latent_dtype.value,
            alpha=alpha.value if alpha else None,
            max_pixels=max_pixels,
            overwrite=overwrite,
            format=fmt,
            flat=flat,
        )
        vae = _load(ModelChoice(model, family, subfolder, revision, variant), device, as_json, debug)
        with _progress("encode", _show_progress(quiet), debug) as progress:
            report = encode_paths(vae, [Path(i) for i in inputs], out, options, run, progress)
        _finish(report, as_json, debug, live=progress)


@app.command(cls=_HelpCommand, short_help="Latent files back to images at their original size.")
def decode(
    inputs: InputsArg,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", parser=output_path, help="Output folder for <rel>.<format> images.", show_default=False)],
    model: ModelOpt = None,
    family: FamilyOpt = None,
    subfolder: SubfolderOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    upcast: UpcastOpt = None,
    tiling: TilingOpt = Tiling.auto,
    tile_size: TileSizeOpt = 512,
    tile_overlap: TileOverlapOpt = 64,
    slicing: SlicingOpt = None,
    compile_model: CompileOpt = False,
    kernels: KernelsOpt = Kernels.auto,
    batch_size: BatchOpt = 4,
    image_format: Annotated[ImageFormat, typer.Option("--format", help="Image format written.", rich_help_panel=OUTPUT)] = ImageFormat.png,
    quality: Annotated[int, typer.Option("--quality", metavar="Q", min=1, max=100, help="JPEG/WebP quality (WebP 100: lossless).", rich_help_panel=OUTPUT)] = 95,
    force: Annotated[bool, typer.Option("--force", help="Decode latents made by another model.")] = False,
    scaling_factor: Annotated[
        Optional[float], typer.Option("--scaling-factor", metavar="X", help="Normalization of latents without vaecli metadata (overrides metadata).")
    ] = None,
    shift_factor: Annotated[Optional[float], typer.Option("--shift-factor", metavar="X", help="Shift of such latents (SD3/Flux).")] = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Decode latent files (ours, bare .safetensors or .npy) to images at their original size."""
    from .batch import DecodeOptions, check_layout, decode_paths, image_names
    from .discovery import check_inputs_exist, require_inputs
    from .io import LATENT_SUFFIXES

    with _guard(as_json, debug, "decode"):
        _refuse_torchrun("decode")
        if scaling_factor is not None and (not math.isfinite(scaling_factor) or scaling_factor == 0):
            raise VaecliError(f"--scaling-factor must be a finite, non-zero number, not {scaling_factor}")
        if shift_factor is not None and not math.isfinite(shift_factor):
            raise VaecliError(f"--shift-factor must be a finite number, not {shift_factor}")
        run = _run_options(dtype, upcast, tiling, tile_size, tile_overlap, slicing, compile_model, kernels)
        check_inputs_exist(inputs)
        check_layout(inputs, out, image_names(image_format.value))
        require_inputs(inputs, LATENT_SUFFIXES, out)
        options = DecodeOptions(
            batch_size=batch_size,
            format=image_format.value,
            quality=quality,
            force=force,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            max_pixels=max_pixels,
            overwrite=overwrite,
        )
        vae = _load(ModelChoice(model, family, subfolder, revision, variant), device, as_json, debug)
        with _progress("decode", _show_progress(quiet), debug) as progress:
            report = decode_paths(vae, inputs, out, options, run, progress)
        _finish(report, as_json, debug, live=progress)


@app.command(cls=_HelpCommand, short_help="Encode and decode; PSNR, SSIM and max error per image.")
def roundtrip(
    inputs: InputsArg,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", metavar="PATH", parser=output_path, help="Write reconstructions to OUT/<rel>.png.", show_default=False)
    ] = None,
    model: ModelOpt = None,
    family: FamilyOpt = None,
    subfolder: SubfolderOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    upcast: UpcastOpt = None,
    tiling: TilingOpt = Tiling.auto,
    tile_size: TileSizeOpt = 512,
    tile_overlap: TileOverlapOpt = 64,
    slicing: SlicingOpt = None,
    compile_model: CompileOpt = False,
    kernels: KernelsOpt = Kernels.auto,
    batch_size: BatchOpt = 4,
    sample: SampleOpt = False,
    seed: SeedOpt = None,
    size_policy: SizePolicyOpt = SizePolicy.pad,
    alpha: AlphaOpt = None,
    diff: Annotated[bool, typer.Option("--diff", help="Also write OUT/<rel>.diff.png, |error| x --diff-gain.", rich_help_panel=OUTPUT)] = False,
    diff_gain: Annotated[float, typer.Option("--diff-gain", metavar="GAIN", min=0.0, help="Amplification of the error map.", rich_help_panel=OUTPUT)] = 8.0,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Encode and decode in memory; per-image PSNR, SSIM and max abs error (8-bit RGB, original size)."""
    from .batch import RoundtripOptions, check_layout, image_names, roundtrip_paths
    from .discovery import check_inputs_exist, require_inputs
    from .io import IMAGE_SUFFIXES

    with _guard(as_json, debug, "roundtrip"):
        _refuse_torchrun("roundtrip")
        if diff and out is None:
            raise VaecliError("--diff needs -o/--out: the error maps are written beside the reconstructions")
        if not math.isfinite(diff_gain):
            raise VaecliError(f"--diff-gain must be a finite number, not {diff_gain}")
        run = _run_options(dtype, upcast, tiling, tile_size, tile_overlap, slicing, compile_model, kernels)
        check_inputs_exist(inputs)
        check_layout(inputs, out, image_names("png"))
        require_inputs(inputs, IMAGE_SUFFIXES, out)
        options = RoundtripOptions(
            batch_size=batch_size,
            sample=sample or seed is not None,
            seed=seed or 0,
            size_policy=size_policy.value,
            alpha=alpha.value if alpha else "white",
            max_pixels=max_pixels,
            diff=diff,
            diff_gain=diff_gain,
            overwrite=overwrite,
        )
        vae = _load(ModelChoice(model, family, subfolder, revision, variant), device, as_json, debug)
        with _progress("roundtrip", _show_progress(quiet), debug) as progress:
            report = roundtrip_paths(vae, inputs, out, options, run, progress)
        table = Table(title="roundtrip", show_lines=False)
        for name, justify in (("input", "left"), ("status", "left"), ("PSNR dB", "right"), ("SSIM", "right"), ("max err", "right")):
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
        _finish(report, as_json, debug, table if report.items else None, progress)


@app.command(cls=_HelpCommand, short_help="Time encode and decode: ms/image, images/s, peak memory.")
def bench(
    model: ModelOpt = None,
    family: FamilyOpt = None,
    subfolder: SubfolderOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    resolution: Annotated[list[int], typer.Option("--resolution", "-r", metavar="PIXELS", min=8, help="Square side; repeat for several.")] = [512],  # noqa: B006
    versus: Annotated[Optional[str], typer.Option("--versus", metavar="MODEL", help="Also time MODEL (e.g. the full VAE beside its tiny one) with the same settings, and give this model's speed-up over it per row.", rich_help_panel=MODEL)] = None,
    batch_size: BatchOpt = 1,
    dtype: DTypeOpt = DType.fp32,
    tiling: TilingOpt = Tiling.off,
    tile_size: TileSizeOpt = 512,
    tile_overlap: TileOverlapOpt = 64,
    device: DeviceOpt = Device.auto,
    compile_model: CompileOpt = False,
    kernels: KernelsOpt = Kernels.auto,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Untimed runs first (the first one's time is reported).")] = 1,
    iters: Annotated[int, typer.Option("--iters", metavar="N", min=1, help="Timed runs.")] = 3,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Time encode and decode per resolution: ms/image, images/s, peak memory."""
    with _guard(as_json, debug, "bench"):
        try:
            from .bench import run_bench
        except ImportError as exc:
            raise _usage(f"bench is not available in this installation ({exc})", as_json) from None
        from .pipeline import resolve_device

        if batch_size == 0:
            raise VaecliError("bench needs a numeric --batch-size (auto sizes batches per image during conversion)")
        ModelChoice(model, family, subfolder, revision, variant).check()
        settings = dict(resolutions=list(resolution), batch_size=batch_size, dtype=dtype.value, tiling=tiling.value,
                        device=resolve_device(device.value), warmup=warmup, iters=iters, tile_size=tile_size,
                        tile_overlap=tile_overlap, compile=compile_model, kernels=kernels.value)
        rows = run_bench(model=model, family=family.value if family else None, subfolder=subfolder,
                         revision=revision, variant=variant, **settings)
        others = run_bench(model=versus, **settings) if versus is not None else []
        _compare(rows, others)
        failed = [r for r in rows + others if r.get("error")]
        items = []
        for r in rows:
            item = {"input": f"{r.get('op')} {r.get('resolution')}", "output": None, "status": "ok", "notes": []}
            if r.get("error"):
                item.update(status="failed", error=str(r["error"]))
            items.append(item)
        for r in failed:
            err_console.print(f"[red]error:[/] {r.get('op')} {r.get('resolution')}: {escape(printable(_one_line(str(r['error']))))}", soft_wrap=True)
        if as_json:
            doc = {"command": "bench", "results": rows, "ok": len(rows) - len(failed), "failed": len(failed),
                   "skipped": 0, "items": items}
            if versus is not None:
                doc["versus"] = {"model": versus, "results": others}
            _print_json(doc)
        else:
            out_console.print(bench_table(rows))
            if versus is not None:
                out_console.print(bench_table(others, title=f"bench: --versus {escape(printable(versus))}"))
                for r in rows:
                    if r.get("speedup_vs") is not None:
                        out_console.print(f"{r['op']} {r['resolution']}: {r['ms_per_img']:.1f} ms vs "
                                          f"{r['versus_ms_per_img']:.1f} ms, {r['speedup_vs']:.2f}x the speed")
            out_console.print("busy: share of a call's time the device computed (the rest: host work and waiting)")
        if failed:
            raise typer.Exit(ITEMS_FAILED)


def _compare(rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> None:
    """Each row gets the --versus model's ms/image for the same op and resolution, and the speed-up."""
    by_key = {(o.get("op"), o.get("resolution")): o for o in others if not o.get("error")}
    for r in rows:
        other = by_key.get((r.get("op"), r.get("resolution")))
        if other is None or r.get("error") or not r.get("ms_per_img"):
            continue
        r["versus_ms_per_img"] = other["ms_per_img"]
        r["speedup_vs"] = round(other["ms_per_img"] / r["ms_per_img"], 3)


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


@app.command(cls=_HelpCommand, short_help="A model's layout, config, normalization and sha256.")
def info(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Model folder, weights file or Hub id; default: the embedded model.")] = None,
    model_opt: Annotated[Optional[str], typer.Option("--model", "-m", metavar="MODEL", help="The same as MODEL, as the other commands take it.", rich_help_panel=MODEL)] = None,
    family: FamilyOpt = None,
    subfolder: SubfolderOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a model's layout, config, parameter count, latent normalization, weights sha256 and notes."""
    with _guard(as_json, debug, "info"):
        if model is not None and model_opt is not None and model != model_opt:
            raise VaecliError(f"two models named: {model} and --model {model_opt}; give one")
        model = model if model is not None else model_opt
        vae = _load(ModelChoice(model, family, subfolder, revision, variant), Device.cpu, as_json, debug)
        cfg = vae.config
        minfo = vae.info
        doc: dict[str, Any] = {
            "command": "info",
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
        if as_json:
            item = {"input": minfo.name, "output": None, "status": "ok", "notes": list(minfo.notes)}
            _print_json({**doc, "ok": 1, "failed": 0, "skipped": 0, "items": [item]})
            return
        rows: list[tuple[str, str]] = [(key, str(doc[key])) for key in ("model", "path", "layout", "config_source",
                                                                        "weights_sha256")]
        rows.append(("parameters", f"{doc['parameters']:,}"))
        from .families import of_config

        rows.insert(1, ("family", f"{of_config(cfg).title}: {cfg.class_name}"))
        rows.append(("architecture", cfg.architecture()))
        spec = cfg.latent_spec
        norm = spec.describe()
        if spec.patch_size == 1:  # the values themselves (FLUX.2's hundreds of statistics: --json)
            norm += f" (scaling_factor {spec.scaling_factor:g}" + (f", shift_factor {spec.shift_factor:g}" if
                                                                     spec.shift_factor else "")
            if spec.latents_mean is not None:
                norm += f", latents_mean {list(spec.latents_mean)}, latents_std {list(spec.latents_std or ())}"
            norm += ")"
        rows += [("latent normalization", norm), ("image sides", f"multiples of {cfg.size_multiple} pixels"),
                 ("force_upcast", str(cfg.force_upcast))]
        rows += [("note", note) for note in minfo.notes]
        _print_fields(rows)
        out_console.print_json(json.dumps(doc["config"]))


def _print_fields(rows: list[tuple[str, str]]) -> None:
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
