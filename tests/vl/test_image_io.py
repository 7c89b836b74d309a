"""Bad and unusual image inputs: each has a defined handling or a clear error (issue point 6)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from vl import ImageLoadError, load_image


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb(w=40, h=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image at all")
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "PPM", "GIF", "TIFF"])
@pytest.mark.parametrize("keep", [0.5, 0.1, 20, 12, 5])
def test_truncated_file(fmt, keep):
    """Cut in the pixel data or inside the header: both are an ImageLoadError, never a raw PIL error."""
    data = _encode(_rgb(200, 200), fmt)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    with pytest.raises(ImageLoadError, match="truncated|not a recognised"):
        load_image(data[:cut])


def test_decompression_bomb_is_rejected_from_the_header():
    # A 1-bit 10000x10000 PNG compresses to a few kB but decodes to 100 MP.
    bomb = _encode(Image.new("1", (10000, 10000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(ImageLoadError, match="max_pixels=50000000"):
        load_image(bomb, max_pixels=50_000_000)
    huge = _encode(Image.new("1", (20000, 20000)), "PNG")  # beyond PIL's own hard limit
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(huge, max_pixels=10**12)
    small = _encode(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(small, max_pixels=300 * 300 - 1)
    assert load_image(small, max_pixels=300 * 300).size == (300, 300)


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (4, 4))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # palette index 0 (red) is transparent
    out = load_image(_encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_rgba_alpha_composited_on_background():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    out = load_image(_encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((3, 3)) == (255, 255, 255)
    out = load_image(_encode(img, "PNG"), alpha_background=(127, 127, 127))
    assert out.getpixel((3, 3)) == (127, 127, 127)


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_encode(img, "JPEG", quality=100))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535, 32768]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    out = load_image(_encode(img, "PNG"))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255), (128, 128, 128)]


def test_greyscale_is_replicated():
    img = Image.new("L", (3, 3), 77)
    assert load_image(_encode(img, "PNG")).getpixel((1, 1)) == (77, 77, 77)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 0, 0)


def test_callers_animated_image_keeps_its_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    mine = Image.open(buf)
    mine.seek(2)
    out = load_image(mine)
    assert out.getpixel((4, 4)) == (255, 0, 0) and mine.tell() == 2


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=100))
    assert out.size == (20, 60)
    assert sum(out.getpixel((10, 2))) > 700  # the white strip is now at the top
    assert sum(out.getpixel((10, 57))) < 60


def test_inputs_path_bytes_fileobj_datauri_pil(tmp_path):
    img = _rgb()
    data = _encode(img, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, str(path), data, io.BytesIO(data), uri, img):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(img))
    with pytest.raises(ImageLoadError, match="base64"):
        load_image("data:image/png;base64,***")
    with pytest.raises(ImageLoadError, match="unsupported"):
        load_image(12345)


def test_file_like_wrappers_and_bytearrays_are_accepted(tmp_path):
    """`NamedTemporaryFile` objects are file objects without subclassing io.IOBase; bytearray is bytes-like."""
    import tempfile

    data = _encode(_rgb(), "PNG")
    with tempfile.NamedTemporaryFile(dir=tmp_path, suffix=".png") as f:
        f.write(data)
        f.seek(0)
        assert load_image(f).size == (40, 30)
    assert load_image(bytearray(data)).size == (40, 30)
    assert load_image(memoryview(data)).size == (40, 30)
