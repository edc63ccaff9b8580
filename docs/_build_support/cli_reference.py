"""MkDocs hook: insert the command line's help texts into the pages.

A line ``<!-- cli-help: spectrum -->`` in a page becomes the output of ``specdens spectrum
--help`` (``<!-- cli-help -->``: of ``specdens --help``), taken from the parser of
:mod:`specdens.cli` at build time, so the reference cannot drift from the code.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

MARKER = re.compile(r"^<!--\s*cli-help(?::\s*(?P<command>[\w-]+))?\s*-->\s*$", re.MULTILINE)


def _help(command: str | None) -> str:
    from specdens.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"          # argparse wraps to the terminal width
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args([command, "--help"] if command else ["--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    text = out.getvalue().strip()
    if not text:
        raise ValueError(f"specdens {command or ''} --help printed nothing")
    return text


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: f"```text\n{_help(m.group('command'))}\n```", markdown)
