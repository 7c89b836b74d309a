"""The chat tab's handlers on the random tiny VL2 model: streaming, turn controls, tags, bad images,
grounding overlay, history truncation."""

from __future__ import annotations

import html
import string
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vl
from demos.overlay import grounding_overlay
from demos.vl_chat import (
    MAX_IMAGES_PER_MESSAGE,
    ChatSession,
    GenerationParams,
    chat_messages,
    latest_overlay,
    render_reply,
)

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=6, repetition_penalty=1.0)
GROUNDED = "<|ref|>x<|/ref|><|det|>[[0,0,499,499]]<|/det|>"


def test_send_streams_a_reply_about_an_uploaded_image(engine, write_image):
    session = ChatSession()
    seen = [s.turns[-1].reply for s in engine.send(session, "Describe the image.", [write_image()], GREEDY)]
    turn = session.turns[-1]
    assert turn.prompt == "<image>\nDescribe the image."  # the missing tag was added
    assert turn.reply and len(seen) >= 3
    assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1))  # grows piece by piece
    conversation = [{"role": "user", "content": turn.prompt}]
    expected = vl.chat(
        engine.model, engine.processor, conversation, [turn.images[0]], stream=False, **GREEDY.gen_kwargs()
    )
    assert turn.reply == expected
    assert session.notice.startswith("Prompt: ")
    user, reply = chat_messages(session)
    assert user["role"] == "user" and user["content"][1] == {"path": turn.image_paths[0]}
    assert reply["role"] == "assistant"


def test_regenerate_remove_last_and_new_conversation(engine, write_image):
    session = ChatSession()
    list(engine.send(session, "What is this?", [write_image()], GREEDY))
    list(engine.send(session, "And the colour?", [], GREEDY))
    first = session.turns[-1].reply
    list(engine.regenerate(session, GREEDY))
    assert len(session.turns) == 2 and session.turns[-1].reply == first  # greedy: the same reply again
    sampled = GenerationParams(temperature=0.9, top_p=0.9, max_new_tokens=6)
    list(engine.regenerate(session, sampled))
    assert session.turns[-1].reply and len(session.turns) == 2
    engine.remove_last(session)
    assert [t.text for t in session.turns] == ["What is this?"]
    engine.remove_last(session)
    engine.remove_last(session)
    assert session.turns == [] and session.notice == "The conversation is empty."
    assert list(engine.regenerate(session, GREEDY))[-1].notice == "Nothing to regenerate."
    assert engine.new_conversation().turns == []


def test_image_tags_are_matched_to_the_images(engine, write_image):
    session = ChatSession()
    two = [write_image("a.png", seed=1), write_image("b.png", seed=2)]
    assert engine.add_turn(session, "Compare them.", two)
    assert session.turns[-1].prompt == "<image>\n<image>\nCompare them."
    assert engine.add_turn(session, "<image> no picture attached", [])
    assert "<image>" not in session.turns[-1].prompt
    assert engine.add_turn(session, "", [write_image()])  # an image alone is a message
    assert session.turns[-1].prompt.strip() == "<image>"
    assert not engine.add_turn(session, "   ", None)
    assert len(session.turns) == 3 and "Type a message" in session.notice


def test_a_reply_containing_an_image_tag_does_not_break_the_next_turn(engine, write_image):
    session = ChatSession()
    list(engine.send(session, "Look.", [write_image()], GREEDY))
    session.turns[-1].reply = "I see <image> here"  # random weights can emit any special token
    list(engine.send(session, "Again?", [], GREEDY))
    assert session.turns[-1].reply


