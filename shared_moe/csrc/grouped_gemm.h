// Per-expert GEMM helpers shared by the grouped GEMM ops (grouped_gemm_onednn.cpp) and the fused routed
// experts (routed_experts.cpp). Rows are sorted by expert; `ends[e]` is one past expert e's last row.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

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

// Zeroes the (E, out, in) weight gradient's slices of idle experts; the callers write every busy expert's slice.
void zero_idle_experts(at::Tensor grad, at::IntArrayRef ends);

// Threads for parallel_over_experts: 1 when already inside a parallel region.
int64_t worker_count();

// Per-worker scratch rows: (workers, rows, width), one slice per worker.
at::Tensor workspaces(int64_t workers, int64_t rows, int64_t width, const at::Tensor& like);

// Calls body(e, start, count, worker) once for every expert with rows. The threads take experts from a shared
// cursor, largest first, so the big ones do not pile up at the end. Each expert's oneDNN matmuls and row kernels
// then run single-threaded inside this parallel region (no nested parallelism): no thread waits at a barrier
// after every small per-expert call. `worker` in [0, workers) indexes the caller's per-thread workspaces.
template <typename Body>
void parallel_over_experts(at::IntArrayRef ends, int64_t workers, Body&& body) {
  std::vector<int64_t> starts(ends.size()), busy;
  for_each_expert(ends, [&](int64_t e, int64_t start, int64_t count) {
    starts[e] = start;
    if (count > 0) {
      busy.push_back(e);
    }
  });
  const auto count_of = [&](int64_t e) { return ends[e] - starts[e]; };
  std::stable_sort(busy.begin(), busy.end(), [&](int64_t a, int64_t b) { return count_of(a) > count_of(b); });
  std::atomic<size_t> cursor{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // grad mode is per thread: workers start with it on
    for (int64_t worker = begin; worker < end; ++worker) {
      for (size_t i = cursor++; i < busy.size(); i = cursor++) {
        body(busy[i], starts[busy[i]], count_of(busy[i]), worker);
      }
    }
  });
}

}  // namespace shared_moe
