// The routed experts of one MoE layer as a single CPU op, forward and backward, in fp32 and bf16.
//
// Why: as separate grouped ops, each stage (gate_up GEMM, SwiGLU, down GEMM, combine) writes a
// (tokens * top_k, width) tensor to memory and the next stage reads it back. Backward also allocates five such
// tensors fresh every step, and glibc maps multi-MB blocks anew, so the kernel zeroes and maps every page again
// (about 1 us per 4 KB page on the VMs we measured); and every small per-expert call is split over all threads,
// which then wait at a barrier. Here each thread takes whole experts and runs each one's rows through all the
// stages in its own small workspaces, which stay in L2 cache. The only large allocations are the outputs, in
// forward the activations that backward needs, and in backward the rows' input gradients. The arithmetic is
// the same per-expert oneDNN matmuls and row kernels as the separate ops (grouped_gemm.h, expert_kernels.h),
// and the input gradient is summed in the same order, so both give bit-identical results, with one caveat:
// here every oneDNN call is single-threaded, and in bf16 oneDNN splits the reduction of a large expert's
// weight gradient (about 2048 rows and more) over threads, so those can differ in the last bit from the
// separate ops run on several threads. They match the separate ops run on one thread.
//
// `order` sorts the flat (token, k) slots by expert: sorted row i is slot order[i], token order[i] / top_k.
// `ends[e]` is one past expert e's last sorted row.

#include "expert_kernels.h"
#include "grouped_gemm.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace shared_moe {
namespace {

// The sorted rows' token ids, routing weights and the slots' inverse (slots[order[i]] = i), from checked inputs.
struct Routing {
  at::Tensor token_ids;  // (rows,) int64
  at::Tensor slots;      // (tokens, top_k) int64
  std::vector<float> row_weights;
};

Routing check_and_route(const at::Tensor& x, const at::Tensor& order, const at::Tensor& gate_up_proj,
                        const at::Tensor& down_proj, const at::Tensor& weights, at::IntArrayRef ends) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "routed_experts: x must be a 2-D CPU tensor (tokens, hidden)");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == x.size(0) && weights.scalar_type() == at::kFloat,
              "routed_experts: weights must be fp32 (tokens, top_k)");
  TORCH_CHECK(gate_up_proj.dim() == 3 && down_proj.dim() == 3 && gate_up_proj.size(0) == down_proj.size(0) &&
                  gate_up_proj.size(2) == x.size(1) && down_proj.size(1) == x.size(1) &&
                  gate_up_proj.size(1) == 2 * down_proj.size(2),
              "routed_experts: expected gate_up_proj (E, 2I, hidden) and down_proj (E, hidden, I)");
  TORCH_CHECK(gate_up_proj.scalar_type() == x.scalar_type() && down_proj.scalar_type() == x.scalar_type(),
              "routed_experts: x and the expert weights must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "routed_experts: fp32 or bf16 only, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0 && down_proj.size(2) > 0, "routed_experts: hidden and expert widths must be positive");
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == gate_up_proj.size(0), "routed_experts: one end offset per expert");
  const int64_t rows = weights.numel(), top_k = weights.size(1);
  TORCH_CHECK(order.dim() == 1 && order.numel() == rows && order.scalar_type() == at::kLong,
              "routed_experts: order must be int64 with one entry per (token, k) slot");
  check_ends(rows, ends);
  Routing routing{at::empty({rows}, order.options()), at::empty({x.size(0), top_k}, order.options()), {}};
  routing.row_weights.resize(rows);
  const auto o = order.contiguous();
  const auto w = weights.contiguous();
  const int64_t* op = o.const_data_ptr<int64_t>();
  const float* wp = w.const_data_ptr<float>();
  int64_t* tp = routing.token_ids.mutable_data_ptr<int64_t>();
  int64_t* sp = routing.slots.mutable_data_ptr<int64_t>();
  std::vector<bool> seen(rows, false);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t slot = op[i];
    TORCH_CHECK(slot >= 0 && slot < rows && !seen[slot], "routed_experts: order must be a permutation of the slots");
    seen[slot] = true;
    sp[slot] = i;
    tp[i] = slot / top_k;
    routing.row_weights[i] = wp[slot];
  }
  return routing;
}

