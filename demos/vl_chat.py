"""Logic of the "Chat about images" tab, kept free of Gradio so it can be tested without a browser.

A `ChatSession` holds the turns of one browser session; a `ChatEngine` holds the model and answers
turns through `vl.chat`, streaming. Behaviour follows DeepSeek's own web demos (research notes
vl.md §1.8, §2.13): image tags are added to or removed from a message to match its images, the
oldest turn pairs are dropped until the prompt fits the history budget, temperature 0 means greedy
decoding, and boxes named in a reply are drawn on the last image. Unlike those demos, grounding
output is parsed without `eval`, a bad upload is reported in the chat instead of raising, and
regenerating never calls the generator with wrong arguments.
"""

from __future__ import annotations

import html
import re
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import vl
from vl.processing import Message, align_image_tags

from .overlay import grounding_overlay

# Images one message may carry; checked before decoding. Eight global views already cost about
# 3,400 tokens on DeepSeek-VL2, most of the default history budget.
MAX_IMAGES_PER_MESSAGE = 8


@dataclass
class GenerationParams:
    """The sliders of the Parameters panel (defaults: DeepSeek-VL2's web demo, shorter replies)."""

    temperature: float = 0.1
    top_p: float = 0.9
    max_new_tokens: int = 512
    repetition_penalty: float = 1.1
    max_history_tokens: int = 4096

    def gen_kwargs(self) -> dict:
        """`shared_moe` generation arguments; temperature 0 selects greedy decoding."""
        kwargs: dict = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
        return kwargs


@dataclass
class Turn:
    """One user message, its images and the reply to it."""

    text: str  # as typed, for display
    prompt: str  # as the model sees it: image tags matched to the images
    images: list[Image.Image] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)  # the uploads, for display
    reply: str = ""
    overlay_path: str | None = None
    error: str | None = None  # the turn never reached the model (e.g. an unreadable image)
    awaiting: bool = True  # added or regenerated, not yet handed to the model


@dataclass
class ChatSession:
    """What one browser session has said; `notice` is the latest status line for the UI."""

    turns: list[Turn] = field(default_factory=list)
    notice: str = ""


