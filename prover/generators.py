"""Proof generators: a model-free tactic portfolio, OpenAI-compatible endpoints, and a local shared_moe model."""
from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from itertools import combinations
from typing import Protocol

from .dataset import Problem
from .leantext import parse_signature
from .pinning import Candidate
from .prompts import Prompt, build_prompt, extract


class GenerationError(RuntimeError):
    """The generator could not produce text (endpoint down after retries, bad reply)."""


class Generator(Protocol):
    name: str

    def generate(self, problem: Problem, sample: int) -> Candidate: ...


def sample_seed(name: str, sample: int) -> int:
    """Stable per-(problem, sample) seed, so a resumed run regenerates exactly what it would have."""
    return int.from_bytes(hashlib.sha256(f"{name}#{sample}".encode()).digest()[:4], "big")


_NUMERIC_TYPES = ("ℝ", "ℚ", "ℤ", "ℕ", "ℂ", "Real", "Nat", "Int", "Rat")


def numeric_variables(statement: str, limit: int = 4) -> list[str]:
    """Variables of number type bound by the statement, for nlinarith square hints."""
    head = statement.split(None, 1)[1] if statement.startswith(("theorem", "lemma")) else statement
    head = head[: head.rfind(":=")] if ":=" in head else head
    try:
        sig = parse_signature(head)
    except ValueError:
        return []
    names = []
    for binder in sig.binders:
        inner = binder[1:-1]
        if ":" in inner:
            vars_, typ = inner.split(":", 1)
            if typ.strip() in _NUMERIC_TYPES:
                names += vars_.split()
    return names[:limit]


def square_hints(variables: list[str]) -> str:
    hints = [f"sq_nonneg {v}" for v in variables]
    hints += [f"sq_nonneg ({a} - {b})" for a, b in combinations(variables, 2)]
    hints += [f"sq_nonneg ({a} + {b})" for a, b in combinations(variables, 2)]
    return ", ".join(hints)


class PortfolioGenerator:
    """Deterministic tactic scripts, one per sample index (cycling): the baseline and subgoal solver."""

    name = "portfolio"
    BASE = (
        "norm_num",
        "linarith",
        "nlinarith [{hints}]",
        "positivity",
        "omega",
        "decide",
        "simp",
        "field_simp",
        "ring_nf",
        "norm_num <;> linarith",
        "simp_all <;> nlinarith [{hints}]",
        "field_simp <;> ring_nf <;> nlinarith [{hints}]",
        "norm_num at * <;> omega",
        "ring_nf <;> nlinarith [{hints}]",
        "norm_num [pow_succ] <;> nlinarith [{hints}]",
    )

    def scripts(self, problem: Problem) -> list[str]:
        hints = square_hints(numeric_variables(problem.formal_statement))
        return [s.format(hints=hints).replace(" []", "") for s in self.BASE]

    def generate(self, problem: Problem, sample: int) -> Candidate:
        scripts = self.scripts(problem)
        return Candidate("  " + scripts[sample % len(scripts)] + "\n", "completion")


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "deepseek-ai/DeepSeek-Prover-V2-7B"
    api_key: str | None = None
    style: str = "v2_cot"
    max_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 0.95
    max_concurrency: int = 8
    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 900.0


class OpenAIGenerator:
    """Completion (V1.5 styles) or chat (V2 styles) requests to vLLM, SGLang or a hosted API."""

    def __init__(self, config: OpenAIConfig, few_shot_pool: list[Problem] | None = None):
        self.config = config
        self.name = f"openai:{config.model}:{config.style}"
        self.few_shot_pool = few_shot_pool
        self._slots = threading.BoundedSemaphore(config.max_concurrency)

    def generate(self, problem: Problem, sample: int) -> Candidate:
        seed = sample_seed(problem.name, sample)
        prompt = build_prompt(self.config.style, problem, seed, self.few_shot_pool)
        return extract(prompt, self._complete(prompt, seed))

    def _complete(self, prompt: Prompt, seed: int) -> str:
        c = self.config
        body = {"model": c.model, "max_tokens": c.max_tokens, "temperature": c.temperature, "top_p": c.top_p,
                "seed": seed}
        if prompt.messages is not None:
            path, body["messages"] = "/chat/completions", list(prompt.messages)
        else:
            path, body["prompt"] = "/completions", prompt.text
        reply = self._post(path, body)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if prompt.messages is not None else choice["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"unexpected reply shape from {c.base_url}{path}: {str(reply)[:200]}") from e
        if text is None:  # e.g. vLLM's reasoning parser when the output was cut before any answer
            return ""
        if not isinstance(text, str):
            raise GenerationError(f"reply text from {c.base_url}{path} is not a string: {str(text)[:200]}")
        return text

    def _post(self, path: str, body: dict) -> dict:
        c = self.config
        url = self._url(path)
        headers = {"Content-Type": "application/json"}
        if c.api_key:
            headers["Authorization"] = f"Bearer {c.api_key}"
        data = json.dumps(body, ensure_ascii=False).encode()
        last = ""
        for attempt in range(c.retries + 1):
            if attempt:
                time.sleep(c.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers)
            try:
                with self._slots, urllib.request.urlopen(req, timeout=c.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
                if e.code != 429 and e.code < 500:
                    break
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated replies
                last = str(e) or type(e).__name__
            except json.JSONDecodeError as e:
                last = f"reply is not JSON: {e}"
            except UnicodeDecodeError as e:
                last = f"reply is not UTF-8 text: {e}"
        raise GenerationError(f"{url} failed: {last}")

    def _url(self, path: str) -> str:
        """The endpoint URL for `path`; one without an http(s) scheme or host is a GenerationError, not a crash
        inside urllib."""
        url = self.config.base_url.strip().rstrip("/") + path
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise GenerationError(f"endpoint URL {self.config.base_url!r} needs http:// or https:// and a host, "
                                  "e.g. http://127.0.0.1:8000/v1")
        return url


@dataclass(frozen=True)
class LocalModelConfig:
    path: str
    style: str = "v15"
    max_new_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 0.95
    do_sample: bool = True
    device: str | None = None
    dtype: str | None = None  # "bfloat16", "float32", ...


class LocalModelGenerator:
    """DeepSeek-Prover V1.5/V2-7B (Llama-shaped) or V2-671B (V3-shaped) through shared_moe on this machine."""

    def __init__(self, config: LocalModelConfig, few_shot_pool: list[Problem] | None = None):
        import torch
        from transformers import AutoTokenizer

        import shared_moe

        self.torch = torch
        self.config = config
        self.name = f"local:{config.path}:{config.style}"
        self.few_shot_pool = few_shot_pool
        self.model = shared_moe.from_pretrained(config.path, dtype=config.dtype, device=config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        self._lock = threading.Lock()  # one model, many batch workers: generate one request at a time

    def _input_ids(self, prompt: Prompt):
        tok = self.tokenizer
        if prompt.messages is not None:
            text = tok.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt.text)["input_ids"]
        device = next(self.model.parameters()).device
        return self.torch.tensor([ids], device=device)

    def generate(self, problem: Problem, sample: int) -> Candidate:
        c = self.config
        seed = sample_seed(problem.name, sample)
        prompt = build_prompt(c.style, problem, seed, self.few_shot_pool)
        ids = self._input_ids(prompt)
        with self._lock, self.torch.no_grad():
            self.torch.manual_seed(seed)
            out = self.model.generate(ids, max_new_tokens=c.max_new_tokens, do_sample=c.do_sample,
                                      temperature=c.temperature, top_p=c.top_p,
                                      eos_token_id=self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        return extract(prompt, text)
