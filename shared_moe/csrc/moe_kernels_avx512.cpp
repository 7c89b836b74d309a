// Fused element-wise kernels of the routed experts on CPU, forward and backward, in AVX-512.
//
// Why: around the grouped GEMMs, torch needs several passes over the (tokens * top_k, width) activations:
// `silu`, `mul`, and in backward `silu_backward`, two `mul`s and a `cat`; the combine needs an `index_copy`
// and a batched (1 x K) @ (K x d) `bmm`, whose per-token calls are slow on CPU. Each kernel below makes one
// pass, computes in fp32 and rounds once to the tensor dtype (fp32 or bf16, round to nearest even).
//
// Only AVX-512 code is here (`target` attributes, so the library still loads on other CPUs); Python checks
// `torch.backends.cpu.get_cpu_capability()` and uses plain torch ops elsewhere, and every op checks again.

#include "expert_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <tuple>
#include <vector>

#define SHARED_MOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace shared_moe {
namespace {

// Full vectors take plain loads and stores (masked stores are slow on some AMD cores); the row tail is masked.
SHARED_MOE_AVX512 inline __m512 load(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

SHARED_MOE_AVX512 inline __m512 load(const c10::BFloat16* p, __mmask16 m) {
  const __m256i half = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
  const __m512i wide = _mm512_cvtepu16_epi32(half);
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

SHARED_MOE_AVX512 inline void store(float* p, __m512 v, __mmask16 m) {
  if (m == 0xFFFF) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
SHARED_MOE_AVX512 inline void store(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i half = _mm512_cvtepi32_epi16(rounded);
  if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half);
  } else {
    _mm256_mask_storeu_epi16(p, m, half);
  }
}

// e^x to about 2 ulp: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, times 2^n by scalef.
SHARED_MOE_AVX512 inline __m512 exp(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 result = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(result, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN in, NaN out
}

SHARED_MOE_AVX512 inline __m512 sigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
}

// h = silu(g) * u for one row; g and u are the two halves of a gate_up row.
template <typename T>
SHARED_MOE_AVX512 void swiglu_row(const T* g, const T* u, T* h, int64_t width) {
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = tail_mask(width - j);
    const __m512 gv = load(g + j, m);
    store(h + j, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), load(u + j, m)), m);
  }
}

// dg = dh * u * s * (1 + g (1 - s)), du = dh * g * s, with s = sigmoid(g).
template <typename T>
SHARED_MOE_AVX512 void swiglu_backward_row(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t width) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = tail_mask(width - j);
    const __m512 gv = load(g + j, m), uv = load(u + j, m), dv = load(dh + j, m);
    const __m512 s = sigmoid(gv);
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    store(dg + j, _mm512_mul_ps(_mm512_mul_ps(dv, uv), dsilu), m);
    store(du + j, _mm512_mul_ps(dv, _mm512_mul_ps(gv, s)), m);
  }
}

// out[t] = sum_k weights[t, k] * rows[slots[t, k]], summed in fp32 in k order.
template <typename T>
SHARED_MOE_AVX512 void gather_sum_row(const T* rows, const int64_t* slots, const float* weights, T* out, int64_t top_k,
                                      int64_t width) {
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = tail_mask(width - j);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < top_k; ++k) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(weights[k]), load(rows + slots[k] * width + j, m), acc);
    }
    store(out + j, acc, m);
  }
}

// out = w * grad and *dot = grad . row over one row of `width`.
template <typename T>
SHARED_MOE_AVX512 void scale_row_and_dot(const T* grad, const T* row, float w, T* out, float* dot, int64_t width) {
  const __m512 wv = _mm512_set1_ps(w);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = tail_mask(width - j);
    const __m512 gv = load(grad + j, m);
    if (dot != nullptr) {
      acc = _mm512_fmadd_ps(gv, load(row + j, m), acc);
    }
    store(out + j, _mm512_mul_ps(wv, gv), m);
  }
  if (dot != nullptr) {
    *dot = _mm512_reduce_add_ps(acc);
  }
}

// target[j] += row[j] for j in [begin, end), into an fp32 target.
template <typename T>
SHARED_MOE_AVX512 void add_row(float* target, const T* row, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; j += 16) {
    const __mmask16 m = tail_mask(end - j);
    store(target + j, _mm512_add_ps(load(target + j, m), load(row + j, m)), m);
  }
}