class ChatEngine:
    """Answers chat turns with one loaded DeepSeek-VL/VL2 model; overlays go to a private temp dir."""

    def __init__(self, model: vl.batch.VisionLanguageModel, processor, label: str):
        self.model = model
        self.processor = processor
        self.label = label
        self._overlay_dir = tempfile.TemporaryDirectory(prefix="demos-grounding-")

    @property
    def image_tag(self) -> str:
        return self.processor.image_tag

    def close(self) -> None:
        """Delete the overlay images written so far."""
        self._overlay_dir.cleanup()

    # --- inputs --------------------------------------------------------------------------------
    def load_images(self, paths: Sequence[str]) -> tuple[list[Image.Image], str | None]:
        """Decoded RGB images, or ([], message naming the first file that could not be read).

        More than MAX_IMAGES_PER_MESSAGE files are refused before any is decoded, so a large batch of
        uploads cannot fill memory.
        """
        if len(paths) > MAX_IMAGES_PER_MESSAGE:
            return [], f"Too many images: {len(paths)} attached, at most {MAX_IMAGES_PER_MESSAGE} per message."
        images = []
        for path in paths:
            try:
                images.append(vl.load_image(path, max_pixels=self.processor.max_pixels))
            except vl.ImageLoadError as e:
                return [], f"Could not read image {Path(path).name}: {e}"
        return images, None

    def preview(self, paths: Sequence[str] | None) -> tuple[list[str], str]:
        """(readable uploads for the gallery, warning naming the unreadable ones or "")."""
        paths = list(paths or [])
        if len(paths) > MAX_IMAGES_PER_MESSAGE:  # say so before Send, and decode none of them
            return [], self.load_images(paths)[1]
        good, bad = [], []
        for path in paths:
            try:
                vl.load_image(path, max_pixels=self.processor.max_pixels)
                good.append(path)
            except vl.ImageLoadError as e:
                bad.append(f"{Path(path).name}: {e}")
        return good, ("Cannot use " + "; ".join(bad)) if bad else ""

    def fix_tags(self, text: str, n_images: int) -> str:
        """The reference demo's rule: prepend missing image tags, drop surplus ones."""
        return align_image_tags([Message("user", text)], n_images, self.image_tag, "fix")[0].content

    # --- turns ---------------------------------------------------------------------------------
    def add_turn(self, session: ChatSession, text: str, paths: Sequence[str] | None) -> bool:
        """Append the user's message; False (with a notice) when there is nothing to answer."""
        text, paths = (text or "").strip(), list(paths or [])
        if not text and not paths:
            session.notice = "Type a message or attach an image first."
            return False
        images, error = self.load_images(paths)
        prompt = "" if error else self.fix_tags(text, len(images))
        session.turns.append(Turn(text, prompt, images, paths, error=error, awaiting=error is None))
        session.notice = error or ""
        return error is None

    def answer(self, session: ChatSession, params: GenerationParams) -> Iterator[ChatSession]:
        """Stream the reply to the last turn if it awaits one; yields the session after each piece.

        A turn whose prompt the processor rejects becomes an error turn, like an unreadable upload, so
        it never enters a later prompt and the conversation goes on.
        """
        if not session.turns or not session.turns[-1].awaiting:
            return
        current = session.turns[-1]
        current.awaiting = False
        turns = [t for t in session.turns if t.error is None]
        try:
            kept, n_tokens = self.fit_history(turns, params.max_history_tokens)
        except ValueError as e:
            current.error = session.notice = f"Could not prepare this message for the model: {e}"
            yield session
            return
        if n_tokens > params.max_history_tokens:  # the newest message alone is over the budget
            current.error = session.notice = (
                f"This message needs {n_tokens} prompt tokens, more than max history tokens "
                f"({params.max_history_tokens}): attach fewer images, shorten it, or raise the budget."
            )
            yield session
            return
        dropped = len(turns) - len(kept)
        session.notice = f"Prompt: {n_tokens} tokens."
        if dropped:
            session.notice += (
                f" Dropped the {dropped} oldest turn(s) to fit max history tokens ({params.max_history_tokens})."
            )
        conversation, images = self.conversation(kept)
        yield session
        for piece in vl.chat(self.model, self.processor, conversation, images, stream=True, **params.gen_kwargs()):
            current.reply += piece
            yield session
        if images:
            self._draw_overlay(session, current, images[-1])
        yield session

    def send(self, session: ChatSession, text: str, paths: Sequence[str] | None, params: GenerationParams):
        """add_turn + answer, as one stream."""
        if self.add_turn(session, text, paths):
            yield from self.answer(session, params)
        else:
            yield session

    def regenerate(self, session: ChatSession, params: GenerationParams) -> Iterator[ChatSession]:
        """Answer the last turn again (a new sample when temperature > 0)."""
        if not session.turns or session.turns[-1].error is not None:
            session.notice = "Nothing to regenerate."
            yield session
            return
        last = session.turns[-1]
        last.reply, last.overlay_path, last.awaiting = "", None, True
        yield from self.answer(session, params)

    @staticmethod
    def remove_last(session: ChatSession) -> ChatSession:
        """Drop the last turn (message and reply)."""
        if session.turns:
            session.turns.pop()
            session.notice = "Removed the last turn."
        else:
            session.notice = "The conversation is empty."
        return session

    @staticmethod
    def new_conversation() -> ChatSession:
        return ChatSession()

    # --- prompt --------------------------------------------------------------------------------
    def conversation(self, turns: list[Turn]) -> tuple[list[dict], list[Image.Image]]:
        """Messages and images for `vl.chat`; the last turn is left open for the model."""
        messages, images = [], []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn.prompt})
            images += turn.images
            if i < len(turns) - 1:
                # A reply that happens to contain an image tag would be read as an image slot.
                messages.append({"role": "assistant", "content": turn.reply.replace(self.image_tag, "")})
        return messages, images

    def prompt_tokens(self, turns: list[Turn]) -> int:
        """Prompt length in tokens, image tokens included (what the context window holds)."""
        conversation, images = self.conversation(turns)
        return int(self.processor(conversation, images).input_ids.shape[1])

    def fit_history(self, turns: list[Turn], max_tokens: int) -> tuple[list[Turn], int]:
        """Drop the oldest turn pairs until the prompt fits `max_tokens`; the last turn always stays.

        Counts are recomputed after each drop because VL2 tiles images only when the request has
        at most two of them, so removing a turn can change what the remaining images cost.
        """
        start = 0
        while True:
            n = self.prompt_tokens(turns[start:])
            if n <= max_tokens or start == len(turns) - 1:
                return turns[start:], n
            start += 1

    def _draw_overlay(self, session: ChatSession, turn: Turn, image: Image.Image) -> None:
        overlay, groundings = grounding_overlay(image, turn.reply)
        if overlay is not None:
            path = Path(self._overlay_dir.name) / f"grounding-{uuid.uuid4().hex}.png"
            overlay.save(path)
            turn.overlay_path = str(path)
            n = sum(len(boxes) for _, boxes in groundings)
            session.notice += f" Drew {n} box(es) on the last image."
        if groundings.malformed:
            session.notice += " Skipped malformed grounding: " + "; ".join(groundings.malformed)


