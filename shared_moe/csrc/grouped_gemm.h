// Per-expert GEMM helpers shared by the grouped GEMM ops (grouped_gemm_onednn.cpp) and the fused routed
// experts (routed_experts.cpp). Rows are sorted by expert; `ends[e]` is one past expert e's last row.

#pragma once

#include <ATen/ATen.h>

namespace shared_moe {

// out = x @ w.T for x (n, k) and w (m, k), both possibly strided views: fp32 through oneDNN directly (torch's
// fp32 mm is MKL, AVX2-only on AMD), other dtypes through at::mm (oneDNN for bf16), written into `out`.
void linear_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w);

// Offsets must be non-decreasing and end at num_rows.
void check_ends(int64_t num_rows, at::IntArrayRef ends);

// token_ids: 1-D int64, every id a row of x.
void check_token_ids(const at::Tensor& x, const at::Tensor& token_ids);

// The rows of the largest expert: the size of a per-expert workspace.
int64_t largest_group(at::IntArrayRef ends);

// The rows x[token_ids[start : start + count]] (x contiguous), copied into the front of `workspace`.
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& token_ids, int64_t start, int64_t count,
                       at::Tensor& workspace);

// body(e, start, count) for each expert e in order, with its rows [start, start + count) (count may be 0).
template <typename Body>
void for_each_expert(at::IntArrayRef ends, Body&& body) {
  int64_t start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(ends.size()); ++e) {
    body(e, start, ends[e] - start);
    start = ends[e];
  }
}

}  // namespace shared_moe
