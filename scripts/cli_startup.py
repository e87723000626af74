"""How long `vaecli --help`, a command's help and a usage error take, as a user's shell sees it.

    python scripts/cli_startup.py [--runs 7]

Each case runs as a fresh process (`python -m vaecli ...`); the median wall time is printed next to a bare
`python -c pass` measured the same way. Target (issue 14): under 0.5 s on the 2-core development CPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass": ["-c", "pass"],
    "vaecli --help": ["-m", "vaecli", "--help"],
    "vaecli encode --help": ["-m", "vaecli", "encode", "--help"],
    "usage error (encode without -o)": ["-m", "vaecli", "encode", "photos"],
}


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    for name, argv in CASES.items():
        wall(argv)  # warm the file cache
        times = sorted(wall(argv) for _ in range(args.runs))
        print(f"{name:34s} median {statistics.median(times):.3f} s  (min {times[0]:.3f}, max {times[-1]:.3f})")


if __name__ == "__main__":
    main()
