"""Grouped GEMM kernels against a per-expert matmul loop: outputs, gradients, idle experts, bad offsets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from shared_moe import gemm
from shared_moe.gemm import Linear, grouped_linear, linear, onednn_available, pick_backend

# The oneDNN grouped GEMM is a C++ op built on first use; machines without a compiler fall back (tested below).
requires_onednn = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                     reason="the oneDNN grouped GEMM op needs a C++ compiler and ninja")
COUNTS = [3, 0, 5, 1, 0, 7]  # idle experts in the middle and at the end, one single-row expert


def per_expert_reference(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([chunk @ w.T for chunk, w in zip(x.split(counts), weight)])


def inputs(in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor(COUNTS)
    x = torch.randn(int(counts.sum()), in_features, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(len(COUNTS), out_features, in_features, generator=gen).to(dtype).requires_grad_()
    return x, weight, counts, counts.cumsum(0).to(torch.int32)


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=requires_onednn), "grouped_mm", "padded_bmm"])
def test_backends_match_per_expert_matmuls_with_gradients(backend):
    x, weight, counts, offsets = inputs(16, 24)
    got = grouped_linear(x, weight, counts, offsets, backend)
    expected = per_expert_reference(x, weight, COUNTS)
    assert (got - expected).abs().max() < 1e-5
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((got * upstream).sum(), [x, weight])
    ref = torch.autograd.grad((expected * upstream).sum(), [x, weight])
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and (g.is_contiguous() or backend != "onednn")  # oneDNN: in the weight's layout
        assert (g - r).abs().max() < 1e-5
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))  # an idle expert gets an exact zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=requires_onednn), "grouped_mm", "padded_bmm"])
def test_gathered_rows_match_an_explicit_gather_with_gradients(backend, dtype):
    """The oneDNN kernel gathers x[token_ids] per expert and adds the input gradient into x's rows directly."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 16, generator=gen).to(dtype).requires_grad_()
    token_ids = torch.randint(0, 7, (sum(COUNTS),), generator=gen)  # tokens repeat across experts, as with top-k
    _, weight, counts, offsets = inputs(16, 24, dtype)
    got = gemm.grouped_linear_gathered(x, token_ids, weight, counts, offsets, backend)
    expected = per_expert_reference(x[token_ids], weight, COUNTS)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(got, expected, **tol)
    upstream = torch.randn(got.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad((got * upstream).float().sum(), [x, weight])
    ref = torch.autograd.grad((expected * upstream).float().sum(), [x, weight])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **tol)


@requires_onednn
def test_gathered_op_rejects_token_ids_out_of_range():
    assert onednn_available()
    x, weight = torch.randn(4, 16), torch.randn(len(COUNTS), 24, 16)
    ends = torch.tensor(COUNTS).cumsum(0).tolist()
    with pytest.raises(RuntimeError, match="token ids out of range"):
        torch.ops.shared_moe.grouped_linear_gather(x, torch.full((sum(COUNTS),), 4), weight, ends)


@requires_onednn
def test_onednn_matches_grouped_mm_at_moe_layer_shapes():
    """Same rows, same weights, the two kernels the auto choice alternates between (fp32 CPU vs the rest)."""
    gen = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.randint(0, 16, (600,), generator=gen), minlength=16)
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(600, 128, generator=gen)
    weight = torch.randn(16, 64, 128, generator=gen) * 0.1
    onednn = grouped_linear(x, weight, counts, offsets, "onednn")
    grouped = grouped_linear(x, weight, counts, offsets, "grouped_mm")
    assert (onednn - grouped).abs().max() < 1e-5


@requires_onednn
def test_auto_picks_onednn_on_cpu_and_grouped_mm_or_padded_bmm_elsewhere():
    x, weight, *_ = inputs(16, 24)
    assert pick_backend(x, weight) == "onednn"
    assert pick_backend(x.bfloat16(), weight.bfloat16()) == "onednn"
    assert pick_backend(x.half(), weight.half()) == "grouped_mm"
    assert pick_backend(x.detach()[:, :15].half(), weight.detach()[:, :, :15].half()) == "padded_bmm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pick_backend(x.bfloat16(), weight.bfloat16()) == "grouped_mm"
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        pick_backend(x, weight, "cutlass")


@requires_onednn
def test_onednn_op_rejects_offsets_that_do_not_cover_the_rows():
    assert onednn_available()  # loads torch.ops.shared_moe when this test runs alone
    x, weight, *_ = inputs(16, 24)
    with pytest.raises(RuntimeError, match="last end offset"):
        torch.ops.shared_moe.grouped_linear(x.detach(), weight.detach(), [3, 3, 8, 9, 9, 15], False)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.shared_moe.grouped_linear(x.detach(), weight.detach(), [3, 2, 8, 9, 9, 16], False)
    with pytest.raises(RuntimeError, match="one end offset per expert"):
        torch.ops.shared_moe.grouped_linear(x.detach(), weight.detach(), [16], False)


