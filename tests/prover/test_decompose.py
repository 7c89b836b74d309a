"""Acceptance 5: V2-style subgoal extraction, stitching round trip, and the full pipeline on the fake REPL."""
from __future__ import annotations

import json

import pytest

from prover.checker import CheckConfig, Checker
from prover.dataset import DEFAULT_HEADER, Problem
from prover.decompose import (DecomposeConfig, DecompositionError, Ledger, blank_haves, parse_sketch,
                              prove_by_decomposition, stitch_aux, stitch_inline, subgoals)
from prover.pinning import Candidate
from prover.verdict import Status, Verdict

STATEMENT = "theorem induction_ineq_nsqlefactn (n : ℕ) (h₀ : 4 ≤ n) : n ^ 2 ≤ n ! := by\n"
SKETCH = DEFAULT_HEADER + STATEMENT + """\
  have base_case : 4 ^ 2 ≤ 4 ! := by
    sorry
  have inductive_step : ∀ k ≥ 4, k ^ 2 ≤ k ! → (k + 1) ^ 2 ≤ (k + 1) ! := by
    sorry
  have final_proof : ∀ m ≥ 4, m ^ 2 ≤ m ! := by sorry
  sorry
"""
PROBLEM = Problem("induction_ineq_nsqlefactn", "test", DEFAULT_HEADER, "", STATEMENT)
THM = ["(n : ℕ)", "(h₀ : 4 ≤ n)"]
BASE = "(base_case : 4 ^ 2 ≤ 4 !)"
STEP = "(inductive_step : ∀ k ≥ 4, k ^ 2 ≤ k ! → (k + 1) ^ 2 ≤ (k + 1) !)"
FINAL = "(final_proof : ∀ m ≥ 4, m ^ 2 ≤ m !)"


def test_fig2_sketch_recursive_variant():
    goals = subgoals(parse_sketch(SKETCH, PROBLEM.name), recursive=True)
    assert [g.lemma_name for g in goals] == [f"{PROBLEM.name}_{s}" for s in
                                             ("base_case", "inductive_step", "final_proof", "final")]
    assert [g.binders for g in goals] == [THM, THM + [BASE], THM + [BASE, STEP], THM + [BASE, STEP, FINAL]]
    assert goals[1].goal == "∀ k ≥ 4, k ^ 2 ≤ k ! → (k + 1) ^ 2 ≤ (k + 1) !"
    assert goals[3].goal == "n ^ 2 ≤ n !"


def test_fig2_sketch_substitution_variant():
    goals = subgoals(parse_sketch(SKETCH, PROBLEM.name), recursive=False)
    assert len(goals) == 4
    assert [g.binders for g in goals] == [THM, THM, THM, THM + [BASE, STEP, FINAL]]
    assert goals[0].statement() == f"theorem {PROBLEM.name}_base_case (n : ℕ) (h₀ : 4 ≤ n) :\n    4 ^ 2 ≤ 4 ! := by\n"


SOLVED = DEFAULT_HEADER + """\
theorem t (x y : ℝ) (h₀ : x + y = 10) (h₁ : x - y = 2) : x = 6 ∧ y = 4 := by
  have hx : x = 6 := by
    have h2 : 2 * x = 12 := by linarith
    linarith
  have hy : y = 4 := by
    rw [hx] at h₀
    linarith
  have : x * y = 24 := by
    rw [hx, hy]
    norm_num
  exact ⟨hx, hy⟩
"""


def _squash(s: str) -> str:
    return " ".join(s.split())


def test_solved_proof_round_trips_through_extraction_and_stitching():
    sketch_code, bodies = blank_haves(SOLVED, "t")
    assert sketch_code.count("sorry") == 3 and "linarith" not in sketch_code
    sketch = parse_sketch(sketch_code, "t")
    goals = subgoals(sketch)
    assert [g.lemma_name for g in goals] == ["t_hx", "t_hy", "t_this"]
    assert goals[1].binders == ["(x y : ℝ)", "(h₀ : x + y = 10)", "(h₁ : x - y = 2)", "(hx : x = 6)"]
    assert _squash(stitch_inline(sketch, goals, bodies)) == _squash(SOLVED)


