"""Turning untrusted image inputs into plain 8-bit RGB PIL images, or a clear error.

The reference code calls `Image.open(path).convert("RGB")`, which crashes on empty files, silently
drops alpha onto black, clips 16-bit images to white, ignores EXIF orientation and decodes
arbitrarily large images. Every one of those cases gets a defined handling here.
"""

from __future__ import annotations

import base64
import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; far above any tiling candidate, far below a bomb
ALPHA_BACKGROUND = (255, 255, 255)

ImageInput = str | Path | bytes | bytearray | memoryview | io.IOBase | Image.Image
# What PIL's format plugins raise on data cut short or corrupt, in the header or in the pixel data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class ImageLoadError(ValueError):
    """The input could not be decoded as an image (empty, truncated, not an image, too large)."""


def _read_bytes(source: object) -> object:
    """Bytes-like objects and file objects as bytes; anything else is returned unchanged.

    File objects are recognised by their `read` method, not by `io.IOBase`: `tempfile.NamedTemporaryFile`
    and many upload wrappers are file objects that do not subclass it.
    """
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    read = getattr(source, "read", None)
    if not isinstance(source, (str, Path, bytes)) and callable(read):
        return read()
    return source


def _open(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, str) and source.startswith("data:image/"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ImageLoadError("data URI images must be base64 encoded")
        try:
            source = base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise ImageLoadError(f"invalid base64 image data: {e}") from e
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"image file not found: {path}")
        source = path.read_bytes()
        name = str(path)
    else:
        name = "image data"
    source = _read_bytes(source)
    if not isinstance(source, bytes):
        raise ImageLoadError(f"unsupported image input type {type(source).__name__}")
    if len(source) == 0:
        raise ImageLoadError(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own `max_pixels` check decides; PIL's hard limit (an error) still applies above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source))
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name} is not a recognised image format") from e
    except _DECODE_ERRORS as e:
        # Data cut off inside the header: PIL raises whatever its format plugin hits first.
        raise ImageLoadError(f"{name} is truncated or corrupt: {e}") from e


def _to_rgb(img: Image.Image, alpha_background: tuple[int, int, int]) -> Image.Image:
    """Mode conversion with the semantics a viewer would show, not PIL's raw `convert("RGB")`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int holding 16-bit) greyscale: rescale the full range to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.clip(np.round(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "RGBa", "PA") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, alpha_background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_image(
    source: ImageInput,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    alpha_background: tuple[int, int, int] = ALPHA_BACKGROUND,
) -> Image.Image:
    """Decode `source` (path, bytes, file object, `data:image/...;base64,` URI or PIL image) to RGB.

    Handling: EXIF orientation applied; animated images use their first frame; alpha is composited
    onto `alpha_background`; palette, greyscale, CMYK and 16-bit images are converted to 8-bit RGB.
    Raises `ImageLoadError` for empty, truncated or non-image data and for images with more than
    `max_pixels` pixels (checked from the header, before decoding, so bombs are never expanded).
    """
    img = _open(source)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image is too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels}"
        )
    if getattr(img, "n_frames", 1) > 1:
        frame = img.tell()
        img.seek(0)
        if img is source:  # the caller's image: keep frame 0, give the caller back its frame pointer
            img, caller = img.copy(), img
            caller.seek(frame)
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"image data is truncated or corrupt: {e}") from e
    img = ImageOps.exif_transpose(img)
    return _to_rgb(img, alpha_background)
