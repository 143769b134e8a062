// The CPU ops' launchers: input-sparse linear, output-sparse rows, the dense (out, in) GEMV of the tied lm_head and
// the bandwidth probe. The vector work runs in the kernels of the CPU's widest instruction set (vector_kernels.h),
// chosen at run time; SPARSE_LAB_ISA (scalar, avx2, avx512, avx512_bf16) narrows the choice, and the
// sparse_lab::vector_path op reads or changes it (the tests run every path the CPU has).
//
// sparse_linear: y[t] = sum over active inputs i of x[t, i] * wt[i, :] (+ bias). wt is the weight TRANSPOSED to
// (in, out) and contiguous, so every active input is one contiguous row to stream and every skipped input is a row
// never read. Threads split the active rows (split-K), each accumulates into its own float32 buffer, and the buffers
// are summed at the end.
#include "vector_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparse_lab::VectorKernels;

// The vector paths, narrowest first: vector_path's numbers (off x86 only the first exists).
#if defined(__x86_64__) || defined(__i386__)
const VectorKernels* const kPaths[] = {&sparse_lab::kScalarKernels, &sparse_lab::kAvx2Kernels,
                                       &sparse_lab::kAvx512Kernels, &sparse_lab::kAvx512Bf16Kernels};
#else
const VectorKernels* const kPaths[] = {&sparse_lab::kScalarKernels, &sparse_lab::kScalarKernels,
                                       &sparse_lab::kScalarKernels, &sparse_lab::kScalarKernels};
#endif

int64_t widest_supported() {
#if !(defined(__x86_64__) || defined(__i386__))
  return 0;  // the vector files are x86's; other CPUs run the portable path
#else
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#endif
}

int64_t initial_path() {
  const int64_t widest = widest_supported();
  const char* asked = std::getenv("SPARSE_LAB_ISA");
  if (asked == nullptr || *asked == 0) return widest;
  for (int64_t p = 0; p < 4; ++p)
    if (std::string(asked) == kPaths[p]->name) return std::min(p, widest);
  TORCH_WARN("SPARSE_LAB_ISA=", asked, " is not one of scalar, avx2, avx512, avx512_bf16; using ",
             kPaths[widest]->name, ".");
  return widest;
}

std::atomic<int64_t>& active_path() {
  static std::atomic<int64_t> path{initial_path()};
  return path;
}

const VectorKernels& vec() { return *kPaths[active_path().load(std::memory_order_relaxed)]; }

// want < 0: which path runs now; else switch to `want` (narrowed to what this CPU has). Returns the active path.
int64_t vector_path(int64_t want) {
  if (want >= 0) active_path().store(std::min(want, widest_supported()));
  return active_path().load();
}

// Measured crossover (docs/PERFORMANCE.md): up to this many tokens the gather beats MKL's masked dense matmul even
// when the union keeps every row (MKL packs the whole weight first). Its one definition is kernels.UNION_TOKENS,
// which cpu_native passes to the build.
#ifndef SPARSE_LAB_UNION_TOKENS
#error "build through sparse_core.kernels.cpu_native, which defines SPARSE_LAB_UNION_TOKENS"
#endif
constexpr int64_t kMaxUnionTokens = SPARSE_LAB_UNION_TOKENS;
using sparse_lab::kParallelBytes;

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The union of the tokens' masks as row indices, and each token's masked values compacted onto them, then
// `gather(idx, xs, n, share, shares, partial sums)` over those rows (each `row_bytes` long) by a team of threads;
// y in X, x's dtype.
template <typename X, typename Gather>
at::Tensor gather_rows(const at::Tensor& x2, int64_t out, int64_t row_bytes, const std::optional<at::Tensor>& bias,
                       const float* thr, bool per_token, Gather gather) {
  const int64_t tokens = x2.size(0), in = x2.size(1);
  const X* x = x2.data_ptr<X>();
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
  const int threads = n * row_bytes >= kParallelBytes ? at::get_num_threads() : 1;
  std::vector<float> acc(static_cast<size_t>(threads) * tokens * out, 0.0f);
  at::parallel_for(0, threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) gather(idx.data(), xs.data(), n, p, threads, acc.data() + p * tokens * out);
  });
  at::Tensor y = at::empty({tokens, out}, x2.options());
  X* yp = y.data_ptr<X>();
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
      yp[t * out + j] = static_cast<X>(s);
    }
  return y;
}

