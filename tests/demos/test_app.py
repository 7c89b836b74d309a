"""The Blocks app builds, the CLI keeps its safe defaults, and a launched app serves on 127.0.0.1."""

from __future__ import annotations

import inspect
import socket
import time
import urllib.error
import urllib.request

import gradio as gr
import pytest

from demos.app import build_app
from demos.cli import build_parser, is_loopback, launch_options, load_chat_engine, main, make_prove_service
from demos.prove import LeanSettings, ProveService, make_checker
from demos.tiny import RANDOM_WEIGHTS_LABEL


@pytest.fixture
def offline_prove():
    service = ProveService(*make_checker(LeanSettings()))
    yield service
    service.close()


def test_build_app_returns_blocks_with_and_without_a_vl_model(engine, offline_prove):
    for chat in (engine, None):
        assert isinstance(build_app(chat, offline_prove), gr.Blocks)


def test_stop_cancels_every_prover_action_and_decompose_can_be_closed(offline_prove):
    """Gradio stops a running generator at its next yield; a plain function would run to its end."""
    demo = build_app(None, offline_prove)
    ids = {fn.name: i for i, fn in demo.fns.items()}
    cancelled = {i for fn in demo.fns.values() for i in fn.cancels}
    assert {ids["on_verify"], ids["on_prove"], ids["on_decompose"]} <= cancelled
    assert inspect.isgeneratorfunction(demo.fns[ids["on_decompose"]].fn)


def test_cli_defaults_are_local_and_flags_build_the_services(fake_repl_cmd):
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.vl_model is None and not args.random_tiny_vl
    assert load_chat_engine(args) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    args = build_parser().parse_args(["--random-tiny-vl", "--repl-cmd", fake_repl_cmd])
    chat = load_chat_engine(args)
    prove = make_prove_service(args)
    try:
        assert chat.label == RANDOM_WEIGHTS_LABEL and "RANDOM WEIGHTS" in chat.label
        assert prove.checker is not None
    finally:
        chat.close()
        prove.close()
    with pytest.raises(SystemExit):  # one VL source at a time
        build_parser().parse_args(["--random-tiny-vl", "--vl-model", "x"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launched_app_answers_on_loopback_and_runs_a_chat_turn(engine, offline_prove, write_image, monkeypatch):
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(engine, offline_prove)
    port = _free_port()
    _, url, share_url = demo.queue().launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True
    )
    try:
        assert share_url is None and url.startswith(f"http://127.0.0.1:{port}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
        # Drive the chat wiring the way the browser does: add the turn, then stream the answer.
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        messages, text, _, _, status = client.predict("Describe.", [handle_file(write_image())], api_name="/add")
        assert text == "" and messages[0]["role"] == "user" and status == ""
        start = time.monotonic()
        messages, _, status = client.predict(0.0, 0.9, 4, 1.0, 4096, api_name="/answer")
        assert messages[-1]["role"] == "assistant" and status.startswith("Prompt: ")
        assert time.monotonic() - start < 60
        messages, _, _ = client.predict(0.0, 0.9, 4, 1.0, 4096, api_name="/again")
        assert [m["role"] for m in messages] == ["user", "assistant"]
        messages, _, status = client.predict(api_name="/drop_last")
        assert messages == [] and status == "Removed the last turn."
        verdict, _, _ = client.predict("deepseek_v15", "mathd_algebra_10", "norm_num", api_name="/on_verify")
        assert "Not verified: no Lean backend is configured" in verdict and "✅" not in verdict
    finally:
        demo.close()


def test_a_busy_port_is_a_clear_error_not_a_traceback(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_uploads_over_the_size_limit_are_refused(offline_prove, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(["--port", str(_free_port())])
    options = launch_options(args)
    assert options["share"] is False and options["server_name"] == "127.0.0.1"
    demo = build_app(None, offline_prove)
    demo.queue().launch(**options)
    try:
        limit = demo.max_file_size
        assert limit is not None and limit <= 64 * 2**20

        def upload(size: int) -> int:
            boundary = "demosboundary"
            body = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{args.port}/gradio_api/upload",
                data=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert upload(1000) == 200
        assert upload(limit + 1) == 413
    finally:
        demo.close()
