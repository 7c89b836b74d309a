"""`python -m prover verify` on a raw file goes through every layer the checker has."""
from __future__ import annotations

import json
import shlex

import pytest

from prover.cli import main
from prover.dataset import DEFAULT_HEADER

STATEMENT = "theorem t (x : ℝ) (h : 2 * x = 4) : x = 2 := by\n"
MAGIC = DEFAULT_HEADER + "axiom magic : ∀ p : Prop, p\n\n" + STATEMENT + "  exact magic _\n"


@pytest.fixture
def verify(tmp_path, fake_cmd, capsys):
    """Run `verify` on `text` against the fake REPL; (exit code, printed verdict or stderr)."""
    def run(text: str, *flags: str) -> tuple[int, dict | str]:
        path = tmp_path / "proof.lean"
        path.write_text(text, encoding="utf-8")
        code = main(["verify", str(path), *flags, "--backend", "repl", "--repl-cmd", shlex.join(fake_cmd()),
                     "--timeout", "10"])
        out, err = capsys.readouterr()
        return code, json.loads(out) if out else err
    return run


def test_raw_file_goes_through_the_text_layer(verify):
    code, verdict = verify(MAGIC, "--theorem", "t")
    assert code == 1 and verdict["status"] == "rejected" and verdict["reason"].startswith("text:")


def test_raw_file_goes_through_the_axiom_audit(verify):
    code, verdict = verify(MAGIC, "--theorem", "t", "--allow", "axiom")
    assert code == 1 and verdict["status"] == "rejected"
    assert verdict["reason"] == "audit: uses axioms ['magic']"


def test_clean_raw_file_is_complete(verify):
    code, verdict = verify(DEFAULT_HEADER + STATEMENT + "  linarith\n", "--theorem", "t")
    assert code == 0 and verdict["status"] == "complete"
    assert verdict["axioms"] == ["propext", "Classical.choice", "Quot.sound"]


def test_raw_file_may_import_mathlib_tactic_but_its_body_is_scanned(verify):
    """Import lines choose the environment and are not model text; `Tactic` there is no meta-API use."""
    header = "import Mathlib.Tactic\nimport Mathlib.Tactic.Linarith\n\n"
    code, verdict = verify(header + STATEMENT + "  linarith\n", "--theorem", "t")
    assert code == 0 and verdict["status"] == "complete"
    code, verdict = verify(header + STATEMENT + "  sorry\n", "--theorem", "t")
    assert code == 1 and verdict["status"] == "rejected" and verdict["reason"].startswith("text:")


def test_verify_needs_the_theorem_to_audit(verify):
    code, err = verify(DEFAULT_HEADER + STATEMENT + "  linarith\n")
    assert code == 2 and "--theorem" in err and "--problem" in err


def test_verify_refuses_conflicting_or_unknown_names(verify):
    code, err = verify(MAGIC, "--theorem", "t", "--problem", "mathd_algebra_10")
    assert code == 2 and "different theorems" in err
    code, err = verify(MAGIC, "--problem", "no_such_problem")
    assert code == 2 and "no problem named 'no_such_problem'" in err