def test_corrupt_image_gives_a_message_in_the_chat(engine, write_image, tmp_path):
    good = write_image()
    bad = tmp_path / "broken.png"
    bad.write_bytes(Path(good).read_bytes()[:60])  # a PNG cut off inside its data
    session = ChatSession()
    assert list(engine.send(session, "What is it?", [good, str(bad)], GREEDY)) == [session]
    turn = session.turns[-1]
    assert turn.error.startswith("Could not read image broken.png") and turn.reply == ""
    assert session.notice == turn.error
    user, warning = chat_messages(session)
    assert "broken.png" in user["content"] and warning["content"].startswith("⚠️ Could not read image broken.png")
    assert list(engine.regenerate(session, GREEDY))[-1].notice == "Nothing to regenerate."
    shown, problem = engine.preview([good, str(bad)])
    assert shown == [good] and "broken.png" in problem
    list(engine.send(session, "Describe.", [good], GREEDY))  # the chat goes on
    assert session.turns[-1].reply and engine.conversation([t for t in session.turns if t.error is None])[1]


def test_an_image_the_processor_rejects_is_reported_and_the_chat_goes_on(engine, write_image, monkeypatch):
    views = engine.processor.image_processor.views

    def reject_5x5(img, grid):  # an image that decodes but that the processor cannot tile
        if img.size == (5, 5):
            raise ValueError("height and width must be > 0")
        return views(img, grid)

    monkeypatch.setattr(engine.processor.image_processor, "views", reject_5x5)
    session = ChatSession()
    list(engine.send(session, "What is it?", [write_image("odd.png", 5, 5)], GREEDY))
    turn = session.turns[-1]
    assert turn.error == session.notice == "Could not prepare this message for the model: height and width must be > 0"
    assert turn.reply == "" and not turn.awaiting
    user, warning = chat_messages(session)
    assert "odd.png" in user["content"] and warning["content"].startswith("⚠️ Could not prepare")
    assert list(engine.regenerate(session, GREEDY))[-1].notice == "Nothing to regenerate."
    list(engine.send(session, "Hello?", [], GREEDY))  # the rejected turn stays out of later prompts
    assert session.turns[-1].reply and session.turns[-1].error is None
    list(engine.regenerate(session, GREEDY))
    assert session.turns[-1].reply


def test_grounding_overlay_draws_the_box(write_image):
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    overlay, groundings = grounding_overlay(image, GROUNDED)
    assert list(groundings) == [("x", [(0, 0, 99, 49)])]
    before, after = np.asarray(image), np.asarray(overlay)
    changed = np.any(before != after, axis=2)
    assert changed[:50, :100].sum() > 100  # the outline (and label) inside the box region
    assert not changed[60:, 110:].any()  # nothing outside it
    assert grounding_overlay(image, "no boxes here") == (None, [])


def test_grounded_reply_shows_an_overlay_in_the_chat(engine, write_image, monkeypatch):
    monkeypatch.setattr(vl, "chat", lambda *args, **kwargs: iter([GROUNDED[:20], GROUNDED[20:]]))
    session = ChatSession()
    list(engine.send(session, "<|ref|>x<|/ref|>", [write_image(width=300, height=200)], GREEDY))
    path = latest_overlay(session)
    assert path and session.turns[-1].overlay_path == path
    overlay = np.asarray(Image.open(path))
    assert overlay.shape == (200, 300, 3)
    assert "Drew 1 box(es)" in session.notice
    assert chat_messages(session)[-1]["content"] == [render_reply(GROUNDED), {"path": path}]


def test_overlay_panel_shows_only_the_latest_replys_boxes(engine, write_image, monkeypatch):
    replies = iter([GROUNDED, "No boxes here.", GROUNDED, "Nor here."])
    monkeypatch.setattr(vl, "chat", lambda *args, **kwargs: iter([next(replies)]))
    session = ChatSession()
    list(engine.send(session, "Where is x?", [write_image()], GREEDY))
    assert latest_overlay(session) == session.turns[0].overlay_path is not None
    list(engine.send(session, "Thanks.", [], GREEDY))
    assert latest_overlay(session) is None  # not the first turn's boxes
    list(engine.send(session, "And now?", [], GREEDY))
    assert latest_overlay(session) == session.turns[2].overlay_path is not None
    regenerating = engine.regenerate(session, GREEDY)
    assert latest_overlay(next(regenerating)) is None  # the reply being replaced no longer counts
    list(regenerating)
    assert latest_overlay(session) is None and session.turns[2].reply == "Nor here."


