"""Grounding overlay: the boxes a DeepSeek-VL2 reply names, drawn on the image they refer to."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

import vl

COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_groundings(image: Image.Image, groundings: list[tuple[str, list[tuple[int, int, int, int]]]]) -> Image.Image:
    """A copy of `image` with each labelled box outlined in its own colour (PIL's default font)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, min(out.size) // 30))
    width = max(2, min(out.size) // 150)
    for i, (label, boxes) in enumerate(groundings):
        color = COLORS[i % len(COLORS)]
        for x1, y1, x2, y2 in boxes:
            draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
            if label:
                left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
                draw.rectangle((left, top, right + 4, bottom + 2), fill=color)
                draw.text((x1 + 2, y1), label, fill=(255, 255, 255), font=font)
    return out


def grounding_overlay(image: Image.Image, reply: str) -> tuple[Image.Image | None, vl.Groundings]:
    """(overlay or None when the reply names no valid box, the parsed groundings with `.malformed`)."""
    groundings = vl.parse_grounding(reply, image.width, image.height)
    return (draw_groundings(image, groundings) if groundings else None), groundings