@requires_onednn
def test_onednn_op_builds_where_a_compiler_exists():
    """Guards the fallback: without this, a broken build would silently cost the 2x on AMD CPUs."""
    assert onednn_available()


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the products that went through oneDNN (so a test can tell which kernel ran)."""
    calls = []
    real = gemm._onednn_linear

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(gemm, "_onednn_linear", counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_nn_linear_forward_and_backward(bias, onednn_calls):
    torch.manual_seed(0)
    ours = Linear(256, 320, bias=bias)
    reference = torch.nn.Linear(256, 320, bias=bias)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 40, 256, requires_grad=True)  # 9.8M multiply-adds: over the oneDNN threshold
    got, expected = ours(x), reference(x)
    assert got.shape == (3, 40, 320) and (got - expected).abs().max() < 1e-4
    assert len(onednn_calls) == 1
    upstream = torch.randn(got.shape)
    grads = torch.autograd.grad((got * upstream).sum(), [x, *ours.parameters()])
    ref = torch.autograd.grad((expected * upstream).sum(), [x, *reference.parameters()])
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and (g - r).abs().max() < 1e-4
    assert len(onednn_calls) == 3  # forward, input gradient, weight gradient


def test_linear_with_a_strided_bias_and_empty_inputs(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(200, 256, generator=gen), torch.randn(320, 256, generator=gen)
    bias = torch.randn(640, generator=gen)[::2]  # oneDNN reads bias memory as contiguous; linear must not pass this
    assert (linear(x, weight, bias) - torch.nn.functional.linear(x, weight, bias)).abs().max() < 1e-4
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    assert linear(torch.zeros(0, 256), weight).shape == (0, 320)
    assert linear(torch.zeros(5, 0), torch.zeros(3, 0)).shape == (5, 3)


def test_linear_supports_double_backward_and_torch_func(onednn_calls):
    torch.manual_seed(0)
    ours = Linear(256, 320)
    reference = torch.nn.Linear(256, 320)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(40, 256, requires_grad=True)

    def gradient_penalty(layer):
        (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), layer.weight)[0]

    assert (gradient_penalty(ours) - gradient_penalty(reference)).abs().max() < 1e-2
    assert onednn_calls  # the first-order forward did go through oneDNN
    params = dict(ours.named_parameters())
    per_sample = torch.func.vmap(torch.func.grad(
        lambda p, row: torch.func.functional_call(ours, p, (row[None],)).sum()), in_dims=(None, 0))(params, x[:4])
    assert per_sample["weight"].shape == (4, 320, 256)
    assert torch.allclose(per_sample["bias"], torch.ones(4, 320))


def test_linear_keeps_f_linear_outside_cpu_fp32_and_for_tiny_products():
    layer = Linear(256, 320).bfloat16()
    x = torch.randn(3, 40, 256).bfloat16()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    tiny = Linear(8, 4)
    x = torch.randn(5, 8)
    assert torch.equal(tiny(x), torch.nn.functional.linear(x, tiny.weight, tiny.bias))


def test_cpu_autocast_keeps_its_dtype_choice():
    layer = Linear(256, 320)
    x = inputs(16, 24)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 40, 256)).dtype == torch.bfloat16
        assert pick_backend(x, torch.zeros(6, 24, 16)) != "onednn"


def test_without_a_compiler_the_experts_fall_back_to_grouped_mm(tmp_path):
    """A machine that cannot build the op warns once and still computes the same experts."""
    script = (
        "import torch, warnings\n"
        "from shared_moe.moe import Experts\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    experts = Experts(4, 32, 16)\n"
        "    torch.nn.init.normal_(experts.gate_up_proj); torch.nn.init.normal_(experts.down_proj)\n"
        "    x = torch.randn(10, 32); idx = torch.randint(0, 4, (10, 2)); w = torch.rand(10, 2)\n"
        "    auto = experts(x, idx, w)\n"
        "    experts.gemm_backend = 'grouped_mm'\n"
        "    assert torch.equal(auto, experts(x, idx, w))\n"
        "assert sum('C++ CPU ops unavailable' in str(w.message) for w in caught) == 1, caught\n"
        "print('fell back')\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fell back" in done.stdout, done.stderr[-2000:]
    assert "compiling its C++ CPU ops on first use" in done.stderr  # a fresh cache announces the build


@requires_onednn
def test_onednn_handles_no_rows_at_all():
    x = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(3, 8, 16, requires_grad=True)
    counts = torch.zeros(3, dtype=torch.long)
    out = grouped_linear(x, weight, counts, counts.cumsum(0).to(torch.int32), "onednn")
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and x.grad.shape == (0, 16)


def test_compiled_fp32_grouped_gemm_avoids_grouped_mm():
    """torch._grouped_mm's meta kernel takes only bf16/fp16, so "auto" must not trace it in fp32."""
    torch._dynamo.reset()
    x, weight, counts, offsets = inputs(16, 24)
    compiled = torch.compile(grouped_linear, backend="aot_eager")
    got = compiled(x.detach(), weight.detach(), counts, offsets)
    assert (got - per_expert_reference(x, weight, COUNTS)).abs().max() < 1e-5


def test_explicit_grouped_mm_on_unaligned_widths_names_padded_bmm():
    """30 fp32 values are 120 bytes, not a multiple of 16: torch would fail with a bare stride error."""
    x, weight, counts, offsets = inputs(30, 24)
    with pytest.raises(ValueError, match=r'shape \(6, 24, 30\).*not aligned.*in_features=30.*"padded_bmm"'):
        grouped_linear(x, weight, counts, offsets, "grouped_mm")
    got = grouped_linear(x, weight, counts, offsets, "padded_bmm")
    assert (got - per_expert_reference(x, weight, COUNTS)).abs().max() < 1e-5
