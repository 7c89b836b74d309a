"""VL2 tiling (vl.md §2.3-2.4), token layout, projector unfold order, and VL1 resize/pad (§1.2)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vl
from vl.image_processing import VL2ImageProcessor, VLImageProcessor, to_tensor
from vl.modeling_vl2 import tile_layout
from vl.projector import DownsampleMlpProjector

GOLDEN = [  # (W, H), best (w, h), tiles (nw, nh), n_tokens  -- vl.md §2.4
    ((100, 100), (384, 384), (1, 1), 421),
    ((384, 384), (384, 384), (1, 1), 421),
    ((385, 385), (768, 768), (2, 2), 1023),
    ((640, 480), (768, 768), (2, 2), 1023),
    ((480, 640), (768, 768), (2, 2), 1023),
    ((800, 600), (1152, 768), (3, 2), 1415),
    ((1024, 1024), (1152, 1152), (3, 3), 2017),
    ((2000, 2000), (1152, 1152), (3, 3), 2017),
    ((4000, 3000), (1152, 1152), (3, 3), 2017),
    ((1280, 720), (1536, 768), (4, 2), 1807),
    ((1920, 1080), (1536, 768), (4, 2), 1807),
    ((1080, 1920), (768, 1536), (2, 4), 1835),
    ((3000, 500), (2304, 384), (6, 1), 1401),
    ((500, 3000), (384, 2304), (1, 6), 1471),
    ((1, 1000), (384, 1152), (1, 3), 841),
]


@pytest.mark.parametrize("size,best,tiles,n_tokens", GOLDEN)
def test_golden_table(size, best, tiles, n_tokens):
    assert vl.select_best_resolution(size, vl.CANDIDATE_RESOLUTIONS) == best
    proc = VL2ImageProcessor()
    assert proc.grid_for(size, 1) == tiles
    assert proc.grid_for(size, 2) == tiles
    assert vl.image_token_count(size) == n_tokens
    nw, nh = tiles
    assert n_tokens == 210 + 1 + 14 * nh * (14 * nw + 1)


@pytest.mark.parametrize("size", [s for s, *_ in GOLDEN])
def test_more_than_two_images_disables_tiling(size):
    assert VL2ImageProcessor().grid_for(size, 3) == (1, 1)
    assert vl.image_token_count(size, n_images_in_request=3) == 421
    assert vl.image_token_count(size, n_images_in_request=7) == 421


def test_tie_breaking_follows_candidate_order():
    # A 384x384 image fits (384,384) and (768,768) equally well in kept pixels; (384,384) wastes less.
    assert vl.select_best_resolution((384, 384), [(768, 768), (384, 384)]) == (384, 384)
    # Two candidates with identical kept pixels and waste: the first listed wins.
    assert vl.select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)
    assert vl.select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)


def test_select_best_resolution_rejects_bad_sizes():
    with pytest.raises(ValueError):
        vl.select_best_resolution((0, 10))
    with pytest.raises(ValueError):
        vl.select_best_resolution((10, 10), [])


def _noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(800, 600), (500, 3000), (100, 100)])
def test_tiles_equal_imageops_pad_and_crop(size):
    img = _noise_image(*size)
    proc = VL2ImageProcessor()
    views, grid = proc(img, 1)
    nw, nh = grid
    assert views.shape == (1 + nw * nh, 3, 384, 384)

    def norm(pil):
        return (to_tensor(pil) - 0.5) / 0.5

    assert torch.equal(views[0], norm(ImageOps.pad(img, (384, 384), color=(127, 127, 127))))
    canvas = ImageOps.pad(img, (nw * 384, nh * 384), color=(127, 127, 127))
    k = 1
    for y in range(nh):  # row-major: outer loop over rows
        for x in range(nw):
            tile = canvas.crop((x * 384, y * 384, (x + 1) * 384, (y + 1) * 384))
            assert torch.equal(views[k], norm(tile)), (y, x)
            k += 1


def test_pad_colour_is_127():
    views, grid = VL2ImageProcessor()(_noise_image(800, 200), 1)  # wide: padding above and below
    assert grid == (3, 1)
    corner = views[0, :, 0, 0]
    assert torch.allclose(corner, torch.full((3,), (127 / 255 - 0.5) / 0.5))


@pytest.mark.parametrize(
    "size,grid",
    [((1600, 2), (5, 1)), ((768, 1), (2, 1)), ((2, 1600), (1, 5)), ((5000, 1), (1, 1)), ((1, 5000), (1, 1))],
)
def test_extreme_aspect_ratios_keep_a_one_pixel_short_side(size, grid):
    # ImageOps.pad would round the short side to 0 px and raise; the image becomes a 1-px line instead.
    red = (200, 30, 30)
    views, got = VL2ImageProcessor()(Image.new("RGB", size, red), 1)
    assert got == grid and views.shape == (1 + grid[0] * grid[1], 3, 384, 384)
    is_red = (views[0] == ((torch.tensor(red) / 255 - 0.5) / 0.5).view(3, 1, 1)).all(dim=0)
    line = is_red[192] if size[0] > size[1] else is_red[:, 192]
    assert line.all() and int(is_red.sum()) == 384  # one centred full-length line, pad colour elsewhere
    many, _ = VL2ImageProcessor()(Image.new("RGB", size, red), 3)  # untiled: one global view, one tile
    assert many.shape == (2, 3, 384, 384)


def test_token_layout_with_identifiable_features():
    # Global features carry 1000 + position, locals 2000 + 100*tile + position, tags are -1 / -2.
    g, dim, grid = 14, 3, (2, 1)
    glob = (1000 + torch.arange(g * g)).float()[:, None].expand(-1, dim)
    local = torch.stack([(2000 + 100 * t + torch.arange(g * g)).float() for t in range(2)])[..., None].expand(
        -1, -1, dim
    )
    newline, sep = torch.full((dim,), -1.0), torch.full((dim,), -2.0)
    seq = tile_layout(glob, local, grid, newline, sep, "head")[:, 0]
    assert seq.shape[0] == 617 == vl.image_token_count((768, 384))
    newlines = (seq == -1).nonzero().squeeze(1).tolist()
    assert newlines[:14] == [14 + 15 * r for r in range(14)]  # every 15th global position
    assert (seq == -2).nonzero().squeeze(1).tolist() == [210]
    assert newlines[14:] == [210 + 29 * (r + 1) for r in range(14)]  # local rows of 14*nw + 1
    assert len(newlines) == 28
    # First local row: tile 0 columns 0..13, then tile 1 columns 0..13.
    assert seq[211:225].tolist() == [2000 + c for c in range(14)]
    assert seq[225:239].tolist() == [2100 + c for c in range(14)]
    # Second local row starts with tile 0, row 1.
    assert seq[240].item() == 2000 + 14
    tail = tile_layout(glob, local, grid, newline, sep, "tail")[:, 0]
    assert tail[406].item() == -2 and tail[-1].item() == -1 and tail[407].item() == 1000


def test_projector_unfold_is_channel_major_with_feature_zero_pad():
    proj = DownsampleMlpProjector(input_dim=2, n_embed=4)
    side, c = 27, 2
    # feature value encodes (row, col, channel)
    r, col, ch = torch.meshgrid(torch.arange(side), torch.arange(side), torch.arange(c), indexing="ij")
    x = (r * 10000 + col * 10 + ch + 1).float().reshape(1, side * side, c)
    out = proj.unfold(x)
    assert out.shape == (1, 196, c * 4)
    token = out[0, 14 * 1 + 2]  # output row 1, col 2 -> input rows 2..3, cols 4..5
    expected = [
        20000 + 40 + 1,
        20000 + 50 + 1,
        30000 + 40 + 1,
        30000 + 50 + 1,  # channel 0: (dy, dx)
        20000 + 40 + 2,
        20000 + 50 + 2,
        30000 + 40 + 2,
        30000 + 50 + 2,
    ]
    assert token.tolist() == expected
    last = out[0, -1]  # bottom-right token: only (26, 26) is real, the rest is the zero pad
    assert last.tolist() == [260260 + 1, 0, 0, 0, 260260 + 2, 0, 0, 0]


VL1_GOLDEN = [  # (W, H) -> resized (w, h), paste offset (x, y) for the 7B processor (vl.md §1.2)
    ((640, 480), (1024, 768), (0, 128)),
    ((480, 640), (768, 1024), (128, 0)),
    ((1000, 1), (1024, 14), (0, 505)),
    ((333, 777), (438, 1024), (293, 0)),
]


@pytest.mark.parametrize("size,resized,offset", VL1_GOLDEN)
def test_vl1_resize_and_pad(size, resized, offset):
    img = _noise_image(*size)
    proc = VLImageProcessor(image_size=1024, background=(122, 116, 104))
    out = proc.resize_and_pad(img)
    assert out.size == (1024, 1024)
    expected = img.resize(resized, Image.Resampling.BICUBIC)
    x, y = offset
    assert np.array_equal(np.asarray(out)[y : y + resized[1], x : x + resized[0]], np.asarray(expected))
    assert out.getpixel((0, 0)) == (122, 116, 104)  # every golden case pads the top-left corner
    pixels = proc([img])
    assert pixels.shape == (1, 3, 1024, 1024) and 0 <= pixels.min() and pixels.max() <= 1
