"""Prompt formats of DeepSeek-Prover-V1.5 and V2 and the matching output extraction (prover.md §1.4, §2.3)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .dataset import Problem
from .pinning import Candidate

V15_INSTRUCTION = "Complete the following Lean 4 code:"
V15_COT_INSTRUCTION = "Complete the following Lean 4 code with explanatory comments preceding each line of code:"
V2_PLAN_REQUEST = (
    "Before producing the Lean 4 code to formally prove the given theorem, provide a detailed proof plan "
    "outlining the main proof steps and strategies.\n"
    "The plan should highlight key ideas, intermediate lemmas, and proof structures that will guide the "
    "construction of the final formal proof."
)
FENCE = "```"
STYLES = ("v15", "v15_cot", "v15_few_shot", "v2_cot", "v2_noncot")


@dataclass(frozen=True)
class Prompt:
    """Either raw completion text or chat messages; `output` says how to read the model's answer."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    output: str = "completion"  # "completion": continues the statement; "file": last ```lean4 block


def v15_prompt(problem: Problem, cot: bool = False) -> str:
    instruction = V15_COT_INSTRUCTION if cot else V15_INSTRUCTION
    return (instruction + "\n\n" + FENCE + "lean4\n" + problem.header + problem.informal_prefix
            + problem.formal_statement)


def v15_few_shot_prompt(problem: Problem, examples: list[Problem]) -> str:
    shots = "".join(v15_prompt(e) + e.formal_proof + "\n" + FENCE + "\n\n\n" for e in examples)
    return shots + v15_prompt(problem)


def pick_few_shot(problem: Problem, pool: list[Problem], seed: int, k: int = 3) -> list[Problem]:
    """k examples drawn without replacement, never the problem itself (V1.5 `_extra_header`)."""
    others = [e for e in pool if e.name != problem.name]
    return random.Random(seed).sample(others, k)


def v2_user_message(problem: Problem, cot: bool = True, newline_before_fence: bool = True) -> str:
    """V2 chat turn; the README puts a newline before the closing fence, Goedel-Prover-V2's copy does not."""
    block = (V15_INSTRUCTION + "\n\n" + FENCE + "lean4\n" + problem.header + problem.informal_prefix
             + problem.formal_statement + "  sorry" + ("\n" if newline_before_fence else "") + FENCE)
    return block + "\n\n" + V2_PLAN_REQUEST if cot else block


def build_prompt(style: str, problem: Problem, seed: int = 0, few_shot_pool: list[Problem] | None = None) -> Prompt:
    if style == "v15":
        return Prompt(text=v15_prompt(problem))
    if style == "v15_cot":
        return Prompt(text=v15_prompt(problem, cot=True))
    if style == "v15_few_shot":
        if not few_shot_pool:
            raise ValueError("v15_few_shot needs the few-shot pool (prover.dataset.load_few_shot())")
        return Prompt(text=v15_few_shot_prompt(problem, pick_few_shot(problem, few_shot_pool, seed)))
    if style in ("v2_cot", "v2_noncot"):
        msg = {"role": "user", "content": v2_user_message(problem, cot=style == "v2_cot")}
        return Prompt(messages=(msg,), output="file")
    raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")


def cut_completion(output: str) -> str:
    """V1.5: keep the model text up to (not including) the first fence."""
    return output.split(FENCE, 1)[0]


_BLOCK = re.compile(r"```lean4?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def last_lean_block(output: str) -> str | None:
    """V2: the answer is the last ```lean4 block (after '### Complete Lean 4 Proof')."""
    blocks = _BLOCK.findall(output)
    return blocks[-1] if blocks else None


# A completion can only continue the tactic block; starting with one of these at column 0 means the model
# wrote the file (header and/or theorem) again instead.
_RESTATED = re.compile(r"(?:import|theorem|lemma)\s|/--")


def restates_file(completion: str) -> bool:
    """True when the completion's first non-blank line starts a new file or declaration, not a tactic."""
    first = next((line for line in completion.split("\n") if line.strip()), "")
    return bool(_RESTATED.match(first))


def extract(prompt: Prompt, output: str) -> Candidate:
    """The candidate in `output`; CRLF is read as LF so fences and column-0 checks see Windows-style replies."""
    output = output.replace("\r\n", "\n")
    if prompt.output == "completion":
        text = cut_completion(output)
        return Candidate(text, "file" if restates_file(text) else "completion")
    return Candidate(last_lean_block(output) or "", "file")
