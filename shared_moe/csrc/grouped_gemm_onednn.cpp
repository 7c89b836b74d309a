// Grouped GEMM over expert-sorted rows on CPU, one oneDNN matmul per expert.
//
// Why: torch's CPU `_grouped_mm` runs each group through `at::mm`, which in fp32 is MKL's sgemm. On AMD CPUs
// MKL picks its AVX2 kernels, while oneDNN (already inside libtorch as `mkldnn::_linear_pointwise`) uses
// AVX-512 and is about twice as fast. In bf16 `at::mm` is already oneDNN and writes straight into the output.
// Rows are sorted by expert; `ends[e]` is one past expert e's last row. The loop over experts runs here, in
// C++, so Python sees one op per projection.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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

// out = x @ w.T: fp32 through oneDNN directly (torch's fp32 mm is MKL), other dtypes through at::mm (oneDNN for
// bf16), which writes into `out` without a copy.
void linear_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  if (x.scalar_type() == at::kFloat) {
    out.copy_(onednn_linear(x, w));
  } else {
    at::mm_out(out, x, w.t());
  }
}

void check_groups(const at::Tensor& rows, const at::Tensor& weight, at::IntArrayRef ends) {
  TORCH_CHECK(rows.dim() == 2 && weight.dim() == 3, "grouped GEMM: rows must be 2-D and weight 3-D (E, out, in)");
  TORCH_CHECK(rows.device().is_cpu() && weight.device().is_cpu(), "grouped GEMM (oneDNN): CPU tensors only");
  TORCH_CHECK(rows.scalar_type() == weight.scalar_type(), "grouped GEMM: rows and weight dtypes differ");
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == weight.size(0), "grouped GEMM: need one end offset per expert");
  int64_t start = 0;
  for (const int64_t end : ends) {
    TORCH_CHECK(end >= start, "grouped GEMM: end offsets must be non-decreasing");
    start = end;
  }
  TORCH_CHECK(start == rows.size(0), "grouped GEMM: the last end offset must equal the number of rows");
}

// out[rows of e] = rows[rows of e] @ weight[e].T, or @ weight[e] when transpose_weight (the input gradient).
at::Tensor grouped_linear(const at::Tensor& rows, const at::Tensor& weight, at::IntArrayRef ends,
                          bool transpose_weight) {
  check_groups(rows, weight, ends);
  const auto x = rows.contiguous();
  TORCH_CHECK(x.size(1) == (transpose_weight ? weight.size(1) : weight.size(2)), "grouped GEMM: inner sizes differ");
  auto out = at::empty({x.size(0), transpose_weight ? weight.size(2) : weight.size(1)}, x.options());
  int64_t start = 0;
  for (int64_t e = 0; e < weight.size(0); ++e) {
    const int64_t count = ends[e] - start;
    if (count > 0) {
      const auto w = transpose_weight ? weight.select(0, e).t() : weight.select(0, e);
      linear_into(out.narrow(0, start, count), x.narrow(0, start, count), w);
    }
    start = ends[e];
  }
  return out;
}

// grad[e] = grad_out[rows of e].T @ rows[rows of e], shape (E, out, in) like the weight; zero for idle experts.
at::Tensor grouped_weight_grad(const at::Tensor& grad_out, const at::Tensor& rows, at::IntArrayRef ends) {
  TORCH_CHECK(grad_out.dim() == 2 && rows.dim() == 2 && grad_out.size(0) == rows.size(0),
              "grouped weight gradient: grad_out and rows must be 2-D with the same number of rows");
  TORCH_CHECK(grad_out.scalar_type() == rows.scalar_type(), "grouped weight gradient: dtypes differ");
  const auto dy = grad_out.contiguous();
  const auto x = rows.contiguous();
  auto grad = at::empty({static_cast<int64_t>(ends.size()), dy.size(1), x.size(1)}, x.options());
  check_groups(x, grad, ends);
  int64_t start = 0;
  for (int64_t e = 0; e < grad.size(0); ++e) {
    const int64_t count = ends[e] - start;
    if (count > 0) {
      linear_into(grad.select(0, e), dy.narrow(0, start, count).t(), x.narrow(0, start, count).t());
    } else {
      grad.select(0, e).zero_();
    }
    start = ends[e];
  }
  return grad;
}

}  // namespace

TORCH_LIBRARY(shared_moe, m) {
  m.def("grouped_linear(Tensor rows, Tensor weight, int[] ends, bool transpose_weight) -> Tensor");
  m.def("grouped_weight_grad(Tensor grad_out, Tensor rows, int[] ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(shared_moe, CPU, m) {
  m.impl("grouped_linear", grouped_linear);
  m.impl("grouped_weight_grad", grouped_weight_grad);
}
