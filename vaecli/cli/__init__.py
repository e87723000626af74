"""The `vaecli` command: parse flags, build options, call one core function, render with Rich, exit code.

Exit codes: 0 every item ok (or skipped), 1 the run happened and some item failed, 2 the command as given
cannot run (bad option, an input path that does not exist, no inputs, an overlapping layout, a model that
cannot be loaded; nothing is read or written), 130 interrupted. `--json` prints exactly one JSON
document on stdout, also on parse errors and Ctrl-C; every line on stderr has its control characters escaped.

Rooms: app.py (the Typer app, main, error routing), options.py (every shared option and its default, once),
settings.py (options -> the core's dataclasses), rendering.py (the JSON document, summaries, tables),
output.py (consoles, streams, exit codes), and the commands: convert.py (encode, decode, roundtrip),
dataset_mode.py (encode --dataset), measure.py (bench, info). Importing this package registers the commands.
"""

from __future__ import annotations

from . import convert, measure  # noqa: F401 - registers the commands on `app`
from .app import app, main
from .output import err_console, out_console, printable
from .rendering import bench_table

__all__ = ["app", "bench_table", "err_console", "main", "out_console", "printable"]
