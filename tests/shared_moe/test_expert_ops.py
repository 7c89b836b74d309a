"""Fused SwiGLU and combine kernels (AVX-512 C++) against the plain torch ops they replace, values and gradients."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from shared_moe import expert_ops
from shared_moe.expert_ops import combine, fused_kernels_available, swiglu
from shared_moe.moe import Experts

requires_fused = pytest.mark.skipif(
    shutil.which("c++") is None
    or shutil.which("ninja") is None
    or torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="the fused expert kernels need an AVX-512 CPU and a C++ compiler",
)
pytestmark = requires_fused


@pytest.fixture
def torch_only(monkeypatch):
    """Run expert_ops on its plain-torch path."""
    monkeypatch.setattr(expert_ops, "use_fused_kernels", lambda x: False)


def reference_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return F.silu(gate) * up


def bf16_ulps(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (same-sign values)."""
    as_int = lambda t: t.to(torch.bfloat16).view(torch.int16).int()  # noqa: E731
    return (as_int(got) - as_int(expected)).abs()


@pytest.mark.parametrize("width", [16, 20, 37, 256])  # full vectors, masked tails, a real expert width
def test_fused_swiglu_matches_torch_in_fp32_with_gradients(width):
    assert fused_kernels_available()
    gate_up = (torch.randn(33, 2 * width, generator=torch.Generator().manual_seed(width)) * 4).requires_grad_()
    got = swiglu(gate_up)
    assert got.grad_fn is not None and "FusedSwiGLU" in type(got.grad_fn).__name__
    expected = reference_swiglu(gate_up)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(got)
    (grad,) = torch.autograd.grad((got * upstream).sum(), gate_up)
    (ref,) = torch.autograd.grad((expected * upstream).sum(), gate_up)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


def test_fused_swiglu_rounds_bf16_once_to_nearest_even():
    gate_up = torch.randn(64, 2 * 40, generator=torch.Generator().manual_seed(3)).mul(3).bfloat16()
    got = swiglu(gate_up)
    assert got.dtype == torch.bfloat16
    exact = reference_swiglu(gate_up)  # fp32 math on the same bf16 inputs
    ulps = bf16_ulps(got, exact)
    assert ulps.max() <= 1  # the fp32 results differ by ulps; rounding them can land one bf16 step apart
    assert (ulps == 0).float().mean() > 0.99


def test_fused_swiglu_bf16_backward_close_to_fp32():
    gate_up = torch.randn(48, 2 * 24, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
    upstream = torch.randn(48, 24, generator=torch.Generator().manual_seed(5)).bfloat16()
    (grad,) = torch.autograd.grad((swiglu(gate_up) * upstream).float().sum(), gate_up)
    exact = gate_up.detach().float().requires_grad_()
    (ref,) = torch.autograd.grad((reference_swiglu(exact) * upstream.float()).sum(), exact)
    torch.testing.assert_close(grad.float(), ref, rtol=8e-3, atol=1e-3)


def test_fused_swiglu_propagates_nan_and_inf_like_torch():
    gate = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -100.0, 100.0, 1e-30, 3.0] * 3)
    gate_up = torch.cat([gate, torch.ones_like(gate)]).view(1, -1)
    torch.testing.assert_close(swiglu(gate_up), F.silu(gate).view(1, -1), equal_nan=True)


