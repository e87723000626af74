"""`python -m vaecli` runs the CLI."""

from .cli import main

main()
