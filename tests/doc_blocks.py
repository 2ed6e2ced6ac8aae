"""The code the project's documents show, found for the docs tests (test_docs.py, test_docs_c.py).

Conventions (what a writer of the documents needs to know):
- A fenced block's language is the first word of its info string; more words are flags. ```python no-run is
  shown but not run (it needs what a test cannot give: a server, real checkpoints).
- In ```bash (or sh, shell) blocks, every command line whose program is ``seesr``, ``seesr-export`` or
  ``seesr-triton-client`` (also as a path, ``.venv/bin/seesr``) is parsed by that program's own argument parser,
  after joining ``\\`` continuations and dropping ``# comments``; ``NAME=value`` prefixes are skipped, and a
  line is cut at a pipe, ``&&``, ``;`` or a redirection. Values are not checked beyond what the parser checks,
  so ``$BUNDLE`` or ``<folder>`` may stand for one.
- ```python blocks of README.md and docs/usage.md run, each in a fresh interpreter, in a folder holding
  ``engines/seesr`` (the tests' tiny bundle, its defaults lowered to 2 steps at 64 px so a block takes seconds)
  and ``photo.png`` (a small RGB photo), with HOME in that folder. A block stands alone: it imports what it uses.
- ```c and ```cpp blocks, and the examples in the leading comments of the native headers (comment lines indented
  two spaces more than the comment's text), are compiled. A block with an ``#include`` or a ``main(`` is a whole
  file; any other is the body of ``int snippet(const uint8_t *rgb, int32_t width, int32_t height, int32_t
  stride)`` (an RGB8 image to work on), after seesr.h (C) or seesr.hpp (C++) and the usual standard headers.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The documents whose code is held true (those that exist; docs/ and deploy/ and their subfolders entirely).
DOCUMENTS = (
    "README.md",
    "CONTRIBUTING.md",
    "benchmarks/README.md",
    "runtime/cpp/README.md",
    "deploy/**/*.md",
    "docs/**/*.md",
)
HEADERS = ("runtime/cpp/include/seesr.h", "runtime/cpp/include/seesr.hpp")
SHELL_LANGUAGES = ("bash", "sh", "shell")
PROGRAMS = ("seesr", "seesr-export", "seesr-triton-client")

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*(.*)$")


@dataclass(frozen=True)
class Block:
    path: Path  # relative to ROOT
    line: int  # the line of its first line of code (1-based)
    language: str
    flags: tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def documents() -> list[Path]:
    found: list[Path] = []
    for pattern in DOCUMENTS:
        for name in sorted(glob.glob(pattern, root_dir=ROOT, recursive=True)):
            if Path(name) not in found:
                found.append(Path(name))
    return found


def markdown_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file (``text``: its contents, read from ROOT / path if None)."""
    lines = (text if text is not None else (ROOT / path).read_text()).splitlines()
    blocks, number = [], 0
    while number < len(lines):
        opening = _FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        indent, fence, info = opening.groups()
        words = info.split()
        body, start = [], number + 1
        while number < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[number]):
            body.append(lines[number][len(indent) :] if lines[number].startswith(indent) else lines[number].lstrip())
            number += 1
        number += 1  # the closing fence
        language = words[0].lower() if words else ""
        blocks.append(Block(path, start, language, tuple(words[1:]), "\n".join(body) + "\n"))
    return blocks


def all_blocks(languages: tuple[str, ...]) -> list[Block]:
    return [block for path in documents() for block in markdown_blocks(path) if block.language in languages]


def header_examples(path: Path) -> list[Block]:
    """The examples in a header's leading comment: runs of comment lines indented two spaces more than the
    comment's text (`` *   code`` in a /* */ comment, ``//   code`` in // comments)."""
    language = "cpp" if path.suffix == ".hpp" else "c"
    examples, run, start = [], [], 0
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        comment = re.match(r"^(?:/\*| \*(?!/)|//)(.*)$", line)
        if comment is None:
            break  # the leading comment ends
        code = re.match(r"^ {3}(.*)$", comment.group(1))
        if code is not None and comment.group(1).strip():
            run, start = run + [code.group(1)], start or number
        elif run:
            examples.append(Block(path, start, language, (), "\n".join(run) + "\n"))
            run, start = [], 0
    if run:
        examples.append(Block(path, start, language, (), "\n".join(run) + "\n"))
    return examples


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of each shell line of a block, ``\\`` continuations joined onto the first."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, line in enumerate(block.text.splitlines()):
        number = block.line + offset
        start, text = pending if pending is not None else (number, "")
        text += line
        if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
            pending = (start, text.rstrip()[:-1] + " ")
            continue
        pending = None
        joined.append((start, text))
    if pending is not None:
        joined.append(pending)
    return joined
