// Grouped GEMM over expert-sorted rows on CPU, one oneDNN matmul per expert.
//
// Why: torch's CPU `_grouped_mm` runs each group through `at::mm`, which in fp32 is MKL's sgemm. On AMD CPUs
// MKL picks its AVX2 kernels, while oneDNN (already inside libtorch as `mkldnn::_linear_pointwise`) uses
// AVX-512 and is about twice as fast. In bf16 `at::mm` is already oneDNN and writes straight into the output.
// The loop over experts runs here, in C++, so Python sees one op per projection, and the experts are spread
// over the threads (parallel_over_experts), each expert's matmul single-threaded.

#include "grouped_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace shared_moe {
namespace {

// x (n, k) times w (m, k).T through oneDNN; w may be a strided view (a transpose costs nothing).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w) {
  using Scalars = c10::List<std::optional<at::Scalar>>;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, Scalars, std::optional<c10::string_view>)>();
  return op.call(x, w, std::nullopt, "none", Scalars(), std::nullopt);
}

}  // namespace

void linear_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  if (x.scalar_type() == at::kFloat) {
    out.copy_(onednn_linear(x, w));
  } else {
    at::mm_out(out, x, w.t());
  }
}

void check_ends(int64_t num_rows, at::IntArrayRef ends) {
  int64_t start = 0;
  for (const int64_t end : ends) {
    TORCH_CHECK(end >= start, "grouped GEMM: end offsets must be non-decreasing");
    start = end;
  }
  TORCH_CHECK(start == num_rows, "grouped GEMM: the last end offset must equal the number of rows");
}

namespace {

void check_groups(int64_t num_rows, const at::Tensor& rows, const at::Tensor& weight, at::IntArrayRef ends) {
  TORCH_CHECK(rows.dim() == 2 && weight.dim() == 3, "grouped GEMM: rows must be 2-D and weight 3-D (E, out, in)");
  TORCH_CHECK(rows.device().is_cpu() && weight.device().is_cpu(), "grouped GEMM (oneDNN): CPU tensors only");
  TORCH_CHECK(rows.scalar_type() == weight.scalar_type(), "grouped GEMM: rows and weight dtypes differ");
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == weight.size(0), "grouped GEMM: need one end offset per expert");
  check_ends(num_rows, ends);
}

void check_groups(const at::Tensor& rows, const at::Tensor& weight, at::IntArrayRef ends) {
  check_groups(rows.size(0), rows, weight, ends);
}

}  // namespace

void check_token_ids(const at::Tensor& x, const at::Tensor& token_ids) {
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.scalar_type() == at::kLong, "grouped GEMM: token ids must be 1-D int64");
  if (token_ids.numel() > 0) {
    TORCH_CHECK(token_ids.min().item<int64_t>() >= 0 && token_ids.max().item<int64_t>() < x.size(0),
                "grouped GEMM: token ids out of range");
  }
}

int64_t largest_group(at::IntArrayRef ends) {
  int64_t largest = 0;
  for_each_expert(ends, [&](int64_t, int64_t, int64_t count) { largest = std::max(largest, count); });
  return largest;
}

void zero_idle_experts(at::Tensor grad, at::IntArrayRef ends) {
  for_each_expert(ends, [&](int64_t e, int64_t, int64_t count) {
    if (count == 0) {
      grad.select(0, e).zero_();
    }
  });
}

int64_t worker_count() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

at::Tensor workspaces(int64_t workers, int64_t rows, int64_t width, const at::Tensor& like) {
  return at::empty({workers, rows, width}, like.options());
}

// Plain row copies: per expert, `index_select` costs more in dispatch than in copying.
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& token_ids, int64_t start, int64_t count,
                       at::Tensor& workspace) {
  const int64_t row_bytes = x.size(1) * x.element_size();
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(workspace.mutable_data_ptr());
  const int64_t* ids = token_ids.const_data_ptr<int64_t>() + start;
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(dst + i * row_bytes, src + ids[i] * row_bytes, row_bytes);
  }
  return workspace.narrow(0, 0, count);
}

namespace {

// out[rows of e] = rows[rows of e] @ weight[e].T, or @ weight[e] when transpose_weight (the input gradient).
at::Tensor grouped_linear(const at::Tensor& rows, const at::Tensor& weight, at::IntArrayRef ends,
                          bool transpose_weight) {
  check_groups(rows, weight, ends);
  const auto x = rows.contiguous();
  TORCH_CHECK(x.size(1) == (transpose_weight ? weight.size(1) : weight.size(2)), "grouped GEMM: inner sizes differ");
  auto out = at::empty({x.size(0), transpose_weight ? weight.size(2) : weight.size(1)}, x.options());
  parallel_over_experts(ends, worker_count(), [&](int64_t e, int64_t start, int64_t count, int64_t) {
    const auto w = transpose_weight ? weight.select(0, e).t() : weight.select(0, e);
    linear_into(out.narrow(0, start, count), x.narrow(0, start, count), w);
  });
  return out;
}

// grad[e] = dy[rows of e].T @ rows_of(start, count, worker), shape (E, out, in) like the weight; zero for idle
// experts. `x` gives the input rows' width and dtype; rows_of returns expert e's (count, in) input rows.
template <typename RowsOf>
at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x, at::IntArrayRef ends, int64_t workers,
                       RowsOf&& rows_of) {
  auto grad = at::empty({static_cast<int64_t>(ends.size()), dy.size(1), x.size(1)}, x.options());
  check_groups(dy.size(0), x, grad, ends);
  zero_idle_experts(grad, ends);
  parallel_over_experts(ends, workers, [&](int64_t e, int64_t start, int64_t count, int64_t worker) {
    linear_into(grad.select(0, e), dy.narrow(0, start, count).t(), rows_of(start, count, worker).t());
  });
  return grad;
}

