"""Acceptance 1 (first half): the fake replays real REPL recordings and the client parses them all."""
from __future__ import annotations

import json
import subprocess

import pytest

from prover.repl_process import ProcessConfig, ReplDied, ReplProcess
from prover.repl_protocol import (CommandResponse, ErrorResponse, ProofStepResponse, encode_request,
                                  parse_response, split_frames)


def test_every_recording_is_used(transcripts):
    # 74 request files; 3 were recorded without an expected output upstream and cannot be replayed.
    ins = list(transcripts.glob("*/*.in"))
    assert len(ins) == 74
    assert sum(p.with_name(p.stem + ".expected.out").exists() for p in ins) == 71


def test_fake_replays_recording_byte_for_byte(session, fake_cmd):
    stdin = session.with_suffix(".in").read_bytes()
    expected = session.with_name(session.name + ".expected.out").read_bytes()
    run = subprocess.run(fake_cmd("--replay", str(session)), input=stdin, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == expected


def test_client_parses_every_recorded_response(session, fake_cmd):
    requests = [json.loads(f, strict=False) for f in split_frames(session.with_suffix(".in").read_text("utf-8"))]
    recorded = split_frames(session.with_name(session.name + ".expected.out").read_text("utf-8"))
    proc = ReplProcess(ProcessConfig(fake_cmd("--replay", str(session))))
    try:
        for request, raw in zip(requests, recorded, strict=True):
            got = proc.request(request, timeout=30)
            assert got == parse_response(raw)
            assert isinstance(got, (CommandResponse, ProofStepResponse, ErrorResponse))
            d = json.loads(raw)
            if isinstance(got, ErrorResponse):
                assert got.message == d["message"]
            else:
                assert len(got.messages) == len(d.get("messages", []))
                assert len(got.sorries) == len(d.get("sorries", []))
    finally:
        proc.close()


def test_replay_rejects_a_request_that_was_not_recorded(transcripts, fake_cmd):
    session = transcripts / "core" / "readme"
    proc = ReplProcess(ProcessConfig(fake_cmd("--replay", str(session))))
    with pytest.raises(ReplDied, match="replay mismatch"):
        proc.request({"cmd": "def g : Nat := 3"}, timeout=30)


def test_omitted_lists_parse_as_empty():
    resp = parse_response('{"env": 3}')
    assert resp == CommandResponse(env=3, raw={"env": 3})
    assert resp.messages == [] and resp.sorries == [] and resp.tactics == []


def test_request_encoding_has_no_blank_line_inside():
    wire = encode_request({"cmd": "theorem t : 1 = 1 := by\n\n  rfl", "env": 0}).decode()
    assert wire.endswith("\n\n") and "\n\n" not in wire[:-2]
    assert split_frames(wire) == [wire[:-1]]


def test_framing_treats_whitespace_only_lines_as_separators():
    assert split_frames('{"a": 1}\n  \n\n{"b":\n 2}\n\n') == ['{"a": 1}\n', '{"b":\n 2}\n']
