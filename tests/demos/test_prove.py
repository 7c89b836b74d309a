"""The prove tab's handlers: no backend (setup message, never verified) and the fake Lean REPL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from demos.prove import GeneratorChoice, LeanSettings, ProveReport, ProveService, make_checker, problem_from_text
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


def _last(reports: Iterator[ProveReport]) -> ProveReport:
    """The final report of a streaming handler (prove, decompose)."""
    return list(reports)[-1]


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
    sketch = _last(offline.decompose(V15, "", SKETCH, "inline", 2))
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
    report = _last(lean.decompose(V15, "", SKETCH, "inline", 2))
    assert report.verified and report.status == "complete"
    assert "sorry" not in report.code and report.code.count("norm_num") == 3
    assert report.code.startswith(DEFAULT_HEADER)  # the file that was checked, with its import header
    assert [row[3] for row in report.rows] == ["complete after 1 attempt(s)"] * 3


def test_input_errors_are_reported_not_raised(lean):
    assert lean.verify(V15, "", "").status == "input_error"
    assert "no `theorem NAME" in lean.verify(V15, "", "example : True := trivial").details
    assert "Pick a miniF2F problem" in next(lean.prove(V15, "", "", GeneratorChoice(), 1)).details
    assert "endpoint URL" in next(lean.prove(V15, PROBLEM, "", GeneratorChoice("openai", ""), 1)).details
    assert "Cannot decompose" in _last(lean.decompose(V15, "", PASTED, "inline", 1)).details  # no sorry holes


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


HELPER_FIRST = """\
lemma helper (x : ℝ) : x ^ 2 ≥ 0 := by
  positivity

theorem main_thm (x : ℝ) : x ^ 2 + 1 > 0 := by
"""


def _audited(service: ProveService, monkeypatch) -> list[str | None]:
    """The theorem names the service's backend is asked to audit, in order."""
    names: list[str | None] = []
    backend = service.checker.backend
    verify = backend.verify

    def recording(code: str, timeout: float, theorem: str | None = None):
        names.append(theorem)
        return verify(code, timeout, theorem)

    monkeypatch.setattr(backend, "verify", recording)
    return names


def test_a_helper_lemma_before_the_pasted_theorem_is_not_the_statement(lean, monkeypatch):
    """Only helpers may precede the pasted theorem, so the last declaration is the one named and audited."""
    assert problem_from_text(HELPER_FIRST + "  sorry\n").name == "main_thm"
    audited = _audited(lean, monkeypatch)
    report = lean.verify(V15, "", HELPER_FIRST + "  have := helper x\n  linarith\n")
    assert report.verified and "`main_thm`" in report.headline and audited == ["main_thm"]
    sketch = _last(lean.decompose(V15, "", HELPER_FIRST + "  have h : x ^ 2 ≥ 0 := by sorry\n  sorry\n", "inline", 2))
    assert sketch.verified and [row[0] for row in sketch.rows] == ["main_thm_h", "main_thm_final"]
    assert audited[-1] == "main_thm" and "lemma helper" in sketch.code


def test_pasted_import_lines_choose_the_environment_and_are_not_scanned(lean):
    """Like `prover verify --theorem`: `import Mathlib.Tactic` names the meta API but runs nothing."""
    imports = "import Mathlib\nimport Mathlib.Tactic\nimport Lean\n"
    problem = problem_from_text(imports + "open Real\n\n" + PASTED)
    assert problem.header == imports + "open Real\n\n"
    report = lean.verify(V15, "", imports + "\n" + PASTED)
    assert report.verified and report.code.startswith(imports)
    with pytest.raises(ValueError, match="refused: set_option debug"):  # what follows the imports is scanned
        problem_from_text(imports + "set_option debug.skipKernelTC true\n" + PASTED)
    # an `import` inside a comment is not a header line
    assert problem_from_text("/-\nimport Lean\n-/\n" + PASTED).header == DEFAULT_HEADER


def test_a_pasted_theorem_with_another_name_than_the_selected_problem_is_an_input_error(lean):
    """It must not be indented and checked as a tactic block under the reference statement."""
    foo = "theorem foo : abs ((120 : ℝ) / 100 * 30 - 130 / 100 * 20) = 10 := by\n  norm_num\n"
    for report in (lean.verify(V15, PROBLEM, foo), _last(lean.decompose(V15, PROBLEM, foo, "inline", 1))):
        assert report.status == "input_error" and not report.verified
        assert "`foo`" in report.details and f"`{PROBLEM}`" in report.details


def test_switching_between_a_problem_and_a_pasted_theorem_reuses_the_repl(lean):
    """A pasted header with the miniF2F imports must not restart the REPL (and re-import Mathlib)."""
    copied = "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\nopen BigOperators Real Nat\n\n"
    for _ in range(2):
        assert lean.verify(V15, PROBLEM, "norm_num").verified
        assert lean.verify(V15, "", copied + PASTED).verified
        assert lean.verify(V15, "", PASTED).verified
    assert lean.checker.backend.restarts == 1


def test_a_failed_decomposition_says_why(lean):
    """The stitched file's verdict, or the subgoal that stayed open, not only counts."""
    head = "theorem t (x : ℕ) : x + 0 = x := by\n"
    stitched = _last(
        lean.decompose(V15, "", head + "  have h : x = x := by sorry\n  exact FAKE_UNKNOWN\n", "inline", 2)
    )
    assert not stitched.verified and stitched.status == "lean_error"
    assert "stitched proof is lean_error" in stitched.headline and "unknown identifier" in stitched.details
    subgoal = _last(lean.decompose(V15, "", head + "  have h : FAKE_UNKNOWN = x := by sorry\n  sorry\n", "inline", 2))
    assert not subgoal.verified and "subgoal `t_h` was not solved" in subgoal.headline
    assert "statement rejected by Lean: lean_error" in subgoal.details


def test_closing_decompose_stops_its_lean_work_and_never_reports_success(lean, monkeypatch):
    """Stop closes the handler's generator; the decomposition thread then makes no further Lean call."""
    backend = lean.checker.backend
    verify, calls, gate = backend.verify, [], threading.Event()

    def gated(code: str, timeout: float, theorem: str | None = None):
        calls.append(code)
        if len(calls) == 2:  # the second check is still running when Stop arrives
            gate.wait(30)
        return verify(code, timeout, theorem)

    monkeypatch.setattr(backend, "verify", gated)
    run = lean.decompose(V15, "", SKETCH, "inline", 8)
    first = next(run)
    assert first.status == "running" and not first.verified
    start = time.monotonic()
    run.close()  # what Gradio does on Stop; it must not wait for Lean
    assert time.monotonic() - start < 1
    gate.set()
    for thread in threading.enumerate():
        if thread.name.startswith("decompose "):
            thread.join(30)
    assert len(calls) <= 2  # without Stop: 3 lemma checks, 3 attempts and the stitched file
    assert lean.verify(V15, PROBLEM, "norm_num").verified  # the pool worker is free again


def test_leandojo_without_the_package_shows_the_setup_message():
    """`python -m demos --backend leandojo` starts with the setup message instead of a traceback."""
    try:
        import lean_dojo  # noqa: F401
    except ImportError:
        checker, message = make_checker(LeanSettings(backend="leandojo"))
        assert checker is None and "deepseek-suite[leandojo]" in message and SETUP_HELP in message
    else:
        pytest.skip("lean_dojo is installed here")
