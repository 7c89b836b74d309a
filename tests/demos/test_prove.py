"""The prove tab's handlers: no backend (setup message, never verified) and the fake Lean REPL."""

from __future__ import annotations

import pytest

from demos.prove import GeneratorChoice, LeanSettings, ProveService, make_checker, problem_from_text
from prover.backends import SETUP_HELP
from prover.dataset import DEFAULT_HEADER

PROBLEM = "mathd_algebra_10"
PASTED = "theorem two_plus (x : ℕ) (h : x = 2) : x + 1 = 3 := by\n  subst h\n  rfl\n"
SKETCH = """\
theorem induction_ineq_nsqlefactn (n : ℕ) (h₀ : 4 ≤ n) : n ^ 2 ≤ n ! := by
  have base_case : 4 ^ 2 ≤ 4 ! := by
    sorry
  have final_proof : ∀ m ≥ 4, m ^ 2 ≤ m ! := by sorry
  sorry
"""
V15 = "deepseek_v15"


@pytest.fixture
def offline() -> ProveService:
    service = ProveService(*make_checker(LeanSettings()))
    yield service
    service.close()


@pytest.fixture
def lean(fake_repl_cmd) -> ProveService:
    checker, description = make_checker(LeanSettings(repl_cmd=fake_repl_cmd, timeout=60))
    assert checker is not None and description.startswith("Lean REPL pool")
    service = ProveService(checker, description)
    yield service
    service.close()


def test_without_a_backend_nothing_is_verified_and_the_setup_message_is_shown(offline):
    assert offline.checker is None
    assert SETUP_HELP in offline.backend_status()
    reports = [
        offline.verify(V15, PROBLEM, "  norm_num"),
        offline.verify(V15, "", PASTED),
        *offline.prove(V15, PROBLEM, "", GeneratorChoice(), 3),
    ]
    for report in reports:
        assert not report.verified and report.status == "not_verified"
        assert SETUP_HELP in report.details and "✅" not in report.markdown()
    sketch = offline.decompose(V15, "", SKETCH, "inline", 2)
    assert not sketch.verified and SETUP_HELP in sketch.details
    assert [row[0] for row in sketch.rows] == [
        "induction_ineq_nsqlefactn_base_case",
        "induction_ineq_nsqlefactn_final_proof",
        "induction_ineq_nsqlefactn_final",
    ]
    assert {row[3] for row in sketch.rows} == {"not checked"}


def test_known_good_proof_is_complete_and_sorry_is_not(lean):
    good = lean.verify(V15, PROBLEM, "norm_num")
    assert good.verified and good.status == "complete" and "✅" in good.markdown()
    assert good.code.startswith(DEFAULT_HEADER) and good.code.rstrip().endswith(":= by\n  norm_num")
    assert "`Quot.sound`" in good.details  # the axiom audit ran
    for bad in (
        "  sorry",
        "theorem mathd_algebra_10 : abs ((120 : ℝ) / 100 * 30 - 130 / 100 * 20) = 10 := by\n  sorry",
    ):
        report = lean.verify(V15, PROBLEM, bad)
        assert not report.verified and report.status == "rejected" and "sorry" in report.details
    error = lean.verify(V15, PROBLEM, "  -- FAKE: error linarith failed\n  linarith")
    assert not error.verified and error.status == "lean_error" and "linarith failed" in error.details


def test_a_pasted_theorem_is_verified_against_its_own_statement(lean):
    report = lean.verify(V15, "", PASTED)
    assert report.verified and "two_plus" in report.headline
    assert report.code == DEFAULT_HEADER + PASTED


def test_prove_streams_attempts_and_stops_at_the_first_verified_proof(lean):
    reports = list(lean.prove(V15, PROBLEM, "", GeneratorChoice("portfolio"), 4))
    assert reports[-1].verified and reports[-1].rows == [["1", "complete", ""]]
    assert "norm_num" in reports[-1].code


def test_decomposition_solves_and_stitches_a_sketch(lean):
    report = lean.decompose(V15, "", SKETCH, "inline", 2)
    assert report.verified and report.status == "complete"
    assert "sorry" not in report.code and report.code.count("norm_num") == 3
    assert [row[3] for row in report.rows] == ["complete after 1 attempt(s)"] * 3


def test_input_errors_are_reported_not_raised(lean):
    assert lean.verify(V15, "", "").status == "input_error"
    assert "no `theorem NAME" in lean.verify(V15, "", "example : True := trivial").details
    assert "Pick a miniF2F problem" in next(lean.prove(V15, "", "", GeneratorChoice(), 1)).details
    assert "endpoint URL" in next(lean.prove(V15, PROBLEM, "", GeneratorChoice("openai", ""), 1)).details
    assert "Cannot decompose" in lean.decompose(V15, "", PASTED, "inline", 1).details  # no sorry holes


def test_problem_from_text_header_rules():
    plain = problem_from_text("/-- doc -/\n" + PASTED)
    assert plain.name == "two_plus" and plain.header == DEFAULT_HEADER
    assert plain.formal_statement == "theorem two_plus (x : ℕ) (h : x = 2) : x + 1 = 3 := by\n"
    own = problem_from_text("import Mathlib\nopen Real\n\n" + PASTED)
    assert own.header == "import Mathlib\nopen Real\n\n"
    extra = problem_from_text("open Finset\n" + PASTED)
    assert extra.header == DEFAULT_HEADER + "open Finset\n"
    with pytest.raises(ValueError, match="tactic proof"):
        problem_from_text("theorem t : True := trivial")
    # The pasted header and statement are trusted by the checker, so they pass the text layer first.
    with pytest.raises(ValueError, match="refused: set_option debug"):
        problem_from_text("import Mathlib\nset_option debug.skipKernelTC true\n" + PASTED)
    with pytest.raises(ValueError, match="refused: sorry"):
        problem_from_text("theorem t (h : sorry) : True := by\n  trivial")


def test_miniF2F_problems_and_statements(offline):
    names = offline.problems(V15)
    assert PROBLEM in names and len(names) == 488
    assert offline.statement(V15, PROBLEM).endswith(names[PROBLEM].formal_statement)
    assert offline.statement(V15, "") == ""
