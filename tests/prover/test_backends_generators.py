"""Backends other than the pool (Kimina, LeanDojo, none) and the generators' network behaviour."""
from __future__ import annotations

import json
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prover.backends import BackendConfig, BackendNotConfigured, make_backend
from prover.cli import main
from prover.dataset import DEFAULT_HEADER, Problem, load_minif2f
from prover.generators import (GenerationError, OpenAIConfig, OpenAIGenerator, PortfolioGenerator,
                               numeric_variables, sample_seed)
from prover.kimina import KiminaBackend, KiminaConfig
from prover.leandojo_backend import LeanDojoBackend, LeanDojoConfig, LeanDojoUnavailable, proof_tactics
from prover.verdict import Status

STATEMENT = "theorem t (x : ℝ) (h : 2 * x = 4) : x = 2 := by\n"


def test_no_backend_is_an_error_that_explains_setup(capsys):
    with pytest.raises(BackendNotConfigured) as err:
        make_backend(BackendConfig())
    text = str(err.value)
    assert "elan" in text and "v4.9.0-rc1" in text and "2f65ba7f" in text and "--kimina-url" in text
    assert main(["verify", "/dev/null", "--theorem", "t"]) == 2
    assert "never reports a proof as verified" in capsys.readouterr().err


def test_backend_config_file_is_validated(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"kind": "kimina", "kimina_url": "http://127.0.0.1:1"}))
    assert isinstance(make_backend(BackendConfig.from_file(path)), KiminaBackend)
    path.write_text(json.dumps({"kind": "repl", "typo": 1}))
    with pytest.raises(ValueError, match="typo"):
        BackendConfig.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        BackendConfig.from_file(path)


def test_kimina_client_checks_audits_and_retries(kimina_server):
    url, state = kimina_server
    state["fail_first"] = 2
    backend = KiminaBackend(KiminaConfig(url, backoff_s=0.01))
    v = backend.verify(DEFAULT_HEADER + STATEMENT + "  linarith\n", timeout=10, theorem="t")
    assert v.status is Status.COMPLETE and v.axioms == ["propext", "Classical.choice", "Quot.sound"]
    assert state["requests"] == 3
    assert v.messages == []  # the appended audit's output is not part of the proof's messages
    assert backend.verify(DEFAULT_HEADER + STATEMENT + "  sorry\n", 10, "t").status is Status.SORRY


def test_kimina_timeout_and_unreachable(kimina_server):
    url, _ = kimina_server
    v = KiminaBackend(KiminaConfig(url)).verify(DEFAULT_HEADER + STATEMENT + "  -- FAKE: sleep 30\n", 1, "t")
    assert v.status is Status.TIMEOUT
    dead = KiminaBackend(KiminaConfig("http://127.0.0.1:9", retries=1, backoff_s=0.01))
    v = dead.verify("theorem x : True := trivial", 5)
    assert v.status is Status.UNAVAILABLE and "unreachable" in v.reason


def test_openai_null_content_is_an_empty_answer(openai_server):
    """vLLM sends `"content": null` when its reasoning parser cut the output before any answer: an attempt
    with no proof (rejected at the pin), not a crash of the batch."""
    url, state = openai_server
    state["chat_content"] = None
    cand = OpenAIGenerator(OpenAIConfig(base_url=url, style="v2_cot")).generate(PROBLEM, 0)
    assert cand.kind == "file" and cand.text == ""


class _Err(Exception):
    pass


def _fake_lean_dojo(script: list[str]):
    """A stand-in for the lean_dojo module: the proof is finished after exactly `script`."""
    class State:
        def __init__(self, i):
            self.i, self.pp = i, f"goal {i}"

    class ProofFinished:
        pass

    class LeanError:
        def __init__(self, error):
            self.error = error

    class ProofGivenUp:
        pass

    class Dojo:
        def __init__(self, thm, timeout):
            self.thm = thm

        def __enter__(self):
            return self, State(0)

        def __exit__(self, *exc):
            return False

        def run_tac(self, state, tac):
            if tac == "sorry":
                return ProofGivenUp()
            if tac != script[state.i]:
                return LeanError(f"tactic failed: {tac}")
            return ProofFinished() if state.i + 1 == len(script) else State(state.i + 1)

    return types.SimpleNamespace(
        LeanGitRepo=lambda url, commit: (url, commit), Theorem=lambda repo, path, name: (repo, path, name),
        Dojo=Dojo, ProofFinished=ProofFinished, LeanError=LeanError, ProofGivenUp=ProofGivenUp,
        DojoTacticTimeoutError=_Err, DojoCrashError=_Err, DojoInitError=_Err)


def test_leandojo_adapter_runs_tactics_one_by_one():
    code = DEFAULT_HEADER + STATEMENT + "  have h2 : x * 2 = 4 := by\n    linarith\n  linarith\n"
    assert proof_tactics(code, "t") == ["have h2 : x * 2 = 4 := by\n  linarith", "linarith"]
    backend = LeanDojoBackend(LeanDojoConfig(), module=_fake_lean_dojo(proof_tactics(code, "t")))
    assert backend.verify(code, 10, "t").status is Status.COMPLETE
    assert backend.verify(code, 10, "t").axioms is None  # LeanDojo cannot audit: the checker fails closed
    assert backend.verify(DEFAULT_HEADER + STATEMENT + "  simp\n", 10, "t").status is Status.LEAN_ERROR
    assert backend.verify(DEFAULT_HEADER + STATEMENT + "  sorry\n", 10, "t").status is Status.SORRY


