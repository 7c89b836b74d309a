// Row kernels of the routed experts (moe_kernels_avx512.cpp), shared with the fused routed-experts op
// (routed_experts.cpp). Tensors are 2-D, row-contiguous (narrowed views are fine), fp32 or bf16, on an AVX-512
// CPU; every kernel computes in fp32 and rounds once to the tensor dtype.

#pragma once

#include <ATen/ATen.h>

namespace shared_moe {

// h = silu(gate) * up for rows laid out [gate | up]: gate_up (n, 2w) -> h (n, w).
void swiglu_into(const at::Tensor& gate_up, at::Tensor h);

// The gradient of swiglu_into: grad_h (n, w), gate_up (n, 2w) -> grad_gate_up (n, 2w).
void swiglu_backward_into(const at::Tensor& grad_h, const at::Tensor& gate_up, at::Tensor grad_gate_up);

// out[t] = sum_k weights[t, k] * rows[slots[t, k]] (fp32 weights, int64 slots, both (tokens, k)).
at::Tensor weighted_gather_sum(const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& weights);

// out[i] = row_weights[i] * grad[token_ids[i]] for the n rows of `out`; when `dots` is not null, also
// dots[i] = grad[token_ids[i]] . rows[i] (fp32), as weighted_gather_sum_backward computes them.
void scale_gathered_rows(const at::Tensor& grad, const int64_t* token_ids, const float* row_weights,
                         const at::Tensor& rows, at::Tensor out, float* dots);

// target[token_ids[i]] += rows[i] for i in order, into an fp32 target (index_add_ also sums bf16 in fp32).
// Threads split the columns, so repeated token ids stay deterministic.
void add_rows(at::Tensor target, const int64_t* token_ids, const at::Tensor& rows);

}  // namespace shared_moe
