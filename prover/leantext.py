"""Small textual helpers over Lean source: signatures, binders, top-level tactic steps."""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from .textguard import blank_comments_and_strings

_OPEN, _CLOSE = "([{⦃⟨", ")]}⦄⟩"


@dataclass(frozen=True)
class Step:
    """One top-level tactic of a tactic block, with its continuation lines."""

    text: str  # dedented to column 0
    start_line: int  # 0-based, within the block
    end_line: int  # exclusive


def _depth_scan(text: str):
    """Yield (index, char, depth-before-char) outside comments and strings."""
    code = blank_comments_and_strings(text)
    depth = 0
    for i, c in enumerate(code):
        yield i, c, depth
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1


def find_top_level(text: str, token: str, start: int = 0) -> int:
    """First offset >= start of `token` at bracket depth 0 (":" never matches ":=")."""
    for i, c, depth in _depth_scan(text):
        if i < start or depth or not text.startswith(token, i):
            continue
        if token == ":" and text.startswith(":=", i):
            continue
        return i
    return -1


@dataclass(frozen=True)
class Signature:
    """`<keyword> name binders : type` split at top level."""

    name: str
    binders: list[str]
    type: str


def split_binders(text: str) -> list[str]:
    """Bracketed binder groups at depth 0, e.g. "(a b : ℝ) (h : a < b)" -> two groups."""
    groups, start = [], None
    for i, c, depth in _depth_scan(text):
        if c in _OPEN and depth == 0:
            start = i
        elif c in _CLOSE and depth == 1 and start is not None:
            groups.append(" ".join(text[start:i + 1].split()))
            start = None
        elif depth == 0 and not c.isspace() and c not in _OPEN + _CLOSE:
            raise ValueError(f"unsupported binder syntax near {text[i:i + 20]!r}")
    return groups


def parse_signature(head: str) -> Signature:
    """Parse `name binders : type` (the text after `theorem`/`lemma`/`have`, before `:=`)."""
    head = head.strip()
    colon = find_top_level(head, ":")
    if colon < 0:
        raise ValueError(f"no top-level ':' in {head[:60]!r}")
    m = re.match(r"([^\s(\[{⦃:]*)", head)
    name = m.group(1)
    return Signature(name, split_binders(head[len(name):colon]), " ".join(head[colon + 1:].split()))


def binder_names(binder: str) -> list[str]:
    """Names an explicit binder introduces; instance/implicit binders give none to pass along."""
    if not binder.startswith("("):
        return []
    inner = binder[1:-1]
    colon = find_top_level(inner, ":")
    return inner[:colon].split() if colon >= 0 else []


def top_level_steps(block: str) -> list[Step]:
    """Split an indented tactic block into its top-level tactics (by indentation, as Lean does)."""
    lines = block.split("\n")
    blanked = blank_comments_and_strings(block).split("\n")
    indents = [len(b) - len(b.lstrip()) for b in blanked if b.strip()]
    if not indents:
        return []
    base = min(indents)
    starts = [i for i, b in enumerate(blanked) if b.strip() and len(b) - len(b.lstrip()) == base]
    steps = []
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(lines)
        while e > s + 1 and not blanked[e - 1].strip():
            e -= 1
        steps.append(Step(textwrap.dedent("\n".join(lines[s:e])), s, e))
    return steps


def indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line.strip() else line for line in text.split("\n"))


# A header line is exactly one `import Module.Name` (or blank): Lean's header ends at the first token that
# is not an import, on the same line too, so any other text on an import line (`import Mathlib axiom c :
# False`, a `/-` opening a comment, a `\r`, which Lean reads as a space) would be code that runs in the
# header command and escapes the text layer. Such lines go to the body, where they are scanned (and Lean
# refuses an `import` there).
_HEADER_LINE = re.compile(r"(?:import[ \t]+[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?[ \t]*")


def split_header(code: str) -> tuple[str, str, int]:
    """(imports, body, number of header lines): leading lines that are blank or exactly `import Name`."""
    lines = code.split("\n")
    n = 0
    while n < len(lines) and _HEADER_LINE.fullmatch(lines[n]):
        n += 1
    if n == len(lines):  # nothing but imports: keep the last line as an (empty) body
        n = max(n - 1, 0)
    return "\n".join(lines[:n]), "\n".join(lines[n:]), n
