// Input-sparse linear on CPU: y[t] = sum over active inputs i of x[t, i] * wt[i, :] (+ bias).
//
// wt is the weight TRANSPOSED to (in, out) and contiguous, so every active input is one contiguous row to stream
// and every skipped input is a row never read. Threads split the active rows (split-K), each accumulates into its
// own float32 buffer, and the buffers are summed at the end. bfloat16 rows are widened to float32 in registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Measured crossover (docs/PERFORMANCE.md): up to 8 tokens the gather beats MKL's masked dense matmul even when
// the union keeps every row (one token: 1.3-2x faster than at::linear on either layout, float32 and bfloat16;
// for 2..8 tokens MKL packs the whole weight first); from 16 tokens dense wins.
constexpr int64_t kMaxUnionTokens = 8;
constexpr int64_t kParallelBytes = 1 << 18;   // below ~256 KiB of rows a thread fork costs more than it saves

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// acc[t, :] += sum_k xs[t, k] * wt[idx[k], :] for k in [k0, k1); four rows at a time to cut accumulator traffic.
template <typename W>
void accumulate_rows(const W* wt, int64_t out, const int64_t* idx, const float* xs, int64_t n, int64_t tokens,
                     int64_t k0, int64_t k1, float* acc) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const W* r0 = wt + idx[k] * out;
    const W* r1 = wt + idx[k + 1] * out;
    const W* r2 = wt + idx[k + 2] * out;
    const W* r3 = wt + idx[k + 3] * out;
    for (int64_t t = 0; t < tokens; ++t) {
      const float* xt = xs + t * n + k;
      const float a0 = xt[0], a1 = xt[1], a2 = xt[2], a3 = xt[3];
      float* at = acc + t * out;
#pragma omp simd
      for (int64_t j = 0; j < out; ++j)
        at[j] += a0 * widen(r0[j]) + a1 * widen(r1[j]) + a2 * widen(r2[j]) + a3 * widen(r3[j]);
    }
  }
  for (; k < k1; ++k) {
    const W* r = wt + idx[k] * out;
    for (int64_t t = 0; t < tokens; ++t) {
      const float a = xs[t * n + k];
      float* at = acc + t * out;
#pragma omp simd
      for (int64_t j = 0; j < out; ++j) at[j] += a * widen(r[j]);
    }
  }
}

// The union of the tokens' masks as row indices, and each token's masked values compacted onto them, then the
// gather of those rows.
template <typename W>
at::Tensor gather_rows(const at::Tensor& x2, const at::Tensor& wt, const std::optional<at::Tensor>& bias,
                       const float* thr, bool per_token) {
  const int64_t tokens = x2.size(0), in = x2.size(1), out = wt.size(1);
  const W* x = x2.data_ptr<W>();
  std::vector<int64_t> idx;
  idx.reserve(in);
  for (int64_t i = 0; i < in; ++i) {
    int64_t live = 0;
    for (int64_t t = 0; t < tokens; ++t) live += std::fabs(widen(x[t * in + i])) > thr[per_token ? t : 0];
    if (live) idx.push_back(i);
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  std::vector<float> xs(tokens * n);
  for (int64_t t = 0; t < tokens; ++t) {
    const float limit = thr[per_token ? t : 0];
    for (int64_t k = 0; k < n; ++k) {
      const float v = widen(x[t * in + idx[k]]);
      xs[t * n + k] = std::fabs(v) > limit ? v : 0.0f;
    }
  }
  const int64_t row_bytes = out * static_cast<int64_t>(sizeof(W));
  const int threads = n * row_bytes >= kParallelBytes ? at::get_num_threads() : 1;
  std::vector<float> acc(static_cast<size_t>(threads) * tokens * out, 0.0f);
  const W* w = wt.data_ptr<W>();
  const int64_t chunk = (n + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      accumulate_rows(w, out, idx.data(), xs.data(), n, tokens, p * chunk, std::min(n, (p + 1) * chunk),
                      acc.data() + p * tokens * out);
  });
  at::Tensor y = at::empty({tokens, out}, x2.options());
  W* yp = y.data_ptr<W>();
  const float* b = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->to(at::kFloat).contiguous();
    b = bias_f.data_ptr<float>();
  }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < out; ++j) {
      float s = b ? b[j] : 0.0f;
      for (int p = 0; p < threads; ++p) s += acc[(p * tokens + t) * out + j];
      yp[t * out + j] = static_cast<W>(s);
    }
  return y;
}