// grad_rows[slots[t, k]] = weights[t, k] * grad[t]; grad_weights[t, k] = grad[t] . rows[slots[t, k]].
template <typename T>
SHARED_MOE_AVX512 void gather_sum_backward_row(const T* grad, const T* rows, const int64_t* slots, const float* weights,
                                               T* grad_rows, float* grad_weights, int64_t top_k, int64_t width) {
  for (int64_t k = 0; k < top_k; ++k) {
    scale_row_and_dot(grad, rows + slots[k] * width, weights[k], grad_rows + slots[k] * width, grad_weights + k, width);
  }
}

template <typename F>
void dispatch_fp32_bf16(const at::Tensor& t, const char* name, F&& body) {
  TORCH_CHECK(t.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl"),
              name, ": this CPU lacks AVX-512 (F, BW, VL)");
  if (t.scalar_type() == at::kFloat) {
    body(float{});
  } else if (t.scalar_type() == at::kBFloat16) {
    body(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, name, ": fp32 or bf16 only, got ", t.scalar_type());
  }
}

constexpr int64_t kRowGrain = 32;  // rows per task: a few KB of work, enough to amortise a thread hand-off
constexpr int64_t kColumnGrain = 64;  // columns per task when threads split the columns

void check_rows(const at::Tensor& t, int64_t rows, int64_t width, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width && t.is_contiguous() &&
                  t.scalar_type() == like.scalar_type(),
              name, ": expected a contiguous (", rows, ", ", width, ") tensor of dtype ", like.scalar_type());
}

}  // namespace

void swiglu_into(const at::Tensor& gate_up, at::Tensor h) {
  const int64_t width = h.size(1);
  check_rows(gate_up, h.size(0), 2 * width, h, "swiglu");
  check_rows(h, h.size(0), width, h, "swiglu");
  dispatch_fp32_bf16(h, "swiglu", [&](auto tag) {
    using T = decltype(tag);
    const T* in = gate_up.const_data_ptr<T>();
    T* out = h.mutable_data_ptr<T>();
    at::parallel_for(0, h.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        swiglu_row(in + r * 2 * width, in + r * 2 * width + width, out + r * width, width);
      }
    });
  });
}

void swiglu_backward_into(const at::Tensor& grad_h, const at::Tensor& gate_up, at::Tensor grad_gate_up) {
  const int64_t rows = grad_h.size(0), width = grad_h.size(1);
  check_rows(grad_h, rows, width, gate_up, "swiglu_backward");
  check_rows(gate_up, rows, 2 * width, gate_up, "swiglu_backward");
  check_rows(grad_gate_up, rows, 2 * width, gate_up, "swiglu_backward");
  dispatch_fp32_bf16(gate_up, "swiglu_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* in = gate_up.const_data_ptr<T>();
    const T* d = grad_h.const_data_ptr<T>();
    T* out = grad_gate_up.mutable_data_ptr<T>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = r * 2 * width;
        swiglu_backward_row(d + r * width, in + row, in + row + width, out + row, out + row + width, width);
      }
    });
  });
}

void scale_gathered_rows(const at::Tensor& grad, const int64_t* token_ids, const float* row_weights,
                         const at::Tensor& rows, at::Tensor out, float* dots) {
  const int64_t width = out.size(1);
  check_rows(out, out.size(0), width, grad, "scale_gathered_rows");
  check_rows(grad, grad.size(0), width, grad, "scale_gathered_rows");
  if (dots != nullptr) {
    check_rows(rows, out.size(0), width, grad, "scale_gathered_rows");
  }
  dispatch_fp32_bf16(grad, "scale_gathered_rows", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = grad.const_data_ptr<T>();
    const T* rp = dots != nullptr ? rows.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, out.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scale_row_and_dot(gp + token_ids[i] * width, rp == nullptr ? nullptr : rp + i * width, row_weights[i],
                          op + i * width, dots == nullptr ? nullptr : dots + i, width);
      }
    });
  });
}

void add_rows(at::Tensor target, const int64_t* token_ids, const at::Tensor& rows) {
  const int64_t width = target.size(1);
  TORCH_CHECK(target.scalar_type() == at::kFloat && target.is_contiguous(), "add_rows: the target must be contiguous fp32");
  check_rows(rows, rows.size(0), width, rows, "add_rows");
  dispatch_fp32_bf16(rows, "add_rows", [&](auto tag) {
    using T = decltype(tag);
    float* tp = target.mutable_data_ptr<float>();
    const T* rp = rows.const_data_ptr<T>();
    at::parallel_for(0, width, kColumnGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = 0; i < rows.size(0); ++i) {
        add_row(tp + token_ids[i] * width, rp + i * width, begin, end);
      }
    });
  });
}