// The thresholds of a call as float32, one for all tokens or one per token (per_token): `threshold` when given (a
// 0-dim one compares in x's dtype, as torch compares x with it), else scalar_threshold, compared in x's dtype like
// the reference `x.abs() > threshold` (kernels.comparable's rule).
std::vector<float> thresholds_of(const at::Tensor& x, int64_t tokens, const std::optional<at::Tensor>& threshold,
                                 double scalar_threshold, const char* op, bool* per_token) {
  const bool given = threshold.has_value() && threshold->defined();
  TORCH_CHECK_VALUE(!given || threshold->numel() == 1 || threshold->numel() == tokens, op,
                    " needs one threshold for all tokens or one per token; got ", given ? threshold->numel() : 0,
                    " values for ", tokens, " tokens.");
  *per_token = given && threshold->numel() == tokens && tokens > 1;
  std::vector<float> thr(*per_token ? tokens : 1);
  if (given) {
    const at::Tensor rounded = threshold->dim() == 0 ? threshold->to(x.scalar_type()) : *threshold;
    const at::Tensor t = rounded.reshape({-1}).to(at::kFloat).contiguous();
    std::memcpy(thr.data(), t.data_ptr<float>(), thr.size() * sizeof(float));
  } else {
    thr[0] = x.scalar_type() == at::kBFloat16 ? static_cast<float>(c10::BFloat16(static_cast<float>(scalar_threshold)))
                                              : static_cast<float>(scalar_threshold);
  }
  return thr;
}

// x masked by its thresholds, for the masked dense matmul beyond kMaxUnionTokens.
at::Tensor masked(const at::Tensor& x2, const std::optional<at::Tensor>& threshold, double scalar_threshold,
                  bool per_token) {
  const bool given = threshold.has_value() && threshold->defined();
  const at::Tensor limit = given ? (per_token ? threshold->reshape({x2.size(0), 1}) : *threshold)
                                 : at::scalar_tensor(scalar_threshold, x2.options());
  return x2 * (x2.abs() > limit);
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
  const int64_t tokens = x2.size(0), out = wt.size(1);
  bool per_token = false;
  const std::vector<float> thr = thresholds_of(x, tokens, threshold, scalar_threshold, "sparse_linear", &per_token);
  at::Tensor y;
  const VectorKernels& k = vec();
  if (tokens > kMaxUnionTokens) {
    y = at::linear(masked(x2, threshold, scalar_threshold, per_token), weight, bias);
  } else if (x.scalar_type() == at::kBFloat16) {
    const auto* w = reinterpret_cast<const sparse_lab::bf16_bits*>(wt.data_ptr<c10::BFloat16>());
    y = gather_rows<c10::BFloat16>(x2, out, out * 2, bias, thr.data(), per_token,
                                   [&](const int64_t* idx, const float* xs, int64_t n, int64_t p, int64_t shares,
                                       float* part) { k.gather_bf16(w, out, idx, xs, n, tokens, p, shares, part); });
  } else {
    const float* w = wt.data_ptr<float>();
    y = gather_rows<float>(x2, out, out * 4, bias, thr.data(), per_token,
                           [&](const int64_t* idx, const float* xs, int64_t n, int64_t p, int64_t shares, float* part) {
                             k.gather_f32(w, out, idx, xs, n, tokens, p, shares, part);
                           });
  }
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

// y = F.linear(x * (|x| > threshold), W, bias) for the int8 weight W[o, i] = q[i, o] * scales[i / kScaleBlock, o]
// (quantize.py), x in float32: the gather reads the int8 rows of the active inputs and their blocks' scale rows.
at::Tensor sparse_linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& threshold,
                              double scalar_threshold) {
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar && q.size(0) == in,
                    "sparse_linear_int8 needs q as contiguous int8 (in, out) rows with in = ", in, ".");
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kFloat &&
                        scales.size(0) == (in + sparse_lab::kScaleBlock - 1) / sparse_lab::kScaleBlock &&
                        scales.size(1) == q.size(1),
                    "sparse_linear_int8 needs float32 scales, one row per ", sparse_lab::kScaleBlock,
                    " inputs and one column per output.");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "sparse_linear_int8 takes float32 activations, not ",
                    x.scalar_type(), ".");
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const int64_t tokens = x2.size(0), out = q.size(1);
  bool per_token = false;
  const std::vector<float> thr =
      thresholds_of(x, tokens, threshold, scalar_threshold, "sparse_linear_int8", &per_token);
  at::Tensor y;
  if (tokens > kMaxUnionTokens) {
    const at::Tensor weight =
        (q.to(at::kFloat) * scales.repeat_interleave(sparse_lab::kScaleBlock, 0).slice(0, 0, in)).t();
    y = at::linear(masked(x2, threshold, scalar_threshold, per_token), weight, bias);
  } else {
    const int8_t* w = q.data_ptr<int8_t>();
    const float* s = scales.data_ptr<float>();
    const VectorKernels& k = vec();
    y = gather_rows<float>(x2, out, out, bias, thr.data(), per_token,
                           [&](const int64_t* idx, const float* xs, int64_t n, int64_t p, int64_t shares, float* part) {
                             k.gather_int8(w, s, out, out, idx, xs, n, tokens, p, shares, part);
                           });
  }
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

