"""Grounding output -> pixel boxes; malformed boxes are reported, never raised, never eval'ed."""

import pytest

from vl import parse_grounding


def test_reference_example():
    text = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[582, 271, 942, 888]]<|/det|>"
    out = parse_grounding(text, 999, 999)
    assert out == [("The giraffe at the back.", [(582, 271, 942, 888)])]
    assert out.malformed == []


def test_scaling_to_pixels_and_multiple_boxes():
    text = (
        "a <|ref|>dog<|/ref|><|det|>[[0, 0, 999, 999], [100, 200, 300, 400]]<|/det|>"
        " and <|ref|>cat<|/ref|><|det|>[[999,0,999,10]]<|/det|>"
    )
    out = parse_grounding(text, 1024, 768)
    assert out == [
        (
            "dog",
            [
                (0, 0, 1024, 768),
                (int(100 / 999 * 1024), int(200 / 999 * 768), int(300 / 999 * 1024), int(400 / 999 * 768)),
            ],
        ),
        ("cat", [(1024, 0, 1024, int(10 / 999 * 768))]),
    ]


def test_det_without_ref_gets_empty_label():
    assert parse_grounding("<|det|>[[1, 2, 3, 4]]<|/det|>", 999, 999) == [("", [(1, 2, 3, 4)])]


@pytest.mark.parametrize(
    "det,reason",
    [
        ("[[1, 2, 3]]", "four integers"),
        ("[[1, 2, 3, 4, 5]]", "four integers"),
        ("[[1.5, 2, 3, 4]]", "four integers"),
        ("[[1, 2, 3, 1000]]", "outside 0..999"),
        ("[[-1, 2, 3, 4]]", "outside 0..999"),
        ("[[30, 2, 3, 4]]", "x1 > x2"),
        ("[[__import__('os').system('echo pwned'), 1, 2, 3]]", "four integers"),
        ("nonsense", "no box"),
    ],
)
def test_malformed_boxes_are_reported(det, reason):
    out = parse_grounding(f"<|ref|>thing<|/ref|><|det|>{det}<|/det|>", 100, 100)
    assert out == []
    assert len(out.malformed) >= 1 and reason in " ".join(out.malformed)


def test_good_boxes_survive_next_to_bad_ones():
    out = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7]]<|/det|>", 999, 999)
    assert out == [("x", [(1, 2, 3, 4)])] and len(out.malformed) == 1


def test_unclosed_det_is_reported_but_parsed():
    out = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4]]", 999, 999)
    assert out == [("x", [(1, 2, 3, 4)])]
    assert any("unclosed" in m for m in out.malformed)


def test_a_ref_without_its_own_det_does_not_swallow_the_next_label():
    text = "The <|ref|>cat<|/ref|> sits next to <|ref|>the dog<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    out = parse_grounding(text, 999, 999)
    assert out == [("the dog", [(1, 2, 3, 4)])]
    assert out.malformed == ["no <|det|> for <|ref|> 'cat'"]


def test_an_unclosed_det_does_not_steal_the_next_objects_boxes():
    text = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]] and <|ref|>dog<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>"
    out = parse_grounding(text, 999, 999)
    assert out == [("cat", [(1, 2, 3, 4)]), ("dog", [(5, 6, 7, 8)])]
    assert out.malformed == ["unclosed <|det|> for 'cat'"]


def test_unclosed_refs_and_stray_closing_tags_are_reported():
    out = parse_grounding("<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|> stray <|/ref|><|/det|>", 999, 999)
    assert out == [("", [(1, 2, 3, 4)])]
    assert out.malformed == ["unclosed <|ref|> 'cat'", "unpaired <|/ref|>", "unpaired <|/det|>"]


def test_plain_text_and_bad_sizes():
    assert parse_grounding("no grounding here", 10, 10) == []
    with pytest.raises(ValueError):
        parse_grounding("", 0, 10)