def test_aux_strategy_emits_lemmas_and_exact_calls():
    sketch_code, bodies = blank_haves(SOLVED, "t")
    sketch = parse_sketch(sketch_code, "t")
    code = stitch_aux(sketch, subgoals(sketch), bodies)
    assert code.index("theorem t_hy") < code.index("theorem t (")
    assert "have hy : y = 4 := by\n    exact t_hy x y h₀ h₁ hx" in code


def test_context_changing_step_before_a_hole_is_refused():
    bad = DEFAULT_HEADER + STATEMENT + "  intro m\n  have h : m = m := by sorry\n  sorry\n"
    with pytest.raises(DecompositionError, match="changes the context"):
        parse_sketch(bad, PROBLEM.name)


class ScriptedSolver:
    """Proves lemmas whose name is in `script` with the given tactic; anything else gets `sorry`."""

    name = "scripted"

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.calls = 0

    def generate(self, problem, sample):
        self.calls += 1
        return Candidate("  " + self.script.get(problem.name, "sorry") + "\n", "completion")


@pytest.fixture
def checker(make_pool):
    return Checker(make_pool(), CheckConfig(timeout=10))


@pytest.mark.parametrize("strategy", ["inline", "aux"])
def test_pipeline_solves_every_subgoal_and_reverifies(checker, strategy):
    solver = ScriptedSolver({f"{PROBLEM.name}_{s}": "omega" for s in
                             ("base_case", "inductive_step", "final_proof", "final")})
    ledger = Ledger()
    code = prove_by_decomposition(PROBLEM, SKETCH, checker, solver, DecomposeConfig(strategy=strategy), ledger)
    assert code is not None and "sorry" not in code
    assert checker.check(PROBLEM, Candidate(code, "file")).verdict.complete
    assert ledger.count("lemma_check") == 4 and ledger.count("lemma_attempt") == 4
    assert ledger.entries[-1] == {"kind": "stitch", "target": PROBLEM.name, "status": "complete", "depth": 0}
    assert ledger.generator_calls == solver.calls


def test_failed_lemma_is_decomposed_again(checker):
    base = f"{PROBLEM.name}_base_case"
    solver = ScriptedSolver({f"{PROBLEM.name}_{s}": "omega" for s in ("inductive_step", "final_proof", "final")}
                            | {f"{base}_h16": "norm_num", f"{base}_final": "omega"})

    class Sketcher:
        name = "sketcher"

        def generate(self, problem, sample):
            assert problem.name == base
            return Candidate(DEFAULT_HEADER + problem.formal_statement
                             + "  have h16 : (4 : ℕ) ^ 2 = 16 := by sorry\n  sorry\n", "file")

    ledger = Ledger()
    cfg = DecomposeConfig(attempts_per_lemma=2, max_depth=1)
    code = prove_by_decomposition(PROBLEM, SKETCH, checker, solver, cfg, ledger, Sketcher())
    assert code is not None and "have h16 : (4 : ℕ) ^ 2 = 16 := by" in code
    assert ledger.count("sketch") == 1
    assert [e["status"] for e in ledger.entries if e["target"] == base and e["kind"] == "lemma_attempt"] == \
           ["rejected", "rejected"]  # both direct attempts were spent and recorded before recursing
    assert {e["depth"] for e in ledger.entries} == {0, 1}


def test_unusable_sub_sketch_counts_as_one_generator_call(checker):
    base = f"{PROBLEM.name}_base_case"

    class Sketcher:
        name = "sketcher"
        calls = 0

        def generate(self, problem, sample):
            self.calls += 1
            return Candidate("no sketch here, just prose", "file")

    solver, sketcher, ledger = ScriptedSolver({}), Sketcher(), Ledger()
    cfg = DecomposeConfig(attempts_per_lemma=2, max_depth=1)
    assert prove_by_decomposition(PROBLEM, SKETCH, checker, solver, cfg, ledger, sketcher) is None
    assert [e["kind"] for e in ledger.entries if e["target"] == base][-2:] == ["sketch", "sketch_unusable"]
    assert ledger.generator_calls == solver.calls + sketcher.calls == 3


def test_budget_exhaustion_returns_none_and_keeps_the_ledger(checker):
    ledger = Ledger()
    assert prove_by_decomposition(PROBLEM, SKETCH, checker, ScriptedSolver({}),
                                  DecomposeConfig(attempts_per_lemma=3), ledger) is None
    assert ledger.count("lemma_attempt") == 3 and ledger.count("stitch") == 0


