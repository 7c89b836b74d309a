"""Acceptance 1 (second half): pool behaviour and fault classification against the fake REPL."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from prover.dataset import DEFAULT_HEADER
from prover.leantext import split_header
from prover.repl_process import ProcessConfig, ReplDied, ReplProcess
from prover.verdict import Status, classify

STATEMENT = "theorem t (x : ℝ) (h : 2 * x = 4) : x = 2 := by\n"


def proof(*lines: str) -> str:
    return DEFAULT_HEADER + STATEMENT + "".join(f"  {line}\n" for line in lines)


def line_of(code: str, needle: str) -> int:
    return code[: code.index(needle)].count("\n") + 1


def test_split_header_counts_import_lines():
    header, body, n = split_header(proof("linarith"))
    assert header == "import Mathlib\nimport Aesop\n" and n == 3
    assert body.startswith("set_option maxHeartbeats 0")


def test_complete_proof_reuses_header_env_and_audits(make_pool):
    pool = make_pool()
    for _ in range(3):
        v = pool.verify(proof("linarith"), timeout=10, theorem="t")
        assert v.status is Status.COMPLETE
        assert v.axioms == ["propext", "Classical.choice", "Quot.sound"]
    assert pool.restarts == 1  # the header ran once for three proofs


def test_line_numbers_are_shifted_back_to_the_full_file(make_pool):
    code = proof("nlinarith [sq_nonneg x]", "-- FAKE: error linarith failed")
    v = make_pool().verify(code, timeout=10)
    assert v.status is Status.LEAN_ERROR
    assert v.errors[0].pos.line == line_of(code, "-- FAKE: error")


@pytest.mark.parametrize("spelling", ["quote", "backtick"])
def test_sorry_in_both_warning_spellings(make_pool, spelling):
    code = proof("sorry")
    v = make_pool("--sorry-spelling", spelling).verify(code, timeout=10)
    assert v.status is Status.SORRY
    assert v.sorries[0].pos.line == line_of(code, "  sorry")


def test_sorry_warning_without_sorries_entry_still_fails(make_pool):
    v = make_pool().verify(proof("exact sorryAx _ false"), timeout=10)
    assert v.status is Status.SORRY and v.sorries == []


def test_info_messages_never_fail_a_proof(make_pool):
    v = make_pool().verify(proof("linarith") + "\n#print axioms t\n", timeout=10)
    assert v.status is Status.COMPLETE
    assert [m.severity for m in v.messages] == ["info"]


def test_error_object_is_repl_error(transcripts, fake_cmd):
    proc = ReplProcess(ProcessConfig(fake_cmd("--replay", str(transcripts / "core" / "unknown_environment"))))
    try:
        resp = proc.request({"cmd": "def f : Nat := by sorry", "env": 5}, timeout=10)
    finally:
        proc.close()
    v = classify(resp)
    assert v.status is Status.REPL_ERROR and v.reason == "Unknown environment."


def _gone(pid: int) -> bool:
    """Dead or a zombie; SIGKILL delivery is asynchronous, so give the kernel a moment."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in {"Z", "X"}:
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_hang_times_out_kills_the_process_group_and_recovers(make_pool, tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    pool = make_pool("--child-pid-file", str(pid_file))
    v = pool.verify(proof("-- FAKE: sleep 60"), timeout=1.0)
    assert v.status is Status.TIMEOUT
    assert _gone(int(pid_file.read_text()))  # the grandchild went down with the group
    assert pool.verify(proof("linarith"), timeout=10).status is Status.COMPLETE
    assert pool.restarts == 2


def test_crash_is_system_error_and_recovers(make_pool):
    pool = make_pool()
    v = pool.verify(proof("-- FAKE: crash"), timeout=10)
    assert v.status is Status.SYSTEM_ERROR and "code 134" in v.reason
    assert "Stack overflow" in v.stderr
    assert pool.verify(proof("linarith"), timeout=10).status is Status.COMPLETE


def test_megabyte_of_stderr_does_not_deadlock(make_pool):
    v = make_pool().verify(proof("-- FAKE: stderr 1000000", "linarith"), timeout=10)
    assert v.status is Status.COMPLETE
    assert 0 < len(v.stderr) <= 8192 and set(v.stderr.strip()) == {"x"}


def test_unparseable_output_is_system_error_and_recovers(make_pool):
    pool = make_pool()
    v = pool.verify(proof("-- FAKE: garbage"), timeout=10)
    assert v.status is Status.SYSTEM_ERROR and "not JSON" in v.reason
    assert pool.verify(proof("linarith"), timeout=10).status is Status.COMPLETE
    assert pool.restarts == 2


def test_memory_exhaustion_hits_rlimit_and_recovers(make_pool):
    limit = 768 << 20
    pool = make_pool(memory_limit_bytes=limit)
    v = pool.verify(proof("-- FAKE: oom"), timeout=30)
    assert v.status is Status.SYSTEM_ERROR
    assert f"RLIMIT_AS={limit}" in v.stderr  # the limit reached the REPL process
    assert pool.verify(proof("linarith"), timeout=10).status is Status.COMPLETE


def test_dead_process_is_restarted(make_pool):
    pool = make_pool()
    assert pool.verify(proof("linarith"), timeout=10).complete
    slot = pool._free[0]
    os.killpg(slot.proc.pid, signal.SIGKILL)
    slot.proc._proc.wait()
    assert pool.verify(proof("linarith"), timeout=10).complete
    assert pool.restarts == 2


def test_recycle_after_max_uses(make_pool):
    pool = make_pool(max_uses=2)
    for _ in range(5):
        assert pool.verify(proof("linarith"), timeout=10).complete
    assert pool.restarts == 3


def test_new_header_restarts_the_process(make_pool):
    pool = make_pool()
    assert pool.verify(proof("linarith"), timeout=10).complete
    other = "import Mathlib\n\ntheorem u : True := by\n  trivial\n"
    assert pool.verify(other, timeout=10).complete
    assert pool.restarts == 2


def test_headers_that_differ_only_in_layout_share_a_process(make_pool):
    """Blank lines around the imports do not change the environment, so they must not re-import Mathlib;
    each file's messages are still shifted by its own header lines."""
    pool = make_pool()
    layouts = [DEFAULT_HEADER, "import Mathlib\nimport Aesop\n", "\nimport Mathlib\n\n\nimport Aesop  \n\n\n"]
    for header in layouts:
        code = header + STATEMENT + "  nlinarith [sq_nonneg x]\n  -- FAKE: error linarith failed\n"
        v = pool.verify(code, timeout=10)
        assert v.status is Status.LEAN_ERROR and v.errors[0].pos.line == line_of(code, "-- FAKE: error")
    assert pool.restarts == 1


def test_concurrent_verifications_use_every_worker(make_pool):
    pool = make_pool("--body-delay", "0.05", workers=2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pool.verify(proof("linarith"), 10, "t")))
               for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [v.status for v in results] == [Status.COMPLETE] * 8
    assert pool.restarts == 2


