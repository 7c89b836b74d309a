"""Parse DeepSeek-VL2 grounding output into pixel boxes, without `eval` and without raising.

Format: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`, coordinates in 0..999 of the
image width/height. A `<|det|>` without a preceding `<|ref|>` gets the label "". Labels and box lists never
run across another grounding tag. Boxes that are not four integers in range with x1 <= x2 and y1 <= y2,
unclosed tags, a `<|ref|>` with no `<|det|>` and stray closing tags are listed in `.malformed`.
"""

from __future__ import annotations

import re

# Text that holds no grounding tag: a label or a det body can never run across the next object's tags.
UNTAGGED = r"(?:(?!<\|/?(?:ref|det)\|>).)*"
PIECE = re.compile(
    rf"<\|ref\|>(?P<label>{UNTAGGED})(?P<ref_end><\|/ref\|>)?"
    rf"|<\|det\|>(?P<det>{UNTAGGED})(?P<det_end><\|/det\|>)?"
    r"|(?P<stray><\|/(?:ref|det)\|>)",
    re.DOTALL,
)
BOX = re.compile(r"\[\s*([^\[\]]*?)\s*\]")
NUMBER = re.compile(r"^-?\d+$")
COORD_MAX = 999


class Groundings(list):
    """`[(label, [(x1, y1, x2, y2), ...]), ...]` in pixels, plus `.malformed`: what was skipped and why."""

    def __init__(self, items=(), malformed: list[str] | None = None):
        super().__init__(items)
        self.malformed = malformed or []


def _parse_box(text: str) -> tuple[int, int, int, int] | str:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(NUMBER.match(p) for p in parts):
        return f"box [{text}] is not four integers"
    x1, y1, x2, y2 = (int(p) for p in parts)
    if not all(0 <= v <= COORD_MAX for v in (x1, y1, x2, y2)):
        return f"box [{text}] has coordinates outside 0..{COORD_MAX}"
    if x1 > x2 or y1 > y2:
        return f"box [{text}] has x1 > x2 or y1 > y2"
    return x1, y1, x2, y2


def _no_det(ref: re.Match) -> str:
    return f"no <|det|> for <|ref|> {ref['label'].strip()!r}"


def _pairs(text: str) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """(label, det body, closed) for every `<|det|>`, and what was unpaired or unclosed.

    A `<|ref|>` labels the `<|det|>` that follows it after nothing but whitespace; any other
    `<|ref|>` has no boxes and is reported, as is a stray closing tag.
    """
    pairs, malformed = [], []
    pending: re.Match | None = None  # a closed <|ref|> waiting for its <|det|>
    for piece in PIECE.finditer(text):
        if piece["stray"]:
            malformed.append(f"unpaired {piece['stray']}")
        elif piece["label"] is not None:
            if pending:
                malformed.append(_no_det(pending))
            pending = piece if piece["ref_end"] else None
            if not piece["ref_end"]:
                malformed.append(f"unclosed <|ref|> {piece['label'].strip()!r}")
        else:
            paired = pending is not None and not text[pending.end() : piece.start()].strip()
            if pending and not paired:
                malformed.append(_no_det(pending))
            pairs.append((pending["label"].strip() if paired else "", piece["det"], piece["det_end"] is not None))
            pending = None
    if pending:
        malformed.append(_no_det(pending))
    return pairs, malformed


def parse_grounding(text: str, width: int, height: int) -> Groundings:
    """Boxes scaled to a `width` x `height` image (`int(v / 999 * size)`, as the reference demo)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    result = []
    pairs, malformed = _pairs(text)
    for label, det, closed in pairs:
        if not closed:
            malformed.append(f"unclosed <|det|> for {label!r}")
        boxes = []
        inner = det.strip()
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        for match in BOX.finditer(inner):
            box = _parse_box(match.group(1))
            if isinstance(box, str):
                malformed.append(f"{label!r}: {box}")
                continue
            x1, y1, x2, y2 = box
            boxes.append(
                (
                    int(x1 / COORD_MAX * width),
                    int(y1 / COORD_MAX * height),
                    int(x2 / COORD_MAX * width),
                    int(y2 / COORD_MAX * height),
                )
            )
        if not BOX.search(inner):
            malformed.append(f"{label!r}: no box in {det!r}")
        if boxes:
            result.append((label, boxes))
    return Groundings(result, malformed)