// grad[e] = grad_out[rows of e].T @ rows[rows of e].
at::Tensor grouped_weight_grad(const at::Tensor& grad_out, const at::Tensor& rows, at::IntArrayRef ends) {
  TORCH_CHECK(grad_out.dim() == 2 && rows.dim() == 2 && grad_out.size(0) == rows.size(0),
              "grouped weight gradient: grad_out and rows must be 2-D with the same number of rows");
  TORCH_CHECK(grad_out.scalar_type() == rows.scalar_type(), "grouped weight gradient: dtypes differ");
  const auto x = rows.contiguous();
  return weight_grad(grad_out.contiguous(), x, ends, worker_count(), [&](int64_t start, int64_t count, int64_t) {
    return x.narrow(0, start, count);
  });
}

// Gathered variants: the expert rows are x[token_ids], gathered one expert at a time into a per-thread
// workspace of the largest expert's size, so the (rows, in) copy of x is never built in forward nor saved for backward (it is
// the biggest saved activation of a MoE layer). The input gradient of those rows exists only inside the
// backward op, which adds it into x's rows with one index_add.

// out[i] = x[token_ids[i]] @ weight[e].T for the rows i of expert e.
at::Tensor grouped_linear_gather(const at::Tensor& x_, const at::Tensor& token_ids_, const at::Tensor& weight,
                                 at::IntArrayRef ends) {
  const auto x = x_.contiguous();
  const auto token_ids = token_ids_.contiguous();
  check_groups(token_ids.numel(), x, weight, ends);
  check_token_ids(x, token_ids);
  TORCH_CHECK(x.size(1) == weight.size(2), "grouped GEMM: inner sizes differ");
  auto out = at::empty({token_ids.numel(), weight.size(1)}, x.options());
  const int64_t workers = worker_count();
  const auto rows = workspaces(workers, largest_group(ends), x.size(1), x);
  parallel_over_experts(ends, workers, [&](int64_t e, int64_t start, int64_t count, int64_t worker) {
    auto workspace = rows.select(0, worker);
    linear_into(out.narrow(0, start, count), gather_rows(x, token_ids, start, count, workspace), weight.select(0, e));
  });
  return out;
}

// grad_x[t] = sum over the rows i of token t of grad_out[i] @ weight[e(i)], added in row order (deterministic).
at::Tensor grouped_linear_scatter(const at::Tensor& grad_out_, const at::Tensor& token_ids_, const at::Tensor& weight,
                                  at::IntArrayRef ends, int64_t num_tokens) {
  const auto grad_out = grad_out_.contiguous();
  const auto token_ids = token_ids_.contiguous();
  check_groups(token_ids.numel(), grad_out, weight, ends);
  TORCH_CHECK(grad_out.size(0) == token_ids.numel() && grad_out.size(1) == weight.size(1),
              "grouped GEMM: grad_out must be (rows, out)");
  auto grad_x = at::zeros({num_tokens, weight.size(2)}, grad_out.options());
  check_token_ids(grad_x, token_ids);
  const auto grad_rows = grouped_linear(grad_out, weight, ends, /*transpose_weight=*/true);  // transient
  return grad_x.index_add_(0, token_ids, grad_rows);  // one call: per expert, its dispatch cost dominates
}

// grad[e] = grad_out[rows of e].T @ x[token_ids of e].
at::Tensor grouped_weight_grad_gather(const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& token_ids_,
                                     at::IntArrayRef ends) {
  const auto x = x_.contiguous();
  const auto token_ids = token_ids_.contiguous();
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == token_ids.numel() && grad_out.scalar_type() == x.scalar_type(),
              "grouped weight gradient: grad_out must be (rows, out) in x's dtype");
  check_token_ids(x, token_ids);
  check_ends(token_ids.numel(), ends);  // before sizing the workspaces from them
  const int64_t workers = worker_count();
  const auto rows = workspaces(workers, largest_group(ends), x.size(1), x);
  return weight_grad(grad_out.contiguous(), x, ends, workers, [&](int64_t start, int64_t count, int64_t worker) {
    auto workspace = rows.select(0, worker);
    return gather_rows(x, token_ids, start, count, workspace);
  });
}

}  // namespace
}  // namespace shared_moe

TORCH_LIBRARY(shared_moe, m) {
  m.def("grouped_linear(Tensor rows, Tensor weight, int[] ends, bool transpose_weight) -> Tensor");
  m.def("grouped_weight_grad(Tensor grad_out, Tensor rows, int[] ends) -> Tensor");
  m.def("grouped_linear_gather(Tensor x, Tensor token_ids, Tensor weight, int[] ends) -> Tensor");
  m.def("grouped_linear_scatter(Tensor grad_out, Tensor token_ids, Tensor weight, int[] ends, int num_tokens) -> Tensor");
  m.def("grouped_weight_grad_gather(Tensor grad_out, Tensor x, Tensor token_ids, int[] ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(shared_moe, CPU, m) {
  m.impl("grouped_linear", shared_moe::grouped_linear);
  m.impl("grouped_weight_grad", shared_moe::grouped_weight_grad);
  m.impl("grouped_linear_gather", shared_moe::grouped_linear_gather);
  m.impl("grouped_linear_scatter", shared_moe::grouped_linear_scatter);
  m.impl("grouped_weight_grad_gather", shared_moe::grouped_weight_grad_gather);
}
