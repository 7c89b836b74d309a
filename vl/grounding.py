"""Parse DeepSeek-VL2 grounding output into pixel boxes, without `eval` and without raising.

Format: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`, coordinates in 0..999 of the
image width/height. A `<|det|>` without a preceding `<|ref|>` gets the label "". Boxes that are not
four integers in range with x1 <= x2 and y1 <= y2, and unclosed tags, are listed in `.malformed`.
"""

from __future__ import annotations

import re

SPAN = re.compile(r"(?:<\|ref\|>(?P<label>.*?)<\|/ref\|>\s*)?<\|det\|>(?P<det>.*?)(?:<\|/det\|>|$)", re.DOTALL)
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


def parse_grounding(text: str, width: int, height: int) -> Groundings:
    """Boxes scaled to a `width` x `height` image (`int(v / 999 * size)`, as the reference demo)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    result, malformed = [], []
    for span in SPAN.finditer(text):
        label = (span.group("label") or "").strip()
        det = span.group("det")
        if not span.group(0).endswith("<|/det|>"):
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
