"""The console script `vaecli` and `python -m vaecli`: signal handling comes first, before the CLI's
imports (typer, Rich, then torch) take their second or more, so that Ctrl-C, SIGTERM or SIGHUP at any
moment ends the run with its report and exit code (signals.py), never a traceback."""

from __future__ import annotations

import sys

from . import signals


def main(argv: list[str] | None = None) -> None:
    signals.install()
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        args = list(sys.argv[1:] if argv is None else argv)
        early_interrupt("--json" in (args[: args.index("--")] if "--" in args else args))
    cli_main(argv)


def early_interrupt(as_json: bool) -> None:
    """A signal before the CLI could load: the `interrupted:` line, the JSON document, 128 + N. The document
    is written out here, not by cli.rendering.document: importing the CLI again is what was interrupted."""
    import json

    signals.reporting()
    try:
        sys.stderr.write("interrupted: before any item ran\n")
        sys.stderr.flush()
        if as_json:
            doc = {"ok": 0, "failed": 0, "skipped": 0, "items": [], "pending": 0, "interrupted": True,
                   "error": f"interrupted ({signals.name()})"}
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
            sys.stdout.flush()
    except (OSError, ValueError):
        pass
    raise SystemExit(signals.exit_code())
