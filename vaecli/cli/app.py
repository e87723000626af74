"""The Typer app and error routing: plain help, main() (parse errors, Ctrl-C, a closed stdout, warnings), and
the guard that turns what a command raises into one line and an exit code."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from .. import __version__, signals
from ..errors import VaecliError
from .output import BROKEN_PIPE, ITEMS_FAILED, USAGE, StdoutFailed, Stream, err_console, one_line, print_json, printable
from .rendering import document, interrupted, usage


class HelpCommand(TyperCommand):
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
                required = "  [required]" if param.required else ""
                record = (self._argument_name(param), (param.help or "") + required)
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


class Signalled(BaseException):
    """A KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP: signals.py) outside a command's guard (while it imports
    torch, or while options are parsed), carried past typer, which would turn it into a silent exit 130."""


class Group(TyperGroup):
    """The command group, passing interrupts on to main() (which reports them) instead of typer's handler."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Signalled() from exc

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Signalled() from exc


app = typer.Typer(
    cls=Group,
    name="vaecli",
    help="Image <-> latent conversion with the KL autoencoder of latent diffusion (SD, SDXL, SD3, Flux VAEs).",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help (HelpCommand)
)


def command(short_help: str) -> Any:
    """The decorator of a command: registered on `app` with plain help."""
    return app.command(cls=HelpCommand, short_help=short_help)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and `python -m vaecli`.

    Option-parsing errors and Ctrl-C outside a command body are handled here, so that they too print one
    line on stderr, exit with their code, and under --json still print the one JSON document.
    """
    previous = signals.install()  # the console script did already (entry.py); callers of vaecli.cli.main too
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in (args[: args.index("--")] if "--" in args else args)
    _route_warnings()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Stream(sys.stdout, "stdout"), Stream(sys.stderr, "stderr")
    try:
        try:
            code = app(args=args, prog_name="vaecli", standalone_mode=False)
        except (KeyboardInterrupt, Signalled):
            interrupted(as_json, None)
            code = signals.exit_code()
        except Exception as exc:  # noqa: BLE001 - parse errors (click's, or typer's vendored click), Abort
            code = _parse_error(exc, as_json)
        sys.stdout.flush()
    except StdoutFailed as exc:
        code = _stdout_failed(exc, as_json)
    finally:
        sys.stdout, sys.stderr = saved
        # A caller's own handlers are put back; entry.py's are ours, kept to the end.
        if previous and not signals.ours(previous):
            signals.restore(previous)
    sys.exit(code if isinstance(code, int) else 0)


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
    err_console.print(f"[bold red]error:[/] cannot write {what} to stdout ({escape(printable(reason))})",
                      soft_wrap=True)
    return signals.exit_code() if signals.was_signalled() else ITEMS_FAILED


def _parse_error(exc: Exception, as_json: bool) -> int:
    """Report an exception raised outside a command body (while parsing options) in one line."""
    if type(exc).__name__ == "Abort":  # typer/click turn Ctrl-C during parsing into Abort
        interrupted(as_json, None)
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
        message, hint, code = f"unexpected error ({type(exc).__name__}: {one_line(str(exc))[:300]})", "", USAGE
    err_console.print(f"[bold red]error:[/] {escape(printable(one_line(message)))}{escape(hint)}", soft_wrap=True)
    if as_json:
        print_json(document(error=message))
    return code


def _route_warnings() -> None:
    """Warnings as one escaped line each (`warning: ...`), never Python's two-line source format; Pillow's
    are dropped: what they warn about (corrupt metadata, truncation) is checked and reported per item."""
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        err_console.print(f"warning: {escape(printable(one_line(str(message))))}", soft_wrap=True)

    warnings.showwarning = show  # type: ignore[assignment]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vaecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
) -> None:
    """Encode images to latents, decode latents to images, measure reconstruction quality."""


@contextmanager
def guard(as_json: bool, debug: bool, command: str | None = None) -> Iterator[None]:
    """Turn our errors into one line and exit 2; unexpected ones into one line (traceback with --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except VaecliError as exc:
        if debug:
            traceback.print_exc()
        raise usage(str(exc), as_json) from None
    except KeyboardInterrupt as exc:
        interrupted(as_json, getattr(exc, "results", None), command)
        raise typer.Exit(signals.exit_code()) from None
    except Exception as exc:  # noqa: BLE001 - a bug or an environment problem: still one line
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; --debug shows the traceback"
        raise usage(f"unexpected error ({type(exc).__name__}: {one_line(str(exc))[:300]}){hint}", as_json) from None
