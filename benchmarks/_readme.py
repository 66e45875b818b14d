"""Benchmark figures in README.md come from the scripts that measure them, never typed by hand.

A script that prints a table may also write it into README.md between the markers
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` (``--write-readme``), together with the command
and the machine it was measured on. A block that does not exist yet is appended to the README's
"Benchmarks" section.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def machine() -> str:
    """One line naming what the figures were measured on."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    return f"{device}, {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}"


def write_block(name: str, markdown: str, readme: Path = README) -> None:
    """Replace (or add) README's ``bench:NAME`` block with ``markdown``, the command and the machine."""
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"name must be lower-case letters, digits, '_' or '-', got {name!r}")
    command = " ".join(["python", *(a for a in sys.argv if a != "--write-readme")])
    body = f"{markdown.rstrip()}\n\n<sub>Measured by `{command}` on {machine()}.</sub>\n"
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = readme.read_text()
    block = f"{start}\n{body}{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    readme.write_text(text)