def test_leandojo_missing_package_is_the_setup_message_not_a_traceback(capsys, tmp_path):
    try:
        import lean_dojo  # noqa: F401
    except ImportError:
        with pytest.raises(BackendNotConfigured, match="leandojo"):
            make_backend(BackendConfig(kind="leandojo"))
        (tmp_path / "t.lean").write_text("theorem t : True := by\n  trivial\n")
        assert main(["verify", str(tmp_path / "t.lean"), "--theorem", "t", "--backend", "leandojo"]) == 2
        err = capsys.readouterr().err
        assert "deepseek-suite[leandojo]" in err and "never reports a proof as verified" in err
        assert "Traceback" not in err
    else:
        pytest.skip("lean_dojo is installed here")


def test_leandojo_missing_package_is_explained():
    try:
        import lean_dojo  # noqa: F401
    except ImportError:
        with pytest.raises(LeanDojoUnavailable, match="leandojo"):
            LeanDojoBackend(LeanDojoConfig())
    else:
        pytest.skip("lean_dojo is installed here")


def test_portfolio_is_deterministic_with_square_hints():
    p = Problem("p", "test", DEFAULT_HEADER, "", "theorem p (a b : ℝ) (h₀ : 0 < a) : a ^ 2 + b ^ 2 ≥ 2 * a * b := by\n")
    assert numeric_variables(p.formal_statement) == ["a", "b"]
    gen = PortfolioGenerator()
    scripts = [gen.generate(p, i).text for i in range(len(gen.BASE))]
    assert scripts[2] == "  nlinarith [sq_nonneg a, sq_nonneg b, sq_nonneg (a - b), sq_nonneg (a + b)]\n"
    assert gen.generate(p, len(gen.BASE)).text == scripts[0]
    assert len(set(scripts)) == len(scripts)
    assert all(PortfolioGenerator().scripts(q) for q in load_minif2f(split="test"))


def test_sample_seed_is_stable():
    assert sample_seed("a", 0) == sample_seed("a", 0) != sample_seed("a", 1)


@pytest.fixture
def openai_server():
    state = {"fail_first": 0, "active": 0, "max_active": 0, "requests": 0, "status": 503, "bodies": [],
             "chat_content": "plan\n```lean4\n" + DEFAULT_HEADER + STATEMENT + "  linarith\n```"}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"] += 1
                state["bodies"].append(body)
                fail = state["fail_first"] > 0
                state["fail_first"] -= fail
                state["active"] += 1
                state["max_active"] = max(state["max_active"], state["active"])
            time.sleep(0.05)
            with lock:
                state["active"] -= 1
            if fail:
                self.send_response(state["status"])
                self.end_headers()
                return
            if self.path.endswith("/chat/completions"):
                reply = {"choices": [{"message": {"content": state["chat_content"]}}]}
            else:
                reply = {"choices": [{"text": "  linarith\n```\nignored"}]}
            data = state.get("raw_reply") or json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()


PROBLEM = Problem("t", "test", DEFAULT_HEADER, "", STATEMENT)


def test_openai_completion_and_chat_with_retries(openai_server):
    url, state = openai_server
    state["fail_first"] = 2
    gen = OpenAIGenerator(OpenAIConfig(base_url=url, style="v15", backoff_s=0.01))
    cand = gen.generate(PROBLEM, 3)
    assert cand.kind == "completion" and cand.text == "  linarith\n"
    assert state["requests"] == 3 and state["bodies"][-1]["seed"] == sample_seed("t", 3)
    chat = OpenAIGenerator(OpenAIConfig(base_url=url, style="v2_cot")).generate(PROBLEM, 0)
    assert chat.kind == "file" and chat.text.endswith("  linarith\n")
    assert state["bodies"][-1]["messages"][0]["content"].startswith("Complete the following Lean 4 code:")


def test_openai_concurrency_is_bounded(openai_server):
    url, state = openai_server
    gen = OpenAIGenerator(OpenAIConfig(base_url=url, style="v15", max_concurrency=2))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: gen.generate(PROBLEM, i), range(8)))
    assert len(results) == 8 and 1 <= state["max_active"] <= 2


def test_openai_client_errors_are_not_retried(openai_server):
    url, state = openai_server
    state["fail_first"], state["status"] = 5, 400
    with pytest.raises(GenerationError, match="HTTP 400"):
        OpenAIGenerator(OpenAIConfig(base_url=url, style="v15", backoff_s=0.01)).generate(PROBLEM, 0)
    assert state["requests"] == 1


def test_openai_reply_that_is_not_utf8_is_a_generation_error(openai_server):
    url, state = openai_server
    state["raw_reply"] = b'{"choices": [{"text": "\xff\xfe"}]}'
    with pytest.raises(GenerationError, match="not UTF-8"):
        OpenAIGenerator(OpenAIConfig(base_url=url, style="v15", retries=1, backoff_s=0.01)).generate(PROBLEM, 0)
    assert state["requests"] == 2  # retried like any other unreadable reply


@pytest.mark.parametrize("base_url", ["localhost/v1", "127.0.0.1:8000/v1", "ftp://127.0.0.1/v1", "http://"])
def test_openai_url_without_http_scheme_or_host_is_a_generation_error(base_url):
    with pytest.raises(GenerationError, match="needs http:// or https://"):
        OpenAIGenerator(OpenAIConfig(base_url=base_url, style="v2_cot", retries=0)).generate(PROBLEM, 0)