def test_lemma_that_does_not_elaborate_is_not_attempted(checker):
    broken = SKETCH.replace("have base_case : 4 ^ 2 ≤ 4 !", "have base_case : FAKE_UNKNOWN 4")
    solver = ScriptedSolver({})
    ledger = Ledger()
    assert prove_by_decomposition(PROBLEM, broken, checker, solver, DecomposeConfig(), ledger) is None
    assert ledger.entries == [{"kind": "lemma_check", "target": f"{PROBLEM.name}_base_case",
                               "status": "lean_error", "depth": 0}]
    assert solver.calls == 0


class RecordingBackend:
    """Answers every file with a sorry verdict and keeps what it was sent."""

    def __init__(self):
        self.sent: list[str] = []

    def verify(self, code, timeout, theorem=None):
        self.sent.append(code)
        return Verdict(Status.LEAN_ERROR, "recorded")

    def close(self):
        pass


def test_a_sketch_the_text_layer_bans_never_reaches_lean():
    """The lemma checks send the sketch's `have` types to Lean, so the sketch is scanned first."""
    evil = SKETCH.replace("have base_case : 4 ^ 2 ≤ 4 !",
                          "have base_case : (by_elab do Lean.modifyEnv id; return default : 4 ^ 2 ≤ 4 !)")
    backend = RecordingBackend()
    with pytest.raises(DecompositionError, match="text layer"):
        prove_by_decomposition(PROBLEM, evil, Checker(backend), ScriptedSolver({}), DecomposeConfig(), Ledger())
    assert backend.sent == []


def test_a_banned_sketch_statement_never_reaches_lean():
    """Sixth red-team round: the pin replaces the sketch's own statement, so only its proof was scanned, but
    the lemma statements take their binders and final goal from the sketch's statement, not the reference."""
    evil = SKETCH.replace("(h₀ : 4 ≤ n)", "(h₀ : 4 ≤ n) (hx : (by_elab do Lean.modifyEnv id; return default : True))")
    backend = RecordingBackend()
    with pytest.raises(DecompositionError, match="text layer"):
        prove_by_decomposition(PROBLEM, evil, Checker(backend), ScriptedSolver({}), DecomposeConfig(), Ledger())
    assert backend.sent == []


def test_batch_checks_unreadable_or_banned_sketches_as_plain_candidates(tmp_path):
    """A destructuring `have` (not readable as a lemma) or a banned sketch is one ordinary, rejected attempt:
    the batch goes on instead of stopping at that sample on every resume."""
    from prover.batch import Decomposition, RunSpec, run_batch

    destructuring = SKETCH.replace("have base_case : 4 ^ 2 ≤ 4 ! := by\n    sorry",
                                   "have ⟨x, hx⟩ : ∃ x : ℕ, x = 1 := by sorry")
    banned = SKETCH.replace("have base_case : 4 ^ 2 ≤ 4 !", "have base_case : (by_elab return default : 4 ^ 2 ≤ 4 !)")
    outputs = [Candidate(destructuring, "file"), Candidate(banned, "file")]

    class Sketcher:
        name = "sketcher"

        def generate(self, problem, sample):
            return outputs[sample]

    backend = RecordingBackend()
    decomposition = Decomposition(ScriptedSolver({}), DecomposeConfig())
    spec = RunSpec("test", "test", "digest", "sketcher", 2, (PROBLEM.name,), {}, {}, decomposition.to_json())
    run_batch([PROBLEM], Sketcher(), Checker(backend), spec, tmp_path, workers=1, decomposition=decomposition)
    records = {r["sample"]: r for r in map(json.loads, (tmp_path / "attempts.jsonl").read_text().splitlines())}
    assert [records[s]["status"] for s in (0, 1)] == ["rejected", "rejected"]
    assert all(r["reason"].startswith("text:") for r in records.values()) and backend.sent == []


def test_comments_do_not_leak_into_lemma_statements():
    commented = SKETCH.replace("have base_case : 4 ^ 2 ≤ 4 !", "have base_case : 4 ^ 2 -- the square\n      ≤ 4 !")
    goal = subgoals(parse_sketch(commented, PROBLEM.name))[0]
    assert goal.goal == "4 ^ 2 ≤ 4 !"