def test_fake_runs_proofs_only_on_the_header_env(fake_cmd):
    """Like a real REPL, a proof without the header's env misses the imports; the fake makes that an error."""
    body = "theorem u : True := by\n  trivial"
    proc = ReplProcess(ProcessConfig(fake_cmd()))
    try:
        header = proc.request({"cmd": "import Mathlib"}, timeout=10).env
        proved = proc.request({"cmd": body, "env": header}, timeout=10)
        assert classify(proved).complete
        missing = proc.request({"cmd": body}, timeout=10)
        assert classify(missing).status is Status.LEAN_ERROR and "no env" in missing.messages[0].data
        reused = proc.request({"cmd": body, "env": proved.env}, timeout=10)
        assert classify(reused).status is Status.LEAN_ERROR and "not the header's" in reused.messages[0].data
        unknown = proc.request({"cmd": body, "env": 99}, timeout=10)
        assert classify(unknown).reason == "Unknown environment."
        audit = proc.request({"cmd": "#print axioms u", "env": proved.env}, timeout=10)
        assert classify(audit).complete and "depends on axioms" in audit.messages[0].data
    finally:
        proc.close()


@pytest.mark.parametrize("wrong", ["dropped", "reused"])
def test_pool_that_loses_its_header_env_fails_against_the_fake(make_pool, wrong):
    """A regression that sends no env, or the previous proof's env, must not pass the tests."""
    pool = make_pool()
    assert pool.verify(proof("linarith"), timeout=10, theorem="t").complete
    slot = pool._free[0]
    slot.header_env = None if wrong == "dropped" else slot.header_env + 1  # env 1: the first proof's
    v = pool.verify(proof("linarith"), timeout=10, theorem="t")
    assert v.status is Status.LEAN_ERROR, v


@pytest.mark.timeout(30)
def test_repl_that_closes_stdout_but_keeps_running_is_killed_not_awaited(fake_cmd):
    proc = ReplProcess(ProcessConfig(fake_cmd()))
    start = time.monotonic()
    try:
        with pytest.raises(ReplDied, match="kept running and was killed"):
            proc.request({"cmd": "theorem u : True := by\n  -- FAKE: close_stdout\n  trivial"}, timeout=20)
        assert time.monotonic() - start < 10
        assert _gone(proc.pid)
    finally:
        proc.kill()


def test_memory_limit_is_set_by_an_exec_wrapper_not_preexec_fn(fake_cmd, monkeypatch):
    """preexec_fn can deadlock while pool threads run; the REPL must still get the limit and its own session."""
    popen_kwargs = {}
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        popen_kwargs.update(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    limit = 768 << 20
    proc = ReplProcess(ProcessConfig(fake_cmd(), memory_limit_bytes=limit))
    try:
        assert proc.request({"cmd": "import Mathlib"}, timeout=10).env == 0
        assert popen_kwargs.get("preexec_fn") is None and popen_kwargs["start_new_session"]
        assert re.search(rf"Max address space\s+{limit}\s+{limit}", Path(f"/proc/{proc.pid}/limits").read_text())
        assert "fake_repl.py" in Path(f"/proc/{proc.pid}/cmdline").read_text()  # exec'd in place: same pid
        assert os.getsid(proc.pid) == proc.pid
    finally:
        proc.close()


def test_missing_repl_under_a_memory_limit_is_reported(tmp_path):
    proc = ReplProcess(ProcessConfig((str(tmp_path / "no-repl"),), memory_limit_bytes=1 << 30))
    with pytest.raises(ReplDied, match="cannot start REPL"):
        proc.request({"cmd": "import Mathlib"}, timeout=10)


def test_frames_printed_by_the_proof_cannot_stand_in_for_the_answers(make_pool):
    """Fourth red-team round: code run during elaboration could print a clean answer and a clean audit
    before the REPL's real (failing) answer. The nonce echo after the audit exposes the extra frames."""
    pool = make_pool()
    forged = pool.verify(proof("-- FAKE: forge t", "-- FAKE: error linarith failed", "linarith"), timeout=10,
                         theorem="t")
    assert forged.status is Status.SYSTEM_ERROR and "out of step" in forged.reason
    honest = pool.verify(proof("linarith"), timeout=10, theorem="t")  # the slot was reset: back in step
    assert honest.status is Status.COMPLETE and honest.axioms == ["propext", "Classical.choice", "Quot.sound"]
