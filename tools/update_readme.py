"""Rewrite the generated documentation from the code: README's methods table, docs/theory.md (`make readme`)."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_optsurvey.optim import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    """Replace the README's methods table with the registry's, and docs/theory.md with the results'."""
    text = README.read_text()
    table = methods_markdown()
    new = re.sub(r"(<!-- methods-table:start -->\n).*?(<!-- methods-table:end -->)",
                 lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
    README.write_text(new)
    from lightning_optsurvey.theory import render_docs

    (README.parent / "docs" / "theory.md").write_text(render_docs())


if __name__ == "__main__":
    main()