// y[t, j] = dot(weight[j, :], x[t, :]) for the rows j in `rows` (null: all) where keep[t, j] (null: all), else 0;
// float32, the caller adds the bias and casts. Threads split the rows.
at::Tensor dot_rows(const at::Tensor& x2, const at::Tensor& weight, const std::vector<int64_t>* rows, const bool* keep) {
  const int64_t tokens = x2.size(0), in = x2.size(1), out = weight.size(0);
  const bool bf16 = x2.scalar_type() == at::kBFloat16;
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  at::Tensor y = keep ? at::zeros({tokens, out}, xf.options()) : at::empty({tokens, out}, xf.options());
  const int64_t count = rows ? static_cast<int64_t>(rows->size()) : out;
  const int64_t row_bytes = in * static_cast<int64_t>(weight.element_size());
  const int64_t grain = std::max<int64_t>(4, kParallelBytes / row_bytes / 4 * 4);
  const VectorKernels& k = vec();
  const int64_t* picked = rows ? rows->data() : nullptr;
  float* yp = y.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, (count + 3) / 4, (grain + 3) / 4, [&](int64_t q0, int64_t q1) {
    const int64_t r0 = q0 * 4, r1 = std::min(count, q1 * 4);
    if (bf16)
      k.dot_bf16(reinterpret_cast<const sparse_lab::bf16_bits*>(weight.data_ptr<c10::BFloat16>()), in, xp,
                 reinterpret_cast<const sparse_lab::bf16_bits*>(x2.data_ptr<c10::BFloat16>()), tokens, picked, r0,
                 r1, keep, out, yp);
    else
      k.dot_f32(weight.data_ptr<float>(), in, xp, tokens, picked, r0, r1, keep, out, yp);
  });
  return y;
}

void check_rows_call(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous() && x.size(-1) == weight.size(1), op,
                    " needs weight as a contiguous (out, in) matrix with in = ", x.size(-1), ".");
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                    op, " on the CPU takes float32 or bfloat16 in one dtype, not ", x.scalar_type(), ".");
}

// y = F.linear(x, weight, bias) * keep, reading only the kept rows of the (out, in) weight (CATS' up projection).
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& keep) {
  check_rows_call(x, weight, "rows_linear");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  const int64_t tokens = x2.size(0), out = weight.size(0);
  const at::Tensor keep2 = keep.expand(shape).reshape({tokens, out}).to(at::kBool).contiguous();
  const bool* kp = keep2.data_ptr<bool>();
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < out; ++j) {
    bool any = false;
    for (int64_t t = 0; t < tokens; ++t) any |= kp[t * out + j];
    if (any) rows.push_back(j);
  }
  at::Tensor y = dot_rows(x2, weight, &rows, kp);
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat)).mul_(keep2);
  return y.to(x.scalar_type()).view(shape);
}

// y = F.linear(x, weight) reading HF's (out, in) rows by dot products: the tied lm_head, whose rows are the
// embedding's, so the one copy serves both.
at::Tensor dot_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_rows_call(x, weight, "dot_linear");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return dot_rows(x2, weight, nullptr, nullptr).to(x.scalar_type()).view(shape);
}

// The sum of a float32 tensor, read by every thread with the active path's vector loads: the bandwidth probe.
at::Tensor stream_read(const at::Tensor& data, bool prefetch) {
  TORCH_CHECK_VALUE(data.scalar_type() == at::kFloat && data.is_contiguous(), "stream_read takes contiguous float32.");
  const int64_t n = data.numel(), threads = at::get_num_threads();
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<float> partial(threads, 0.0f);
  const float* p = data.data_ptr<float>();
  const VectorKernels& k = vec();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = std::min(n, t * chunk), end = std::min(n, (t + 1) * chunk);
      partial[t] = k.read_sum(p + begin, end - begin, prefetch);
    }
  });
  float total = 0.0f;
  for (float v : partial) total += v;
  return at::scalar_tensor(total, data.options());
}

}  // namespace

const sparse_lab::VectorKernels& sparse_lab::active_kernels() { return vec(); }

TORCH_LIBRARY_IMPL(sparse_lab, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_int8", &sparse_linear_int8);
  m.impl("rows_linear", &rows_linear);
  m.impl("dot_linear", &dot_linear);
  m.impl("stream_read", &stream_read);
}

// No tensor argument: a catch-all kernel, defined here since only the native build has vector paths.
TORCH_LIBRARY_FRAGMENT(sparse_lab, m) { m.def("vector_path(int want) -> int", &vector_path); }
