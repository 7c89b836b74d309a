"""Acceptance 2 (dataset loader) and 3 (prompt builders byte-identical to prover.md §1.4 / §2.3)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from prover.dataset import DEFAULT_HEADER, load_few_shot, load_minif2f, statement_set_digest
from prover.prompts import build_prompt, cut_completion, extract, last_lean_block, pick_few_shot

CATEGORY_COUNTS = {"mathd_algebra": 70, "mathd_numbertheory": 60, "amc": 45, "imo": 20, "aime": 15,
                   "algebra": 18, "numbertheory": 8, "induction": 8}


def test_minif2f_rows_splits_names_and_categories():
    problems = load_minif2f("deepseek_v15")
    assert len(problems) == 488
    assert Counter(p.split for p in problems) == {"valid": 244, "test": 244}
    assert len({p.name for p in problems}) == 488
    for split in ("valid", "test"):
        assert Counter(p.category for p in problems if p.split == split) == CATEGORY_COUNTS
    assert {p.header for p in problems} == {DEFAULT_HEADER}
    assert all(p.formal_statement.endswith(":= by\n") for p in problems)


def test_shipped_copy_is_byte_identical_to_the_shared_data(shared_dir):
    from importlib import resources
    shipped = (resources.files("prover") / "data" / "minif2f_deepseek_v15.jsonl").read_bytes()
    assert shipped == (shared_dir / "data" / "minif2f" / "deepseek_prover_v15_minif2f.jsonl").read_bytes()


def test_rectified_variant_and_digest():
    fixed = load_minif2f("goedel_v2_rectified", "test")
    assert len(fixed) == 244 and {p.header for p in fixed} == {DEFAULT_HEADER}
    v15 = load_minif2f("deepseek_v15", "test")
    assert statement_set_digest(v15) != statement_set_digest(fixed)
    with pytest.raises(ValueError, match="unknown miniF2F variant"):
        load_minif2f("nope")
    with pytest.raises(ValueError, match="split"):
        load_minif2f("deepseek_v15", "train")


@pytest.fixture(scope="module")
def problem():
    return {p.name: p for p in load_minif2f()}["mathd_algebra_10"]


def test_v15_prompts(problem):
    body = problem.header + problem.informal_prefix + problem.formal_statement
    assert build_prompt("v15", problem).text == "Complete the following Lean 4 code:\n\n```lean4\n" + body
    assert build_prompt("v15_cot", problem).text == (
        "Complete the following Lean 4 code with explanatory comments preceding each line of code:\n\n"
        "```lean4\n" + body)


def test_v15_few_shot_prompt(problem):
    pool = load_few_shot()
    assert len(pool) == 67
    prompt = build_prompt("v15_few_shot", problem, seed=7, few_shot_pool=pool).text
    shots = pick_few_shot(problem, pool, seed=7)
    assert len(shots) == 3 and problem.name not in {s.name for s in shots}
    expected = "".join("Complete the following Lean 4 code:\n\n```lean4\n" + s.header + s.informal_prefix
                       + s.formal_statement + s.formal_proof + "\n```\n\n\n" for s in shots)
    assert prompt == expected + "Complete the following Lean 4 code:\n\n```lean4\n" + problem.header \
        + problem.informal_prefix + problem.formal_statement


def test_few_shot_never_uses_the_problem_itself():
    pool = load_few_shot()
    for seed in range(50):
        assert pool[0].name not in {s.name for s in pick_few_shot(pool[0], pool, seed)}


def test_v2_prompts(problem):
    code = problem.header + problem.informal_prefix + problem.formal_statement + "  sorry"
    cot = build_prompt("v2_cot", problem)
    assert cot.output == "file" and cot.messages[0]["role"] == "user"
    assert cot.messages[0]["content"] == (
        "Complete the following Lean 4 code:\n\n```lean4\n" + code + "\n```\n\n"
        "Before producing the Lean 4 code to formally prove the given theorem, provide a detailed proof plan "
        "outlining the main proof steps and strategies.\nThe plan should highlight key ideas, intermediate "
        "lemmas, and proof structures that will guide the construction of the final formal proof.")
    assert build_prompt("v2_noncot", problem).messages[0]["content"] == (
        "Complete the following Lean 4 code:\n\n```lean4\n" + code + "\n```")


def test_extraction_rules(problem):
    assert cut_completion("  norm_num\n```\nmore text ```lean4 x```") == "  norm_num\n"
    out = ("### Lean 4 Proof with `have` Statements\n```lean4\nsketch\n```\n"
           "### Complete Lean 4 Proof\n```lean4\nfinal file\n```\n")
    assert last_lean_block(out) == "final file\n"
    assert last_lean_block("no code at all") is None
    assert extract(build_prompt("v2_cot", problem), "no code").text == ""
    assert extract(build_prompt("v15", problem), "  simp\n```").text == "  simp\n"


def test_malformed_dataset_line_is_reported(tmp_path, monkeypatch):
    import prover.dataset as ds
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "minif2f_deepseek_v15.jsonl").write_text(json.dumps({"name": "a"}) + "\n{broken\n")
    monkeypatch.setattr(ds, "_data_path", lambda f: bad / f)
    with pytest.raises(ValueError, match=":2: malformed JSON"):
        ds.load_minif2f()


def test_extraction_reads_crlf_outputs(problem):
    file_text = problem.header + problem.formal_statement + "  norm_num\n"
    crlf = ("### Complete Lean 4 Proof\n```lean4\n" + file_text + "```\nDone.\n").replace("\n", "\r\n")
    assert extract(build_prompt("v2_cot", problem), crlf).text == file_text
    assert extract(build_prompt("v15", problem), "  simp\r\n  linarith\r\n```\r\n").text == "  simp\n  linarith\n"


def test_completion_that_restates_the_theorem_is_read_as_a_file(problem):
    from prover.pinning import pin
    restated = problem.header + problem.formal_statement + "  norm_num\n```\nThis works."
    cand = extract(build_prompt("v15", problem), restated)
    assert cand.kind == "file"
    assert pin(problem, cand).code.count(f"theorem {problem.name}") == 1
    assert extract(build_prompt("v15", problem), "\n  norm_num\n```").kind == "completion"


def test_a_multi_line_completion_starts_on_the_line_after_by(problem):
    """As DeepSeek-Prover-V1.5 builds the file (statement, which ends `:= by\\n`, then the output): every tactic
    of the completion keeps its column, which Lean's tactic blocks need to be one."""
    from prover.pinning import pin

    output = "  norm_num\n  linarith\n```\nignored"
    code = pin(problem, extract(build_prompt("v15", problem), output)).code
    assert code == problem.header + problem.informal_prefix + problem.formal_statement + "  norm_num\n  linarith\n"
