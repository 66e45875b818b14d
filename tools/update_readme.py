"""Rewrite the README's generated sections from the code (run: `make readme`)."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_optsurvey.optim import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    """Replace the table between the methods-table markers with the registry's."""
    text = README.read_text()
    table = methods_markdown()
    new = re.sub(r"(<!-- methods-table:start -->\n).*?(<!-- methods-table:end -->)",
                 lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
    README.write_text(new)


if __name__ == "__main__":
    main()