namespace {

at::Tensor swiglu(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "swiglu: gate_up must be (rows, 2 * width)");
  const auto x = gate_up.contiguous();
  auto h = at::empty({x.size(0), x.size(1) / 2}, x.options());
  swiglu_into(x, h);
  return h;
}

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && grad.dim() == 2 && grad.size(0) == gate_up.size(0) &&
                  2 * grad.size(1) == gate_up.size(1) && grad.scalar_type() == gate_up.scalar_type(),
              "swiglu_backward: grad must be (rows, width) for gate_up (rows, 2 * width), same dtype");
  const auto x = gate_up.contiguous();
  auto grad_gate_up = at::empty_like(x);
  swiglu_backward_into(grad.contiguous(), x, grad_gate_up);
  return grad_gate_up;
}

void check_gather(const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& weights) {
  TORCH_CHECK(rows.dim() == 2 && slots.dim() == 2 && weights.sizes() == slots.sizes(),
              "weighted_gather_sum: rows (n, d), slots and weights (tokens, k)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "weighted_gather_sum: slots must be int64 and weights fp32");
  TORCH_CHECK(slots.numel() == rows.size(0), "weighted_gather_sum: need exactly one slot per row");
  if (slots.numel() > 0) {
    TORCH_CHECK(slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < rows.size(0),
                "weighted_gather_sum: slots out of range");
  }
}

}  // namespace

at::Tensor weighted_gather_sum(const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& weights) {
  check_gather(rows, slots, weights);
  const auto r = rows.contiguous();
  const auto s = slots.contiguous();
  const auto w = weights.contiguous();
  const int64_t top_k = s.size(1), width = r.size(1);
  auto out = at::empty({s.size(0), width}, r.options());
  dispatch_fp32_bf16(r, "weighted_gather_sum", [&](auto tag) {
    using T = decltype(tag);
    const T* in = r.const_data_ptr<T>();
    const int64_t* sp = s.const_data_ptr<int64_t>();
    const float* wp = w.const_data_ptr<float>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, s.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        gather_sum_row(in, sp + t * top_k, wp + t * top_k, op + t * width, top_k, width);
      }
    });
  });
  return out;
}

namespace {

// Slots must be a permutation of the rows (each row read by exactly one token), so every grad row is written once.
std::tuple<at::Tensor, at::Tensor> weighted_gather_sum_backward(const at::Tensor& grad, const at::Tensor& rows,
                                                                const at::Tensor& slots, const at::Tensor& weights) {
  check_gather(rows, slots, weights);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == slots.size(0) && grad.size(1) == rows.size(1) &&
                  grad.scalar_type() == rows.scalar_type(),
              "weighted_gather_sum_backward: grad must be (tokens, d) in the rows' dtype");
  const auto g = grad.contiguous();
  const auto r = rows.contiguous();
  const auto s = slots.contiguous();
  const auto w = weights.contiguous();
  const int64_t top_k = s.size(1), width = r.size(1);
  std::vector<bool> seen(r.size(0), false);  // grad_rows starts uninitialised: every row must be written once
  for (const int64_t slot : c10::ArrayRef<int64_t>(s.const_data_ptr<int64_t>(), s.numel())) {
    TORCH_CHECK(!seen[slot], "weighted_gather_sum_backward: slots must be a permutation of the rows");
    seen[slot] = true;
  }
  auto grad_rows = at::empty_like(r);
  auto grad_weights = at::empty_like(w);
  dispatch_fp32_bf16(r, "weighted_gather_sum_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.const_data_ptr<T>();
    const T* in = r.const_data_ptr<T>();
    const int64_t* sp = s.const_data_ptr<int64_t>();
    const float* wp = w.const_data_ptr<float>();
    T* grp = grad_rows.mutable_data_ptr<T>();
    float* gwp = grad_weights.mutable_data_ptr<float>();
    at::parallel_for(0, s.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        gather_sum_backward_row(gp + t * width, in, sp + t * top_k, wp + t * top_k, grp, gwp + t * top_k, top_k, width);
      }
    });
  });
  return {grad_rows, grad_weights};
}

}  // namespace
}  // namespace shared_moe

TORCH_LIBRARY_FRAGMENT(shared_moe, m) {
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("weighted_gather_sum(Tensor rows, Tensor slots, Tensor weights) -> Tensor");
  m.def("weighted_gather_sum_backward(Tensor grad, Tensor rows, Tensor slots, Tensor weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shared_moe, CPU, m) {
  m.impl("swiglu", shared_moe::swiglu);
  m.impl("swiglu_backward", shared_moe::swiglu_backward);
  m.impl("weighted_gather_sum", shared_moe::weighted_gather_sum);
  m.impl("weighted_gather_sum_backward", shared_moe::weighted_gather_sum_backward);
}