// y = F.linear(x * (|x| > threshold), weight, bias); threshold, when given, holds one value or one per token, else
// scalar_threshold applies.
// `weight` (out, in) serves the masked dense matmul beyond kMaxUnionTokens, `wt` (the same values as (in, out)) the gather.
at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& wt,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& threshold, double scalar_threshold) {
  // The op's contract, as kernels.check_call states it for the other backends.
  TORCH_CHECK_VALUE(wt.dim() == 2 && wt.is_contiguous() && x.size(-1) == wt.size(0),
                    "sparse_linear needs weight_t as a contiguous (in, out) matrix with in = ", x.size(-1),
                    "; call ops.sparse_linear, which routes other layouts to the reference.");
  TORCH_CHECK_VALUE(x.scalar_type() == wt.scalar_type(), "sparse_linear needs x and weight_t in one dtype.");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "sparse_linear on the CPU takes float32 or bfloat16, not ", x.scalar_type(), ".");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t tokens = x2.size(0);
  const bool given = threshold.has_value() && threshold->defined();
  TORCH_CHECK_VALUE(!given || threshold->numel() == 1 || threshold->numel() == tokens,
                    "sparse_linear needs one threshold for all tokens or one per token; got ",
                    given ? threshold->numel() : 0, " values for ", tokens, " tokens.");
  const bool per_token = given && threshold->numel() == tokens && tokens > 1;
  std::vector<float> thr(per_token ? tokens : 1);
  if (given) {  // a 0-dim threshold compares in x's dtype, as torch compares x with it
    const at::Tensor rounded = threshold->dim() == 0 ? threshold->to(x.scalar_type()) : *threshold;
    const at::Tensor t = rounded.reshape({-1}).to(at::kFloat).contiguous();
    std::memcpy(thr.data(), t.data_ptr<float>(), thr.size() * sizeof(float));
  } else {  // compared in x's dtype, like the reference `x.abs() > threshold`
    thr[0] = x.scalar_type() == at::kBFloat16 ? static_cast<float>(c10::BFloat16(static_cast<float>(scalar_threshold)))
                                              : static_cast<float>(scalar_threshold);
  }
  at::Tensor y;
  if (tokens <= kMaxUnionTokens) {
    y = x.scalar_type() == at::kBFloat16 ? gather_rows<c10::BFloat16>(x2, wt, bias, thr.data(), per_token)
                                         : gather_rows<float>(x2, wt, bias, thr.data(), per_token);
  } else {
    const at::Tensor limit = given ? (per_token ? threshold->reshape({tokens, 1}) : *threshold)
                                   : at::scalar_tensor(scalar_threshold, x.options());
    y = at::linear(x2 * (x2.abs() > limit), weight, bias);
  }
  auto shape = x.sizes().vec();
  shape.back() = wt.size(1);
  return y.view(shape);
}

template <typename W>
void dot_rows(const at::Tensor& x2, const at::Tensor& weight, const float* bias, const bool* keep, at::Tensor& y) {
  const int64_t tokens = x2.size(0), in = x2.size(1), out = weight.size(0);
  std::vector<float> xf(tokens * in);
  const W* x = x2.data_ptr<W>();
  for (int64_t i = 0; i < tokens * in; ++i) xf[i] = widen(x[i]);
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < out; ++j) {
    bool any = false;
    for (int64_t t = 0; t < tokens; ++t) any |= keep[t * out + j];
    if (any) rows.push_back(j);
  }
  const W* w = weight.data_ptr<W>();
  W* yp = y.data_ptr<W>();
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / (in * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j = rows[r];
      const W* wr = w + j * in;
      for (int64_t t = 0; t < tokens; ++t) {
        if (!keep[t * out + j]) continue;
        const float* xt = xf.data() + t * in;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < in; ++i) s += xt[i] * widen(wr[i]);
        yp[t * out + j] = static_cast<W>(s + (bias ? bias[j] : 0.0f));
      }
    }
  });
}

// y = F.linear(x, weight, bias) * keep, reading only the kept rows of the (out, in) weight (CATS' up projection).
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& keep) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(), "rows_linear needs weight as a contiguous (out, in) matrix.");
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                    "rows_linear on the CPU takes float32 or bfloat16 in one dtype, not ", x.scalar_type(), ".");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  const at::Tensor keep2 = keep.expand(shape).reshape({x2.size(0), weight.size(0)}).to(at::kBool).contiguous();
  at::Tensor y = at::zeros({x2.size(0), weight.size(0)}, x.options());
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kBFloat16)
    dot_rows<c10::BFloat16>(x2, weight, b, keep2.data_ptr<bool>(), y);
  else
    dot_rows<float>(x2, weight, b, keep2.data_ptr<bool>(), y);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_lab, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("rows_linear", &rows_linear);
}
