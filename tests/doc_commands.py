"""The shell commands shown in README.md and docs/ (fenced `bash`/`sh`/`shell`/`console` blocks).

A test that runs a documented command takes its text from here, `doc_command("python tools/x.py")`, so that
the command it runs is the one the docs show (tests/test_docs_commands.py counts such calls as coverage).
A block (or one line) that needs something the user supplies carries a marker comment, e.g. the first line
`# needs your data: a checkpoint`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Marker comments: the command needs what the tests cannot supply (your data, a GPU, or many minutes).
MARKERS = ("needs your data", "needs a GPU", "long run")

_FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)")
_SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class DocCommand:
    """One command of a shell block: where it is, its text (continuations joined, comment dropped), and
    the marker that exempts it from being run (None: a test or CI must run it)."""

    file: str
    line: int
    text: str
    marker: str | None


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def strip_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the first `#` outside quotes that starts a word begins the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _marker(comment: str) -> str | None:
    return next((m for m in MARKERS if comment.lower().startswith(m.lower())), None)


def commands_in(text: str, name: str = "<text>") -> list[DocCommand]:
    """The commands of the shell blocks of one Markdown text."""
    out: list[DocCommand] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(2).lower(), i + 1
        end = start
        while end < len(lines) and not _FENCE.match(lines[end]):
            end += 1
        if lang in _SHELL:
            out += _block_commands(lines[start:end], start + 1, name)
        i = end + 1
    return out


def _block_commands(block: list[str], first_line: int, name: str) -> list[DocCommand]:
    block_marker = None
    out: list[DocCommand] = []
    pending, pending_line, pending_marker = "", 0, None
    for offset, raw in enumerate(block):
        code, comment = strip_comment(raw.strip())
        if not code:  # a comment line: the block's marker if it is the first one
            if comment and not out and not pending and block_marker is None:
                block_marker = _marker(comment)
            continue
        if not pending:
            pending_line = first_line + offset
        pending_marker = pending_marker or _marker(comment)
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        out.append(DocCommand(name, pending_line, normalise(pending + code),
                              block_marker or pending_marker))
        pending, pending_marker = "", None
    return out


def normalise(command: str) -> str:
    """One spacing, no leading environment assignments, `python -m pip` as `pip`: how commands compare."""
    text = " ".join(command.split())
    text = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", text)
    return re.sub(r"^python -m pip ", "pip ", text)


def documented_commands() -> list[DocCommand]:
    """Every command of README.md and docs/, in file order."""
    return [c for f in doc_files() for c in commands_in(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]


def doc_command(prefix: str) -> str:
    """The one documented command that starts with `prefix` (the same text may appear in several pages)."""
    found = {c.text for c in documented_commands() if c.text.startswith(prefix)}
    if len(found) != 1:
        raise LookupError(f"{len(found)} distinct documented commands start with {prefix!r}: {sorted(found)}")
    return found.pop()