// Returns (out, gate_up, h, down): out (tokens, hidden) is the weighted sum of each token's expert outputs;
// gate_up, h = swiglu(gate_up) and down are the sorted rows' activations. gate_up and h are kept only when
// asked for (backward needs gate_up for the input and gate_up_proj gradients, h for down_proj's); otherwise
// they live in per-worker workspaces and come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_experts(
    const at::Tensor& x_, const at::Tensor& order, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& weights, at::IntArrayRef ends, bool keep_gate_up, bool keep_h) {
  const auto x = x_.contiguous();
  const Routing routing = check_and_route(x, order, gate_up_proj, down_proj, weights, ends);
  const int64_t rows = order.numel(), hidden = x.size(1), width = down_proj.size(2), largest = largest_group(ends);
  const int64_t workers = worker_count();
  auto gate_up = at::empty({keep_gate_up ? rows : 0, 2 * width}, x.options());
  auto h = at::empty({keep_h ? rows : 0, width}, x.options());
  auto down = at::empty({rows, hidden}, x.options());
  const auto x_rows = workspaces(workers, largest, hidden, x);
  const auto gate_up_rows = workspaces(keep_gate_up ? 0 : workers, largest, 2 * width, x);
  const auto h_rows = workspaces(keep_h ? 0 : workers, largest, width, x);
  parallel_over_experts(ends, workers, [&](int64_t e, int64_t start, int64_t count, int64_t worker) {
    auto x_ws = x_rows.select(0, worker);
    const auto expert_gate_up = keep_gate_up ? gate_up.narrow(0, start, count)
                                             : gate_up_rows.select(0, worker).narrow(0, 0, count);
    const auto expert_h = keep_h ? h.narrow(0, start, count) : h_rows.select(0, worker).narrow(0, 0, count);
    linear_into(expert_gate_up, gather_rows(x, routing.token_ids, start, count, x_ws), gate_up_proj.select(0, e));
    swiglu_into(expert_gate_up, expert_h);
    linear_into(down.narrow(0, start, count), expert_h, down_proj.select(0, e));
  });
  auto out = weighted_gather_sum(down, routing.slots, weights.contiguous());
  return {out, gate_up, h, down};
}

