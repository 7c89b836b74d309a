"""miniF2F statement sets shipped in prover/data, normalised to one Problem record."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

# Lean names are prefixed by their source competition; order matters (longest prefixes first).
CATEGORIES = (
    "mathd_algebra",
    "mathd_numbertheory",
    "amc",
    "aime",
    "imo",
    "algebra",
    "numbertheory",
    "induction",
)

VARIANT_FILES = {
    "deepseek_v15": "minif2f_deepseek_v15.jsonl",
    "goedel_v2_rectified": "minif2f_goedel_v2_test.jsonl",
}
FEW_SHOT_FILE = "minif2f_deepseek_v15_valid_few_shot.jsonl"
DEFAULT_HEADER = (
    "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 0\n\n"
    "open BigOperators Real Nat Topology Rat\n\n"
)


@dataclass(frozen=True)
class Problem:
    """One theorem to prove; the checked file is header + informal_prefix + formal_statement + proof."""

    name: str
    split: str
    header: str
    informal_prefix: str
    formal_statement: str
    formal_proof: str = ""

    @property
    def category(self) -> str:
        return category_of(self.name)

    def to_json(self) -> dict:
        return asdict(self)


def category_of(name: str) -> str:
    for prefix in CATEGORIES:
        if name.startswith(prefix):
            return prefix
    return "other"


def _data_path(filename: str) -> Path:
    return Path(str(resources.files("prover") / "data" / filename))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e})") from e
    return rows


def _from_row(row: dict) -> Problem:
    header = row.get("header")
    prefix = row.get("informal_prefix", "")
    statement = row["formal_statement"]
    if header is None:
        # Goedel-V2 rows fold header and doc comment into formal_statement; split them back out.
        if not statement.startswith(DEFAULT_HEADER + prefix):
            raise ValueError(f"{row['name']}: formal_statement does not start with the standard header")
        header, statement = DEFAULT_HEADER, statement[len(DEFAULT_HEADER + prefix):]
    return Problem(
        name=row["name"],
        split=row["split"],
        header=header,
        informal_prefix=prefix,
        formal_statement=statement,
        formal_proof=row.get("formal_proof", ""),
    )


def load_minif2f(variant: str = "deepseek_v15", split: str | None = None) -> list[Problem]:
    """Problems of one statement-set variant, optionally one split ('valid'/'test'), in file order."""
    if variant not in VARIANT_FILES:
        raise ValueError(f"unknown miniF2F variant {variant!r}; choose one of {sorted(VARIANT_FILES)}")
    problems = [_from_row(r) for r in _read_jsonl(_data_path(VARIANT_FILES[variant]))]
    if split is not None:
        if split not in {"valid", "test"}:
            raise ValueError(f"unknown split {split!r}; choose 'valid' or 'test'")
        problems = [p for p in problems if p.split == split]
    names = [p.name for p in problems]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate problem names in variant {variant!r}")
    return problems


def load_few_shot() -> list[Problem]:
    """The 67 valid-split problems with proofs that V1.5 uses for 3-shot prompting."""
    return [
        _from_row({**r, "header": DEFAULT_HEADER}) for r in _read_jsonl(_data_path(FEW_SHOT_FILE))
    ]


def statement_set_digest(problems: list[Problem]) -> str:
    """SHA-256 over the exact text that gets verified, so runs on different variants never mix."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.name, p.header, p.formal_statement], ensure_ascii=False).encode())
    return h.hexdigest()
