"""Acceptance 6: resumable batch runs (SIGKILL mid-run) and the pass@k estimators."""
from __future__ import annotations

import json
import os
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
