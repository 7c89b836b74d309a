"""Conversations + images -> a left-padded `VLBatch`, with the prompt formats of DeepSeek-VL and -VL2.

A conversation is a list of `{"role": ..., "content": ...}` messages; roles may be written
"user"/"assistant"/"system" or as the model's own names ("User", "<|User|>", ...). Images are given
separately, in the order their tags appear. Special token ids are looked up from the tokenizer by
string; nothing is hard-coded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image

from .batch import VLBatch
from .image_io import DEFAULT_MAX_PIXELS, ImageInput, load_image
from .image_processing import VL2ImageProcessor, VLImageProcessor

VL1_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
EOS_TEXT = "<｜end▁of▁sentence｜>"
ROLE_ALIASES = {
    "user": "user",
    "<|user|>": "user",
    "assistant": "assistant",
    "<|assistant|>": "assistant",
    "system": "system",
}


class ImageTagMismatchError(ValueError):
    """The number of image tags in the conversation differs from the number of images."""


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


def normalize_conversation(conversation: list[dict]) -> list[Message]:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("a conversation is a non-empty list of {'role', 'content'} messages")
    out = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content", ""), str):
            raise ValueError(f"message {i} must be a dict with a 'role' and a string 'content'")
        role = ROLE_ALIASES.get(str(msg["role"]).lower())
        if role is None:
            raise ValueError(f"message {i} has unknown role {msg['role']!r}")
        if role == "system" and i != 0:
            raise ValueError("a system message may only come first")
        out.append(Message(role, msg.get("content", "")))
    return out


def align_image_tags(messages: list[Message], n_images: int, tag: str, policy: str) -> list[Message]:
    """Check (policy "error") or repair (policy "fix") the tag count against the image count.

    "fix" follows the reference web demo: missing tags are prepended, one per line, to the last user
    message; surplus tags are removed from the end of the conversation backwards.
    """
    n_tags = sum(m.content.count(tag) for m in messages)
    if n_tags == n_images:
        return messages
    if policy == "error":
        raise ImageTagMismatchError(f"the conversation has {n_tags} {tag} tags but {n_images} images were given")
    if policy != "fix":
        raise ValueError(f"tag policy must be 'error' or 'fix', got {policy!r}")
    messages = [Message(m.role, m.content) for m in messages]
    if n_tags < n_images:
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if last_user is None:
            raise ImageTagMismatchError("images were given but the conversation has no user message")
        missing = n_images - n_tags
        messages[last_user].content = "\n".join([tag] * missing) + "\n" + messages[last_user].content
        return messages
    surplus = n_tags - n_images
    for m in reversed(messages):
        while surplus and tag in m.content:
            head, _, tail = m.content.rpartition(tag)
            m.content = head + tail
            surplus -= 1
    return messages


def token_id(tokenizer, token: str) -> int:
    """Id of a special token, by string; a clear error when the tokenizer lacks it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return ids[0]


def _is_batch(conversation) -> bool:
    return isinstance(conversation, list) and bool(conversation) and isinstance(conversation[0], list)