def test_history_is_truncated_to_the_token_budget(engine, write_image):
    session = ChatSession()
    for i in range(3):
        list(engine.send(session, f"Picture {i}?", [write_image(f"{i}.png", seed=i)], GREEDY))
    turns = session.turns
    last_two = engine.prompt_tokens(turns[1:])
    assert engine.fit_history(turns, 10**6) == (turns, engine.prompt_tokens(turns))
    assert engine.fit_history(turns, last_two) == (turns[1:], last_two)
    assert engine.fit_history(turns, 1)[0] == turns[2:]  # the newest turn always stays

    engine.add_turn(session, "Last one?", [])
    alone = engine.prompt_tokens(session.turns[-1:])
    list(engine.answer(session, GenerationParams(temperature=0, max_new_tokens=2, max_history_tokens=alone)))
    assert "Dropped the 3 oldest turn(s)" in session.notice
    assert len(session.turns) == 4 and session.turns[-1].reply  # dropped from the prompt, not from the chat


def test_render_reply_escapes_markup_and_formats_grounding():
    assert render_reply("<b>hi</b> " + GROUNDED) == r"&lt;b&gt;hi&lt;\/b&gt; **x** \[\[0\,0\,499\,499\]\]"


def test_render_reply_shows_model_markdown_verbatim():
    # A remote image or link in a reply must reach the browser as text, never as a URL it fetches.
    MarkdownIt = pytest.importorskip("markdown_it").MarkdownIt  # a CommonMark renderer (gradio -> rich)
    assert MarkdownIt("commonmark").render(render_reply(GROUNDED)) == "<p><strong>x</strong> [[0,0,499,499]]</p>\n"
    reply = "![p](https://attacker.example/x?q=1) [click](https://x.example) www.x.example\n---\n" + string.punctuation
    rendered = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(render_reply(reply))
    assert "<img" not in rendered and "<a " not in rendered and "<h2>" not in rendered
    assert html.unescape(rendered) == f"<p>{reply}</p>\n"


@pytest.mark.parametrize("temperature, sampled", [(0.0, False), (0.3, True)])
def test_temperature_zero_is_greedy(temperature, sampled):
    kwargs = GenerationParams(temperature=temperature, top_p=0.5).gen_kwargs()
    assert kwargs.get("do_sample", False) is sampled
    assert ("top_p" in kwargs) is sampled


def test_a_message_alone_over_the_history_budget_is_refused_not_sent(engine, write_image, monkeypatch):
    session = ChatSession()
    engine.add_turn(session, "Describe.", [write_image()])
    needed = engine.prompt_tokens(session.turns)
    monkeypatch.setattr(vl, "chat", lambda *a, **k: pytest.fail("an over-budget prompt reached the model"))
    list(engine.answer(session, GenerationParams(temperature=0, max_new_tokens=2, max_history_tokens=needed - 1)))
    turn = session.turns[-1]
    assert turn.error == session.notice and f"needs {needed} prompt tokens" in turn.error and not turn.reply
    assert chat_messages(session)[-1]["content"].startswith("⚠️")
    monkeypatch.undo()
    list(engine.send(session, "Hi?", [], GREEDY))  # the refused turn never enters a later prompt
    assert session.turns[-1].reply and session.turns[-1].error is None


def test_too_many_images_in_one_message_are_refused_before_decoding(engine, write_image, monkeypatch):
    paths = [write_image(f"{i}.png", seed=i) for i in range(MAX_IMAGES_PER_MESSAGE + 1)]
    monkeypatch.setattr(vl, "load_image", lambda *a, **k: pytest.fail("decoded an image of a refused batch"))
    session = ChatSession()
    assert not engine.add_turn(session, "Describe.", paths)
    assert f"at most {MAX_IMAGES_PER_MESSAGE} per message" in session.turns[-1].error == session.notice
    gallery, warning = engine.preview(paths)
    assert gallery == [] and "Too many images" in warning