def routing(tokens: int, top_k: int, experts: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    order = torch.argsort(indices.reshape(-1), stable=True)
    weights = torch.rand(tokens, top_k, generator=gen)
    return order, weights


@pytest.mark.parametrize("top_k,width", [(1, 16), (6, 40), (8, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_combine_matches_torch_path_with_gradients(top_k, width, dtype, monkeypatch):
    order, weights = routing(tokens=37, top_k=top_k)
    rows = torch.randn(len(order), width, generator=torch.Generator().manual_seed(1)).to(dtype)
    upstream = torch.randn(37, width, generator=torch.Generator().manual_seed(2)).to(dtype)

    def run():
        r, w = rows.clone().requires_grad_(), weights.clone().requires_grad_()
        out = combine(r, order, w)
        return (out, *torch.autograd.grad((out.float() * upstream.float()).sum(), [r, w]))

    assert "FusedWeightedGatherSum" in type(combine(rows.requires_grad_(), order, weights).grad_fn).__name__
    fused = run()
    monkeypatch.setattr(expert_ops, "use_fused_kernels", lambda x: False)
    plain = run()
    # fp32: only the summation order differs. bf16: the torch path rounds weights and each product to bf16.
    tol = dict(rtol=1e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * top_k)
    for got, expected in zip(fused, plain):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), **tol)


def test_fused_combine_is_deterministic_and_exact_for_one_hot_weights():
    order, weights = routing(tokens=50, top_k=4, seed=7)
    rows = torch.randn(len(order), 24, generator=torch.Generator().manual_seed(8))
    assert torch.equal(combine(rows, order, weights), combine(rows, order, weights))
    one_hot = torch.zeros_like(weights)
    one_hot[:, 2] = 1.0
    picked = torch.empty_like(rows).index_copy_(0, order, rows).view(50, 4, 24)[:, 2]
    assert torch.equal(combine(rows, order, one_hot), picked)


def test_fused_ops_check_their_arguments():
    ops = torch.ops.shared_moe
    rows = torch.randn(6, 16)
    with pytest.raises(RuntimeError, match="slots out of range"):
        ops.weighted_gather_sum(rows, torch.tensor([[0, 1], [2, 6], [3, 4]]), torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="one slot per row"):
        ops.weighted_gather_sum(rows, torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="permutation of the rows"):
        ops.weighted_gather_sum_backward(torch.randn(3, 16), rows, torch.tensor([[0, 1], [1, 2], [3, 4]]),
                                         torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.swiglu(torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="2 \\* width"):
        ops.swiglu(torch.randn(4, 7))


def test_swiglu_takes_any_leading_shape():
    gate_up = torch.randn(2, 3, 16)
    torch.testing.assert_close(swiglu(gate_up), reference_swiglu(gate_up))


def test_fused_ops_handle_no_rows():
    assert swiglu(torch.empty(0, 32)).shape == (0, 16)
    assert combine(torch.empty(0, 8), torch.empty(0, dtype=torch.long), torch.empty(0, 3)).shape == (0, 8)


def run_experts(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """Output and every gradient (input, routing weights, both expert weights) of one fwd+bwd, in fp32."""
    experts.zero_grad(set_to_none=True)
    xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts(xg, indices, wg)
    out.float().square().sum().backward()
    return [t.float() for t in (out, xg.grad, wg.grad, *(p.grad for p in experts.parameters()))]


def test_experts_layer_same_with_and_without_fused_kernels_fp32(monkeypatch):
    experts, x, indices, weights = experts_case(torch.float32)
    assert fused_kernels_available()  # so the first run below does take the fused path
    fused = run_experts(experts, x, indices, weights)
    monkeypatch.setattr(expert_ops, "use_fused_kernels", lambda x: False)
    for got, expected in zip(fused, run_experts(experts, x, indices, weights)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_experts_layer_in_bf16_as_accurate_as_torch_ops(monkeypatch):
    """Against fp32 math on the same bf16 weights and inputs, as relative Frobenius errors (both about 0.5%)."""
    experts, x, indices, weights = experts_case(torch.bfloat16)
    exact = run_experts(copy.deepcopy(experts).float(), x.float(), indices, weights)
    fused = run_experts(experts, x, indices, weights)
    monkeypatch.setattr(expert_ops, "use_fused_kernels", lambda x: False)
    plain = run_experts(experts, x, indices, weights)
    for f, p, e in zip(fused, plain, exact):
        fused_error, plain_error = ((f - e).norm() / e.norm()).item(), ((p - e).norm() / e.norm()).item()
        assert fused_error < 0.01 and fused_error < 1.5 * plain_error


def experts_case(dtype: torch.dtype):
    torch.manual_seed(0)
    experts = Experts(num_experts=8, hidden_size=32, intermediate_size=24)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(40, 32)
    _, weights = routing(tokens=40, top_k=3)
    indices = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:3] for i in range(40)])
    return experts.to(dtype), x.to(dtype), indices, weights


def test_torch_func_forward_ad_and_autocast_take_the_torch_path(monkeypatch):
    gate_up = torch.randn(5, 12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(gate_up, torch.ones_like(gate_up))
        tangent = torch.autograd.forward_ad.unpack_dual(swiglu(dual)).tangent  # no jvp in the fused kernels
    torch.testing.assert_close(tangent, torch.func.jvp(reference_swiglu, (gate_up,), (torch.ones_like(gate_up),))[1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not expert_ops.use_fused_kernels(gate_up)
    monkeypatch.undo()
    grads = torch.func.grad(lambda t: swiglu(t).sum())(gate_up)  # the fused Function has no vmap/func rule
    torch.testing.assert_close(grads, torch.func.grad(lambda t: reference_swiglu(t).sum())(gate_up))
    assert not expert_ops.use_fused_kernels(torch.randn(2, 2).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not expert_ops.use_fused_kernels(gate_up)


def test_cpus_without_avx512_take_the_torch_path():
    code = (
        "import torch; from shared_moe import expert_ops; "
        "assert not expert_ops.fused_kernels_available(); "
        "g = torch.randn(4, 8, requires_grad=True); expert_ops.swiglu(g).sum().backward(); print('ok')"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_double_backward_through_fused_ops_matches_torch_path(monkeypatch):
    """Gradient penalties need create_graph=True; the fused backwards then run differentiable torch ops."""
    experts, x, indices, weights = experts_case(torch.float32)
    experts.gemm_backend = "grouped_mm"  # the oneDNN grouped GEMM is once-differentiable

    def penalty_grads():
        experts.zero_grad(set_to_none=True)
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(experts(xg, indices, wg).square().sum(), xg, create_graph=True)
        grad_x.square().sum().backward()
        return [xg.grad, wg.grad, *(p.grad for p in experts.parameters())]

    fused = penalty_grads()
    monkeypatch.setattr(expert_ops, "use_fused_kernels", lambda x: False)
    for got, expected in zip(fused, penalty_grads()):  # second-order terms: fp32 rounding grows to ~1e-4
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4 * expected.abs().max().item())