def test_batch_decomposition_counts_each_sketch_as_one_sample(checker, tmp_path):
    """`prove --decompose`: sketches are solved and re-verified; a plain proof is checked as usual."""
    from prover.batch import Decomposition, RunSpec, run_batch

    extra_hole = SKETCH.removesuffix("  sorry\n") + "  have extra : 2 + 2 = 4 := by sorry\n  sorry\n"
    outputs = {0: Candidate(SKETCH, "file"), 1: Candidate("  omega\n", "completion"),
               2: Candidate(extra_hole, "file")}

    class Sketcher:
        name = "sketcher"

        def generate(self, problem, sample):
            return outputs[sample]

    solver = ScriptedSolver({f"{PROBLEM.name}_{s}": "omega" for s in
                             ("base_case", "inductive_step", "final_proof", "final")})
    decomposition = Decomposition(solver, DecomposeConfig(attempts_per_lemma=2))
    spec = RunSpec("test", "test", "digest", "sketcher", 3, (PROBLEM.name,), {}, {"timeout": 10.0},
                   decomposition.to_json())
    summary = run_batch([PROBLEM], Sketcher(), checker, spec, tmp_path, workers=1, decomposition=decomposition)

    records = {r["sample"]: r for r in map(json.loads, (tmp_path / "attempts.jsonl").read_text().splitlines())}
    assert [records[s]["status"] for s in range(3)] == ["complete", "complete", "sorry"]
    assert "sorry" not in records[0]["code"].split(":= by", 1)[1] and "decomposition" not in records[1]
    assert records[0]["decomposition"] == {"generator_calls": 1 + 4, "checks": 4 + 4 + 1, "subgoals": 4,
                                           "subgoals_tried": 4}
    # The 4th hole (`extra`) fails both attempts; the closing hole after it is never tried.
    assert records[2]["decomposition"] == {"generator_calls": 1 + 3 + 2, "checks": 4 + 3 + 2, "subgoals": 5,
                                           "subgoals_tried": 4}
    assert records[2]["reason"] == "decomposition: subgoal 4 of 5 was not solved"
    assert summary["table"]["all"]["solved"] == 1 and summary["samples"] == 3
    with pytest.raises(ValueError, match="decompose"):
        other = RunSpec(*[getattr(spec, f) for f in ("variant", "split", "statement_digest", "generator",
                                                      "samples", "problems", "backend", "verification")], None)
        run_batch([PROBLEM], Sketcher(), checker, other, tmp_path, workers=1)


@pytest.mark.parametrize("hole", [":= by sorry -- note", ":= by sorry /- note -/", ":= by\n    -- note\n    sorry",
                                  ":= /- note -/ by sorry"])
def test_a_comment_inside_a_hole_does_not_hide_it(hole):
    sketch = parse_sketch(SKETCH.replace(":= by sorry", hole), PROBLEM.name)
    assert len(sketch.holes) == 4
    assert [g.lemma_name for g in subgoals(sketch)][2] == f"{PROBLEM.name}_final_proof"
    assert "final_proof" not in blank_haves(SKETCH.replace(":= by sorry", hole), PROBLEM.name)[1]


def test_the_result_is_the_checked_file_with_its_header(checker):
    """`prover decompose --out` and the demo show what Lean checked, not the bare stitched sketch."""
    solver = ScriptedSolver({f"{PROBLEM.name}_{s}": "omega" for s in
                             ("base_case", "inductive_step", "final_proof", "final")})
    code = prove_by_decomposition(PROBLEM, SKETCH.removeprefix(DEFAULT_HEADER), checker, solver,
                                  DecomposeConfig(), Ledger())
    assert code is not None and code.startswith(DEFAULT_HEADER + STATEMENT)


@pytest.mark.parametrize("checks_before_stop", [0, 1, 3, 8])
def test_should_stop_ends_the_decomposition_without_success(checker, checks_before_stop):
    """Asked before every generator call and Lean check; a stopped run returns None and says so."""
    solver = ScriptedSolver({f"{PROBLEM.name}_{s}": "omega" for s in
                             ("base_case", "inductive_step", "final_proof", "final")})
    ledger = Ledger()
    code = prove_by_decomposition(PROBLEM, SKETCH, checker, solver, DecomposeConfig(), ledger,
                                  should_stop=lambda: len(ledger.entries) >= checks_before_stop)
    assert code is None and ledger.final_verdict is None
    assert len(ledger.entries) == checks_before_stop + 1 and ledger.entries[-1]["kind"] == "stopped"
    assert ledger.count("stitch") == 0