// Gradients for (x, gate_up_proj, down_proj, weights); `needs` says which to compute (the others come back
// undefined, None in Python). gate_up, h and down are routed_experts' saved activations.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_experts_backward(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& order, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& gate_up_, const at::Tensor& h_,
    const at::Tensor& down_, at::IntArrayRef ends, std::array<bool, 4> needs) {
  const auto x = x_.contiguous();
  const Routing routing = check_and_route(x, order, gate_up_proj, down_proj, weights, ends);
  const bool needs_x = needs[0], needs_gate_up_proj = needs[1], needs_down_proj = needs[2], needs_weights = needs[3];
  const int64_t rows = order.numel(), hidden = x.size(1), width = down_proj.size(2), largest = largest_group(ends);
  TORCH_CHECK(grad_.sizes() == x.sizes() && grad_.scalar_type() == x.scalar_type(),
              "routed_experts_backward: grad must match x");
  const bool needs_h_grad = needs_x || needs_gate_up_proj;
  const auto is_rows = [&](const at::Tensor& t, int64_t cols) {
    return t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.scalar_type() == x.scalar_type();
  };
  TORCH_CHECK(!needs_h_grad || is_rows(gate_up_, 2 * width),
              "routed_experts_backward: gate_up must be the saved (rows, 2I) activations");
  TORCH_CHECK(!needs_down_proj || is_rows(h_, width),
              "routed_experts_backward: h must be the saved (rows, I) activations");
  TORCH_CHECK(!needs_weights || is_rows(down_, hidden),
              "routed_experts_backward: down must be the saved (rows, hidden) activations");
  const auto grad = grad_.contiguous();
  const auto gate_up = gate_up_.contiguous();
  const auto h = h_.contiguous();
  const auto down = down_.contiguous();
  at::Tensor grad_gate_up_proj, grad_down_proj;
  if (needs_gate_up_proj) {
    grad_gate_up_proj = at::empty_like(gate_up_proj);
    zero_idle_experts(grad_gate_up_proj, ends);
  }
  if (needs_down_proj) {
    grad_down_proj = at::empty_like(down_proj);
    zero_idle_experts(grad_down_proj, ends);
  }
  // Each row's input gradient, added into x's rows after the parallel part, in row order (as index_add_ does).
  auto grad_x_rows = at::empty({needs_x ? rows : 0, hidden}, x.options());
  std::vector<float> dots(needs_weights ? rows : 0);
  const int64_t workers = worker_count();
  const auto grad_down_ws = workspaces(workers, largest, hidden, x);
  const auto grad_h_ws = workspaces(needs_h_grad ? workers : 0, largest, width, x);
  const auto grad_gate_up_ws = workspaces(needs_h_grad ? workers : 0, largest, 2 * width, x);
  const auto x_ws = workspaces(needs_gate_up_proj ? workers : 0, largest, hidden, x);
  const int64_t* token_ids = routing.token_ids.const_data_ptr<int64_t>();
  parallel_over_experts(ends, workers, [&](int64_t e, int64_t start, int64_t count, int64_t worker) {
    const auto grad_down = grad_down_ws.select(0, worker).narrow(0, 0, count);
    scale_gathered_rows(grad, token_ids + start, routing.row_weights.data() + start,
                        needs_weights ? down.narrow(0, start, count) : grad_down, grad_down,
                        needs_weights ? dots.data() + start : nullptr);
    if (needs_down_proj) {
      linear_into(grad_down_proj.select(0, e), grad_down.t(), h.narrow(0, start, count).t());
    }
    if (!needs_h_grad) {
      return;
    }
    const auto grad_h = grad_h_ws.select(0, worker).narrow(0, 0, count);
    const auto grad_gate_up = grad_gate_up_ws.select(0, worker).narrow(0, 0, count);
    linear_into(grad_h, grad_down, down_proj.select(0, e).t());
    swiglu_backward_into(grad_h, gate_up.narrow(0, start, count), grad_gate_up);
    if (needs_gate_up_proj) {
      auto x_rows = x_ws.select(0, worker);
      linear_into(grad_gate_up_proj.select(0, e), grad_gate_up.t(),
                  gather_rows(x, routing.token_ids, start, count, x_rows).t());
    }
    if (needs_x) {
      linear_into(grad_x_rows.narrow(0, start, count), grad_gate_up, gate_up_proj.select(0, e).t());
    }
  });
  at::Tensor grad_x;
  if (needs_x) {  // summed in fp32 and rounded once, like index_add_ in bf16
    grad_x = at::zeros(x.sizes(), x.options().dtype(at::kFloat));
    add_rows(grad_x, token_ids, grad_x_rows);
    if (x.scalar_type() != at::kFloat) {
      grad_x = grad_x.to(x.scalar_type());
    }
  }
  at::Tensor grad_weights;
  if (needs_weights) {
    grad_weights = at::empty(weights.sizes(), weights.options());
    float* gw = grad_weights.mutable_data_ptr<float>();
    const int64_t* slots = routing.slots.const_data_ptr<int64_t>();
    for (int64_t slot = 0; slot < rows; ++slot) {
      gw[slot] = dots[slots[slot]];
    }
  }
  return {grad_x, grad_gate_up_proj, grad_down_proj, grad_weights};
}

}  // namespace
}  // namespace shared_moe

TORCH_LIBRARY_FRAGMENT(shared_moe, m) {
  m.def("routed_experts(Tensor x, Tensor order, Tensor gate_up_proj, Tensor down_proj, Tensor weights, int[] ends, "
        "bool keep_gate_up, bool keep_h) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("routed_experts_backward(Tensor grad, Tensor x, Tensor order, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor weights, Tensor gate_up, Tensor h, Tensor down, int[] ends, bool[4] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shared_moe, CPU, m) {
  m.impl("routed_experts", shared_moe::routed_experts);
  m.impl("routed_experts_backward", shared_moe::routed_experts_backward);
}
