"""`python -m vaecli` runs the CLI (signals handled first: entry.py)."""

from .entry import main

main()