class _Processor(ABC):
    """Shared batching: per-sample tokenisation is left to the VL1 / VL2 subclasses."""

    image_tag: str

    @abstractmethod
    def process_one(self, messages: list[Message], images: list[Image.Image]) -> dict:
        """One conversation -> {"ids", "image_mask", "pixels", ...} for `collate`."""

    @abstractmethod
    def collate(self, samples: list[dict]) -> VLBatch:
        """Samples -> one left-padded batch."""

    def __init__(self, tokenizer, max_pixels: int = DEFAULT_MAX_PIXELS, tag_policy: str = "error"):
        self.tokenizer = tokenizer
        self.max_pixels = max_pixels
        self.tag_policy = tag_policy
        self.image_token_id = token_id(tokenizer, self.image_tag)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def load_images(self, images: list[ImageInput] | None) -> list[Image.Image]:
        return [load_image(img, max_pixels=self.max_pixels) for img in images or []]

    def __call__(self, conversation: list, images: list | None = None) -> VLBatch:
        """One conversation with its images, or a list of conversations with a list of image lists."""
        if _is_batch(conversation):
            images = images if images is not None else [None] * len(conversation)
            if len(images) != len(conversation):
                raise ValueError(f"{len(conversation)} conversations but {len(images)} image lists")
        else:
            conversation, images = [conversation], [images]
        samples = []
        for conv, imgs in zip(conversation, images):
            messages = normalize_conversation(conv)
            pil = self.load_images(imgs)
            messages = align_image_tags(messages, len(pil), self.image_tag, self.tag_policy)
            samples.append(self.process_one(messages, pil))
        return self.collate(samples)

    def left_pad(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = max(len(s["ids"]) for s in samples)
        ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(samples), length, dtype=torch.long)
        seq_mask = torch.zeros(len(samples), length, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s["ids"])
            ids[i, length - n :] = torch.tensor(s["ids"], dtype=torch.long)
            attn[i, length - n :] = 1
            seq_mask[i, length - n :] = torch.tensor(s["image_mask"], dtype=torch.bool)
        return ids, attn, seq_mask

    @staticmethod
    def stack_padded(tensors: list[torch.Tensor], min_len: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Stack (n_i, *shape) tensors into (B, max(n_i, min_len), *shape), zero-filled."""
        n = max([t.shape[0] for t in tensors] + [min_len])
        out = torch.zeros(len(tensors), n, *shape)
        for i, t in enumerate(tensors):
            out[i, : t.shape[0]] = t
        return out


class VLChatProcessor(_Processor):
    """DeepSeek-VL: 'User: ...\\n\\nAssistant: ...' prompt; each tag becomes 576 image tokens."""

    image_tag = "<image_placeholder>"

    def __init__(
        self,
        tokenizer,
        image_processor: VLImageProcessor,
        num_image_tokens: int = 576,
        system_prompt: str = VL1_SYSTEM_PROMPT,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt

    def format(self, messages: list[Message]) -> str:
        """The SFT string; a trailing user turn gets an open 'Assistant:' for generation."""
        system = self.system_prompt
        if messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        text = system + "\n\n" if system else ""
        for m in messages:
            if m.role == "user":
                text += f"User: {m.content}\n\n"
            elif m.content:
                text += f"Assistant: {m.content}{EOS_TEXT}"
            else:
                text += "Assistant:"
        if messages and messages[-1].role == "user":
            text += "Assistant:"
        return text.strip()

    def process_one(self, messages: list[Message], images: list[Image.Image]) -> dict:
        ids = ([self.bos_id] if self.bos_id is not None else []) + self.encode(self.format(messages))
        expanded: list[int] = []
        for t in ids:
            expanded.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        mask = [t == self.image_token_id for t in expanded]
        return {"ids": expanded, "image_mask": mask, "pixels": self.image_processor(images)}

    def collate(self, samples: list[dict]) -> VLBatch:
        ids, attn, seq_mask = self.left_pad(samples)
        size = self.image_processor.image_size
        pixels = self.stack_padded([s["pixels"] for s in samples], 1, (3, size, size))
        emb_mask = torch.zeros(len(samples), pixels.shape[1], self.num_image_tokens, dtype=torch.bool)
        for i, s in enumerate(samples):
            emb_mask[i, : s["pixels"].shape[0]] = True
        return VLBatch(ids, attn, seq_mask, pixels, images_emb_mask=emb_mask)


class VL2ChatProcessor(_Processor):
    """DeepSeek-VL2: per-message tokenisation (`format_messages_v2`) with tiled image token runs."""

    image_tag = "<image>"

    def __init__(self, tokenizer, image_processor: VL2ImageProcessor, system_prompt: str = "", **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.image_processor = image_processor
        self.system_prompt = system_prompt

    def tokenize_with_images(self, text: str, images: list[Image.Image], n_in_request: int):
        """Text segments split on `<image>`, each tag replaced by that image's token run."""
        segments = text.split(self.image_tag)
        ids, mask, views, grids = [], [], [], []
        for i, segment in enumerate(segments):
            seg_ids = self.encode(segment)
            ids += seg_ids
            mask += [False] * len(seg_ids)
            if i < len(segments) - 1:
                pixels, grid = self.image_processor(images[i], n_in_request)
                n = self.image_processor.token_count(grid)
                ids += [self.image_token_id] * n
                mask += [True] * n
                views.append(pixels)
                grids.append(grid)
        return ids, mask, views, grids

    def check_no_image_tag(self, message: Message) -> None:
        """Images belong to user turns: elsewhere the tag would be encoded as text and its image dropped.

        The reference asserts this for assistant turns; a system message is held to the same rule.
        """
        if self.image_tag in message.content:
            raise ImageTagMismatchError(
                f"the {message.role} message cannot contain {self.image_tag}: images belong to user turns"
            )

    def process_one(self, messages: list[Message], images: list[Image.Image]) -> dict:
        ids = [self.bos_id] if self.bos_id is not None else []
        mask = [False] * len(ids)
        views, grids, cursor = [], [], 0
        # The reference encodes a system *message* on its own; the template's system prompt (used only
        # when there is no system message) is glued to the first user turn with the "\n\n" separator.
        template_system = self.system_prompt
        if messages[0].role == "system":
            self.check_no_image_tag(messages[0])
            ids += self.encode(messages[0].content.strip())
            mask += [False] * (len(ids) - len(mask))
            template_system, messages = "", messages[1:]
        for idx, m in enumerate(messages):
            if m.role == "user":
                text = f"<|User|>: {m.content.strip()}\n\n<|Assistant|>:"
                if idx == 0 and template_system:
                    text = f"{template_system}\n\n{text}"
                n_tags = text.count(self.image_tag)
                part = self.tokenize_with_images(text, images[cursor : cursor + n_tags], len(images))
                cursor += n_tags
                ids += part[0]
                mask += part[1]
                views += part[2]
                grids += part[3]
            elif m.content.strip() or idx < len(messages) - 1:
                self.check_no_image_tag(m)
                seg = self.encode(m.content.strip()) + [self.eos_id]
                ids += seg
                mask += [False] * len(seg)
        if ids and ids[-1] == self.eos_id:
            ids, mask = ids[:-1], mask[:-1]  # inference mode: the prompt ends open for the model
        pixels = (
            torch.cat(views)
            if views
            else torch.zeros(0, 3, self.image_processor.tile_size, self.image_processor.tile_size)
        )
        return {"ids": ids, "image_mask": mask, "pixels": pixels, "grids": grids}

    def collate(self, samples: list[dict]) -> VLBatch:
        ids, attn, seq_mask = self.left_pad(samples)
        size = self.image_processor.tile_size
        pixels = self.stack_padded([s["pixels"] for s in samples], 1, (3, size, size))
        n_images = max([len(s["grids"]) for s in samples] + [1])
        crops = torch.zeros(len(samples), n_images, 2, dtype=torch.long)
        for i, s in enumerate(samples):
            if s["grids"]:
                crops[i, : len(s["grids"])] = torch.tensor(s["grids"], dtype=torch.long)
        return VLBatch(ids, attn, seq_mask, pixels, images_spatial_crop=crops)
