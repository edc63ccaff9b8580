"""``python -m specdens``: the command line (see :mod:`specdens.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
