"""The fenced code blocks of the docs with examples (docs/api.md, clients/README.md), which the tests run as
written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "api.md", ROOT / "clients" / "README.md")
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # of the opening fence
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def examples(language: str) -> list[Example]:
    """The fenced blocks of `language` in every doc, in order."""
    found: list[Example] = []
    for doc in DOCS:
        block: list[str] | None = None
        opened = 0
        block_language = ""
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            fence = _FENCE.match(line)
            if block is None:
                if fence:
                    block, opened, block_language = [], number, fence.group(1)
            elif fence and not fence.group(1):
                if block_language == language:
                    found.append(Example(doc, opened, language, "\n".join(block) + "\n"))
                block = None
            else:
                block.append(line)
    return found
