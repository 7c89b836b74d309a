"""Acceptance 6: resumable batch runs (SIGKILL mid-run) and the pass@k estimators."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import pytest

from prover.attempts import AttemptLog
from prover.passk import pass_at_k_unbiased, solved_within_first, summarize

REPO = Path(__file__).resolve().parents[2]


def test_unbiased_estimator_matches_the_combinatorial_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k_unbiased(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_unbiased_estimator_edge_cases():
    assert pass_at_k_unbiased(10, 0, 5) == 0.0
    assert pass_at_k_unbiased(10, 10, 1) == 1.0
    assert pass_at_k_unbiased(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k_unbiased(4, 1, 4) == 1.0  # n - c < k: every draw of 4 includes the success
    with pytest.raises(ValueError):
        pass_at_k_unbiased(3, 1, 4)


def test_first_k_counts_only_the_first_k_samples():
    outcomes = {0: False, 1: False, 2: True}
    assert [solved_within_first(outcomes, k) for k in (1, 2, 3)] == [False, False, True]


def test_summary_by_category():
    outcomes = {"mathd_algebra_1": {0: True, 1: False}, "mathd_algebra_2": {0: False, 1: False},
                "amc12_x": {0: False, 1: True}}
    cats = {"mathd_algebra_1": "mathd_algebra", "mathd_algebra_2": "mathd_algebra", "amc12_x": "amc"}
    t = summarize(outcomes, cats, [1, 2])
    assert t["mathd_algebra"]["first@1"] == 0.5 and t["amc"]["first@1"] == 0.0 and t["amc"]["first@2"] == 1.0
    assert t["all"]["solved"] == 2 and t["all"]["unbiased@1"] == pytest.approx((0.5 + 0 + 0.5) / 3)


def test_torn_last_line_is_dropped_and_duplicates_refused(tmp_path):
    log = AttemptLog(tmp_path / "a.jsonl")
    log.append({"problem": "p", "sample": 0, "status": "complete"})
    with log.path.open("a") as f:
        f.write('{"problem": "p", "sam')
    assert list(log.load()) == [("p", 0)]
    assert log.path.read_text().count("\n") == 1  # truncated back to the last whole record
    log.append({"problem": "p", "sample": 0, "status": "complete"})
    with pytest.raises(ValueError, match="duplicate"):
        log.load()


def _prove_cmd(fake_cmd, out: Path) -> list[str]:
    repl = " ".join(fake_cmd("--body-delay", "0.03", "--reject-fraction", "0.6"))
    return [sys.executable, "-m", "prover", "prove", "--dataset", "minif2f", "--split", "test", "--limit", "12",
            "--generator", "portfolio", "--samples", "4", "--workers", "2", "--backend", "repl",
            "--repl-cmd", repl, "--timeout", "20", "--out", str(out)]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, fake_cmd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_prove_cmd(fake_cmd, full), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_prove_cmd(fake_cmd, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "attempts.jsonl"
    while proc.poll() is None and (not log.exists() or log.read_text().count("\n") < 15):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = log.read_text().count("\n")
    assert 15 <= interrupted < 48, "the kill must land mid-run"
    with log.open("a") as f:  # a write torn by the kill
        f.write('{"problem": "amc12a_2019_p21", "sample": 3, "sta')
    rerun = subprocess.run(_prove_cmd(fake_cmd, killed), cwd=REPO, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]

    a, b = _records(full), _records(killed)
    keys = [(r["problem"], r["sample"]) for r in b]
    assert len(keys) == len(set(keys)) == 48
    assert {(r["problem"], r["sample"], r["status"], r["code_sha256"]) for r in a} == \
           {(r["problem"], r["sample"], r["status"], r["code_sha256"]) for r in b}
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sa["table"] == sb["table"] and sa["statuses"] == sb["statuses"]
    assert 0 < sa["table"]["all"]["solved"] < 12  # the fake fails some proofs: the totals are not trivial
    assert (killed / "passk.png").stat().st_size > 0
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["variant"] == "deepseek_v15" and len(manifest["statement_digest"]) == 64


def test_resume_with_a_different_run_is_refused(tmp_path, fake_cmd):
    out = tmp_path / "run"
    cmd = _prove_cmd(fake_cmd, out)
    cmd[cmd.index("--limit") + 1] = "1"
    cmd[cmd.index("--samples") + 1] = "1"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    cmd[cmd.index("--split") + 1] = "valid"
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120)
    assert again.returncode == 2 and b"different run" in again.stderr


def _small_prove_args(fake_cmd, out: Path, *repl_flags: str, repl_cmd: str | None = None) -> list[str]:
    repl = repl_cmd or shlex.join(fake_cmd(*repl_flags))
    return ["prove", "--split", "test", "--limit", "2", "--generator", "portfolio", "--samples", "2",
            "--workers", "2", "--backend", "repl", "--repl-cmd", repl, "--timeout", "20", "--out", str(out)]


def test_unavailable_verifier_stops_the_run_and_a_fixed_rerun_does_every_unit(tmp_path, fake_cmd, capsys):
    """A wrong REPL command or an import header that fails (Mathlib not built) is not a verdict on any proof:
    nothing is logged, the run stops with the reason, and the rerun with a working REPL attempts every unit."""
    from prover.cli import main

    out = tmp_path / "run"
    assert main(_small_prove_args(fake_cmd, out, repl_cmd=str(tmp_path / "no-such-repl"))) == 2
    assert "unavailable 3 times in a row" in capsys.readouterr().err
    assert AttemptLog(out / "attempts.jsonl").load() == {}
    assert main(_small_prove_args(fake_cmd, out, "--header-error", "unknown package 'Mathlib'")) == 2
    err = capsys.readouterr().err
    assert "import header failed" in err and "unknown package 'Mathlib'" in err
    assert AttemptLog(out / "attempts.jsonl").load() == {}
    assert main(_small_prove_args(fake_cmd, out)) == 0
    records = AttemptLog(out / "attempts.jsonl").load()
    assert len(records) == 4 and {r["status"] for r in records.values()} <= {"complete", "lean_error", "sorry",
                                                                              "rejected"}


@pytest.mark.parametrize("change", [["--timeout", "5"], ["--allow-axiom", "sorryAx"], ["--allow", "native_decide"]])
def test_resume_with_other_verification_settings_is_refused(tmp_path, fake_cmd, capsys, change):
    from prover.cli import main

    out = tmp_path / "run"
    assert main(_small_prove_args(fake_cmd, out)) == 0
    assert main(_small_prove_args(fake_cmd, out) + change) == 2
    assert "verification" in capsys.readouterr().err
    assert main(_small_prove_args(fake_cmd, out) + ["--workers", "1"]) == 0  # where it runs may change


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, fake_cmd, capsys):
    from prover.batch import _exclusive
    from prover.cli import main

    out = tmp_path / "run"
    with _exclusive(out):
        assert main(_small_prove_args(fake_cmd, out)) == 2
    assert "another run is writing" in capsys.readouterr().err
    assert main(_small_prove_args(fake_cmd, out)) == 0


def test_line_separators_inside_records_survive_a_reload(tmp_path):
    """Model text may hold U+2028, U+2029 or U+0085, which str.splitlines treats as line ends."""
    log = AttemptLog(tmp_path / "a.jsonl")
    code = "theorem t : True := by\n  trivial -- \u2028 \u2029 \x85 \x1c end"
    log.append({"problem": "p", "sample": 0, "code": code})
    log.append({"problem": "p", "sample": 1, "code": "x"})
    records = log.load()
    assert records[("p", 0)]["code"] == code and ("p", 1) in records


def test_cli_input_errors_are_one_line(tmp_path, fake_cmd, capsys):
    from prover.cli import main

    assert main(["verify", str(tmp_path / "missing.lean"), "--theorem", "t", "--backend", "repl",
                 "--repl-cmd", " ".join(fake_cmd())]) == 2
    assert "missing.lean" in capsys.readouterr().err
    assert main(["summary", str(tmp_path / "no-run")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{oops")
    assert main(["summary", str(tmp_path / "bad")]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_small_prove_args(fake_cmd, tmp_path / "zero") + ["--samples", "0"])


def test_ctrl_c_saves_the_attempts_already_running(tmp_path):
    """Queued units are dropped; the one running when Ctrl-C lands is logged when it ends, not lost."""
    import threading

    from prover.batch import RunSpec, run_batch
    from prover.checker import CheckConfig, Checker
    from prover.dataset import DEFAULT_HEADER, Problem
    from prover.pinning import Candidate
    from prover.verdict import Status, Verdict

    problem = Problem("t", "test", DEFAULT_HEADER, "", "theorem t : True := by\n")
    started = threading.Event()

    class Generator:
        name = "scripted"

        def generate(self, problem, sample):
            if sample == 0:
                started.set()
                time.sleep(0.5)
                return Candidate("  trivial\n", "completion")
            started.wait(5)
            raise KeyboardInterrupt

    class Backend:
        def verify(self, code, timeout, theorem=None):
            return Verdict(Status.COMPLETE, axioms=[])

        def close(self):
            pass

    spec = RunSpec("v", "test", "d", "scripted", 4, ("t",), {}, {})
    with pytest.raises(KeyboardInterrupt):
        run_batch([problem], Generator(), Checker(Backend(), CheckConfig()), spec, tmp_path, workers=2)
    records = AttemptLog(tmp_path / "attempts.jsonl").load()
    assert list(records) == [("t", 0)] and records[("t", 0)]["status"] == "complete"
