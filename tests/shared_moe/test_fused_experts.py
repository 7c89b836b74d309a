"""The fused routed-experts op (csrc/routed_experts.cpp) against the separate grouped ops it replaces: bit for bit."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from shared_moe import cpu_ext, fused_experts
from shared_moe.moe import Experts

from .test_expert_ops import requires_fused

pytestmark = requires_fused


@pytest.fixture(autouse=True, scope="module")
def built_ops():
    assert cpu_ext.available()  # the op tests below call torch.ops.shared_moe directly


def make_case(dtype: torch.dtype, tokens: int = 45, hidden: int = 40, width: int = 24, experts: int = 9, top_k: int = 3,
              ) -> tuple[Experts, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Skewed routing with one idle expert; hidden and width are not multiples of 16 (masked vector tails)."""
    gen = torch.Generator().manual_seed(0)
    layer = Experts(num_experts=experts, hidden_size=hidden, intermediate_size=width)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    popularity = torch.linspace(3, 0.1, experts - 1)  # expert experts-1 never chosen
    indices = torch.stack([torch.multinomial(popularity, top_k, generator=gen) for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return layer.to(dtype), x.to(dtype), indices, weights


def fwd_bwd(layer: Experts, x, indices, weights, grad_x=True, grad_w=True) -> dict[str, torch.Tensor | None]:
    layer.zero_grad(set_to_none=True)
    xg, wg = x.clone().requires_grad_(grad_x), weights.clone().requires_grad_(grad_w)
    out = layer(xg, indices, wg)
    if out.requires_grad:
        (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)).sum().backward()
    return {"out": out.detach(), "x": xg.grad, "weights": wg.grad,
            **{name: p.grad for name, p in layer.named_parameters()}}


def separate_ops(monkeypatch):
    monkeypatch.setattr("shared_moe.moe.fused_experts_available", lambda *args: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_bit_identical_to_separate_ops(dtype, monkeypatch):
    layer, x, indices, weights = make_case(dtype)
    assert fused_experts.fused_experts_available(x, layer.gate_up_proj)
    fused = fwd_bwd(layer, x, indices, weights)
    separate_ops(monkeypatch)
    separate = fwd_bwd(layer, x, indices, weights)
    for name, expected in separate.items():
        assert torch.equal(fused[name], expected), name
    assert not fused["gate_up_proj"][-1].any()  # the idle expert's gradient is zero


def test_fused_experts_do_not_depend_on_thread_count():
    layer, x, indices, weights = make_case(torch.bfloat16, tokens=300, hidden=64, width=32)
    with one_thread():
        single = fwd_bwd(layer, x, indices, weights)
    for name, value in fwd_bwd(layer, x, indices, weights).items():
        assert torch.equal(value, single[name]), name


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_fused_experts_match_single_threaded_separate_ops_for_a_large_expert(monkeypatch):
    """oneDNN splits a bf16 weight-gradient reduction of ~2048+ rows over threads; the fused op never does."""
    layer, x, indices, weights = make_case(torch.bfloat16, tokens=2304, hidden=48, width=24, experts=4, top_k=2)
    indices[:, 0] = 0  # expert 0 takes every token
    indices[:, 1] = torch.arange(len(indices)) % 3 + 1
    fused = fwd_bwd(layer, x, indices, weights)
    separate_ops(monkeypatch)
    with one_thread():
        separate = fwd_bwd(layer, x, indices, weights)
    for name, expected in separate.items():
        assert torch.equal(fused[name], expected), name


@pytest.mark.parametrize("frozen", ["experts", "inputs", "routing"])
def test_fused_experts_compute_only_the_requested_gradients(frozen, monkeypatch):
    layer, x, indices, weights = make_case(torch.float32)
    if frozen == "experts":
        layer.requires_grad_(False)
    grad_x, grad_w = frozen != "inputs", frozen != "routing"
    fused = fwd_bwd(layer, x, indices, weights, grad_x=grad_x, grad_w=grad_w)
    separate_ops(monkeypatch)
    separate = fwd_bwd(layer, x, indices, weights, grad_x=grad_x, grad_w=grad_w)
    for name, expected in separate.items():
        assert (fused[name] is None) == (expected is None), name
        assert expected is None or torch.equal(fused[name], expected), name


@pytest.mark.parametrize("wanted", ["routing", "inputs"])
def test_fused_experts_save_only_what_backward_needs(wanted):
    """Frozen experts: the routing weights' gradient needs the down rows, the input's needs the gate_up rows."""
    layer, x, indices, weights = make_case(torch.float32)
    layer.requires_grad_(False)
    sizes = []
    xg, wg = x.clone().requires_grad_(wanted == "inputs"), weights.clone().requires_grad_(wanted == "routing")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(xg, indices, wg)
    rows, hidden, width = indices.numel(), x.shape[1], layer.down_proj.shape[2]
    assert (rows * hidden in sizes) == (wanted == "routing")
    assert (rows * 2 * width in sizes) == (wanted == "inputs")
    assert rows * width not in sizes  # the SwiGLU rows only serve the frozen down_proj's gradient


def test_inference_matches_training_forward():
    layer, x, indices, weights = make_case(torch.bfloat16)
    with torch.no_grad():
        inference = layer(x, indices, weights)
    assert torch.equal(inference, fwd_bwd(layer, x, indices, weights)["out"])


def test_fused_experts_handle_no_tokens():
    layer, x, indices, weights = make_case(torch.float32)
    empty = fwd_bwd(layer, x[:0], indices[:0], weights[:0])
    assert empty["out"].shape == (0, x.shape[1]) and not empty["gate_up_proj"].any()


def test_fused_experts_op_rejects_bad_routing():
    layer, x, indices, weights = make_case(torch.float32)
    order = torch.argsort(indices.reshape(-1), stable=True)
    ends = torch.bincount(indices.reshape(-1), minlength=layer.num_experts).cumsum(0).tolist()
    op = torch.ops.shared_moe.routed_experts
    args = (layer.gate_up_proj.detach(), layer.down_proj.detach(), weights)
    with pytest.raises(RuntimeError, match="permutation"):
        op(x, torch.zeros_like(order), *args, ends, False, False)
    with pytest.raises(RuntimeError, match="end offset"):
        op(x, order, *args, [e - 1 for e in ends], False, False)
    with pytest.raises(RuntimeError, match="fp32"):
        op(x, order, *args[:2], weights.double(), ends, False, False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(x.bfloat16(), order, *args, ends, False, False)
    with pytest.raises(RuntimeError, match="fp32 or bf16 only"):
        op(x.half(), order, args[0].half(), args[1].half(), weights, ends, False, False)


def test_build_finds_pips_ninja_when_the_venv_is_not_activated(tmp_path, monkeypatch):
    """torch runs `ninja` through PATH; pip puts it in the interpreter's scripts folder, which an unactivated
    venv does not have on PATH. The build puts that folder first, and PATH is restored afterwards."""
    import shutil
    import sysconfig

    scripts, elsewhere = tmp_path / "scripts", tmp_path / "elsewhere"
    for folder in (scripts, elsewhere):
        folder.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\n")
    (scripts / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", str(elsewhere))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(scripts))
    with cpu_ext._ninja_on_path():
        assert shutil.which("ninja") == str(scripts / "ninja")
    assert os.environ["PATH"] == str(elsewhere)
