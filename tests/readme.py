"""README.md's code blocks, by the section they are in, for the tests that run them: what README shows is what runs."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def code_blocks(lang: str = "python") -> list[tuple[str, str]]:
    """[(the heading line of the section it is in, its code)] for every ```lang block, in order; a block indented
    under a list item is dedented."""
    blocks, heading = [], ""
    lines = iter(README.read_text().splitlines())
    for line in lines:
        if line.startswith("#"):
            heading = line.strip()
        fence = FENCE.match(line)
        if fence:
            indent, kind = fence.groups()
            body = []
            for inner in lines:
                if inner.strip() == "```":
                    break
                body.append(inner[len(indent):])
            if kind == lang:
                blocks.append((heading, "\n".join(body) + "\n"))
    return blocks


def code_block(heading: str, lang: str = "python", index: int = 0) -> str:
    """The `index`-th ```lang block of the section whose heading line is `heading` (e.g. "### Training from Python")."""
    blocks = [code for h, code in code_blocks(lang) if h == heading]
    if len(blocks) <= index:
        raise AssertionError(f"README has {len(blocks)} ```{lang} block(s) under {heading!r}, not {index + 1}")
    return blocks[index]