# --- display ---------------------------------------------------------------------------------------
_GROUNDING_MARKUP = {
    "<|ref|>": "**",
    "<|/ref|>": "**",
    "<|det|>": " ",
    "<|/det|>": "",
    "<|grounding|>": "",
}
_GROUNDING_TAG = re.compile("(" + "|".join(map(re.escape, _GROUNDING_MARKUP)) + ")")
# Every ASCII punctuation character but the `&` and `;` of html.escape's entities.
_MARKDOWN_PUNCTUATION = re.compile(r"[!-%'-/:<-@\[-`{-~]")


def escape_markdown(text: str) -> str:
    """Text that the Chatbot's Markdown shows verbatim: no HTML, image, link, autolink or LaTeX can form.

    HTML is escaped to entities, and every other ASCII punctuation character gets a backslash, which
    CommonMark allows for any of them, so a reply cannot make the browser fetch a remote URL.
    """
    return _MARKDOWN_PUNCTUATION.sub(r"\\\g<0>", html.escape(text, quote=False))


def render_reply(reply: str) -> str:
    """Markdown for a reply: labels in bold followed by their boxes; everything the model wrote escaped."""
    parts = _GROUNDING_TAG.split(reply)  # text at even indices, grounding tags at odd ones
    return "".join(_GROUNDING_MARKUP[p] if i % 2 else escape_markdown(p) for i, p in enumerate(parts))


def chat_messages(session: ChatSession) -> list[dict]:
    """The session in Gradio's messages format: text plus uploaded images and grounding overlays."""
    out: list[dict] = []
    for turn in session.turns:
        if turn.error is not None:  # never hand an unreadable file to the browser
            names = ", ".join(Path(p).name for p in turn.image_paths)
            text = f"{turn.text}\n\n(attached: {names})".strip()
            out.append({"role": "user", "content": html.escape(text, quote=False)})
            out.append({"role": "assistant", "content": f"⚠️ {html.escape(turn.error, quote=False)}"})
            continue
        user: list = [html.escape(turn.text, quote=False)] if turn.text else []
        out.append({"role": "user", "content": user + [{"path": p} for p in turn.image_paths]})
        reply: list = [render_reply(turn.reply)] if turn.reply else []
        if turn.overlay_path:
            reply.append({"path": turn.overlay_path})
        if reply:
            out.append({"role": "assistant", "content": reply})
    return out


def latest_overlay(session: ChatSession) -> str | None:
    """The side panel's image: the overlay of the latest reply only, so a reply without boxes clears it."""
    return session.turns[-1].overlay_path if session.turns else None
