// decode_layers: one token through every decoder layer of a Llama-family model in one native call, dense or with
// TEAL thresholds, on the CPU. What it replaces: the compiled step's per-token Python wrapper, dynamo's guards and
// inductor's dozens of small parallel kernels a layer, and then one thread fork, a few tensors and a dispatch per
// projection (docs/PERFORMANCE.md).
//
// One OpenMP team runs the whole token. Each projection is the row gather of sparse_lab::sparse_linear, split the
// same way (thread p streams the p-th share of the active rows into its own float32 buffer); between projections
// one thread sums the buffers and runs the step's glue (RMSNorm, rotary embedding, attention over the cache,
// residual adds, SiLU gate) over one token's vectors, rounded to the model's dtype where HF's forward rounds, and
// picks the next projection's active inputs. No allocation, no tensor and no dispatch inside the team.
//
// Returns the last layer's hidden state (the model's dtype) and, per (layer, group), the inputs at or below the
// group's threshold: what a SparsityCounter counts.
#include "vector_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

using sparse_lab::bf16_bits;
using sparse_lab::VectorKernels;

inline float widen(float v) { return v; }
inline float widen(bf16_bits v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename W> W narrow(float v);
template <> float narrow<float>(float v) { return v; }
template <> bf16_bits narrow<bf16_bits>(float v) { return c10::BFloat16(v).x; }
// A float32 value rounded to the model's dtype and back, as each op of HF's forward rounds its output.
template <typename W> float round_to(float v) { return widen(narrow<W>(v)); }

// The vector table's two dtypes behind one name each.
void gather(const VectorKernels& k, const float* wt, int64_t out, const int64_t* idx, const float* xs, int64_t n,
            int64_t tokens, int64_t k0, int64_t k1, float* acc) {
  k.gather_f32(wt, out, idx, xs, n, tokens, k0, k1, acc);
}
void gather(const VectorKernels& k, const bf16_bits* wt, int64_t out, const int64_t* idx, const float* xs, int64_t n,
            int64_t tokens, int64_t k0, int64_t k1, float* acc) {
  k.gather_bf16(wt, out, idx, xs, n, tokens, k0, k1, acc);
}
void dot(const VectorKernels& k, const float* w, int64_t in, const float* x, const bf16_bits*, int64_t tokens,
         int64_t rows, float* y) {
  k.dot_f32(w, in, x, tokens, nullptr, 0, rows, nullptr, rows, y);
}
void dot(const VectorKernels& k, const bf16_bits* w, int64_t in, const float* x, const bf16_bits* xb, int64_t tokens,
         int64_t rows, float* y) {
  k.dot_bf16(w, in, x, xb, tokens, nullptr, 0, rows, nullptr, rows, y);
}

constexpr int64_t kMaxHeadDim = 512;

template <typename W>
const W* rows_of(const at::Tensor& t) {
  return reinterpret_cast<const W*>(t.data_ptr());
}

// One token's pass through the layers: the weights as raw pointers, the vectors between projections, and the
// active inputs of the projection about to run.
template <typename W>
class TokenStep {
 public:
  TokenStep(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t position, at::TensorList qkv_t,
            at::TensorList o_t, at::TensorList gate_up_t, at::TensorList down_t, at::TensorList norms,
            at::TensorList caches, const float* thresholds, int64_t heads, int64_t kv_heads, double eps,
            int64_t* skipped)
      : qkv_t_(qkv_t), o_t_(o_t), gate_up_t_(gate_up_t), down_t_(down_t), norms_(norms), caches_(caches),
        thresholds_(thresholds), skipped_(skipped), kernels_(sparse_lab::active_kernels()), heads_(heads),
        kv_heads_(kv_heads), head_dim_(cos.numel()), group_(heads / kv_heads), position_(position),
        length_(position + 1), cache_rows_(caches[0].size(1)), eps_(static_cast<float>(eps)) {
    hidden_size_ = x.numel();
    q_width_ = heads * head_dim_;
    kv_width_ = kv_heads * head_dim_;
    inner_ = gate_up_t[0].size(1) / 2;
    const at::Tensor xf = x.reshape({-1}).to(at::kFloat).contiguous();
    hidden_.assign(xf.data_ptr<float>(), xf.data_ptr<float>() + hidden_size_);
    const at::Tensor c = cos.reshape({-1}).to(at::kFloat).contiguous(), s = sin.reshape({-1}).to(at::kFloat).contiguous();
    cos_.assign(c.data_ptr<float>(), c.data_ptr<float>() + head_dim_);
    sin_.assign(s.data_ptr<float>(), s.data_ptr<float>() + head_dim_);
    const int64_t widest_in = std::max({hidden_size_, q_width_, inner_});
    const int64_t widest_out = std::max({q_width_ + 2 * kv_width_, hidden_size_, 2 * inner_});
    threads_ = at::get_num_threads();
    h_.resize(hidden_size_);
    projected_.resize(widest_out);
    attended_.resize(q_width_);
    query_bits_.resize(q_width_);
    scores_.resize(static_cast<size_t>(threads_) * length_);  // one row per thread
    xs_.resize(widest_in);
    idx_.resize(std::max(widest_in, length_));
    positions_.resize(length_);
    std::iota(positions_.begin(), positions_.end(), int64_t{0});
    partials_.resize(static_cast<size_t>(threads_) * widest_out);
  }

  void run() {
    const int64_t layers = static_cast<int64_t>(qkv_t_.size());
    const int64_t qkv_width = q_width_ + 2 * kv_width_;
#pragma omp parallel num_threads(threads_)
    {
      const int p = omp_get_thread_num(), team = omp_get_num_threads();
      for (int64_t l = 0; l < layers; ++l) {
        const float* thr = thresholds_ + 4 * l;
        int64_t* count = skipped_ + 4 * l;
#pragma omp single
        {
          if (l > 0) add_residual();  // the previous layer's down projection
          rms_norm(rows_of<W>(norms_[2 * l]));
          count[0] = pick_inputs(h_.data(), hidden_size_, thr[0], qkv_width, team);
        }
        project(rows_of<W>(qkv_t_[l]), qkv_width, p);
#pragma omp barrier
#pragma omp single
        {
          sum_partials(qkv_width);
          store_rotated(l);
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < heads_; ++h) attend(l, h, p);
#pragma omp single
        count[1] = pick_inputs(attended_.data(), q_width_, thr[1], hidden_size_, team);
        project(rows_of<W>(o_t_[l]), hidden_size_, p);
#pragma omp barrier
#pragma omp single
        {
          add_residual();
          rms_norm(rows_of<W>(norms_[2 * l + 1]));
          count[2] = pick_inputs(h_.data(), hidden_size_, thr[2], 2 * inner_, team);
        }
        project(rows_of<W>(gate_up_t_[l]), 2 * inner_, p);
#pragma omp barrier
        float* mid = projected_.data();  // act_fn(gate) * up, in place of gate
#pragma omp for schedule(static)
        for (int64_t i = 0; i < inner_; ++i) {
          const float gate = partial_sum(i, 2 * inner_), up = partial_sum(inner_ + i, 2 * inner_);
          mid[i] = round_to<W>(round_to<W>(gate / (1.0f + std::exp(-gate))) * up);  // HF rounds each op
        }
#pragma omp single
        count[3] = pick_inputs(mid, inner_, thr[3], hidden_size_, team);
        project(rows_of<W>(down_t_[l]), hidden_size_, p);
#pragma omp barrier
      }
#pragma omp single
      add_residual();
    }
  }

  at::Tensor hidden(at::ScalarType dtype) const {
    return at::tensor(at::ArrayRef<float>(hidden_), at::TensorOptions().dtype(at::kFloat)).to(dtype);
  }

 private:
  // HF's RMSNorm of hidden_ into h_: float32 statistics, the normalised value rounded, then times the weight.
  void rms_norm(const W* weight) {
    double squares = 0.0;
    for (float v : hidden_) squares += static_cast<double>(v) * v;
    const float scale = 1.0f / std::sqrt(static_cast<float>(squares / hidden_size_) + eps_);
    for (int64_t i = 0; i < hidden_size_; ++i) h_[i] = round_to<W>(widen(weight[i]) * round_to<W>(hidden_[i] * scale));
  }

  // The inputs of v above the threshold as row indices and values (what the gather reads), and how many threads
  // stream them into an `out`-wide projection. Returns the inputs at or below it: the skipped count.
  int64_t pick_inputs(const float* v, int64_t count, float threshold, int64_t out, int team) {
    int64_t n = 0;
    for (int64_t i = 0; i < count; ++i) {  // branch-free: TEAL's kept inputs are a coin toss to a predictor
      idx_[n] = i;
      xs_[n] = v[i];
      n += std::fabs(v[i]) > threshold;
    }
    active_ = n;
    sharing_ = n * out * static_cast<int64_t>(sizeof(W)) >= sparse_lab::kParallelBytes ? team : 1;
    return count - n;
  }

  // Thread p's share of the active rows, into its own buffer (sparse_linear's split, so the sums round alike).
  void project(const W* wt, int64_t out, int p) {
    if (p >= sharing_) return;
    const int64_t chunk = (active_ + sharing_ - 1) / sharing_;
    const int64_t k0 = std::min(active_, p * chunk), k1 = std::min(active_, k0 + chunk);
    float* part = partials_.data() + static_cast<size_t>(p) * out;
    std::fill(part, part + out, 0.0f);
    if (k1 > k0) gather(kernels_, wt, out, idx_.data(), xs_.data(), active_, 1, k0, k1, part);
  }

  // Output j of an `out`-wide projection: the threads' buffers summed in thread order, rounded to the dtype
  // (sparse_linear's output).
  float partial_sum(int64_t j, int64_t out) const {
    float s = 0.0f;
    for (int64_t p = 0; p < sharing_; ++p) s += partials_[p * out + j];
    return round_to<W>(s);
  }

  void sum_partials(int64_t out) {  // partial_sum for every j, in loops the compiler vectorises
    float* y = projected_.data();
    std::copy(partials_.data(), partials_.data() + out, y);
    for (int64_t p = 1; p < sharing_; ++p)
      for (int64_t j = 0; j < out; ++j) y[j] += partials_[p * out + j];
    for (int64_t j = 0; j < out; ++j) y[j] = round_to<W>(y[j]);
  }

  void add_residual() {
    sum_partials(hidden_size_);
    for (int64_t i = 0; i < hidden_size_; ++i) hidden_[i] = round_to<W>(hidden_[i] + projected_[i]);
  }

  // q * cos + rotate_half(q) * sin for `count` heads, in place, each product rounded as HF's are.
  void rotate(float* heads, int64_t count) const {
    const int64_t half = head_dim_ / 2;
    float head[kMaxHeadDim];
    for (int64_t h = 0; h < count; ++h) {
      float* q = heads + h * head_dim_;
      std::copy(q, q + head_dim_, head);
      for (int64_t i = 0; i < head_dim_; ++i) {
        const float turned = i < half ? -head[i + half] : head[i - half];
        q[i] = round_to<W>(round_to<W>(head[i] * cos_[i]) + round_to<W>(turned * sin_[i]));
      }
    }
  }

  // q and k of projected_ rotated in place, and k and v into layer l's cache at this position.
  void store_rotated(int64_t l) {
    float* q = projected_.data();
    float* k = q + q_width_;
    const float* v = k + kv_width_;
    rotate(q, heads_);
    rotate(k, kv_heads_);
    W* k_cache = reinterpret_cast<W*>(caches_[2 * l].data_ptr());
    W* v_cache = reinterpret_cast<W*>(caches_[2 * l + 1].data_ptr());
    for (int64_t g = 0; g < kv_heads_; ++g)
      for (int64_t d = 0; d < head_dim_; ++d) {
        const int64_t at = (g * cache_rows_ + position_) * head_dim_ + d;
        k_cache[at] = narrow<W>(k[g * head_dim_ + d]);
        v_cache[at] = narrow<W>(v[g * head_dim_ + d]);
      }
    for (int64_t i = 0; i < q_width_; ++i) query_bits_[i] = narrow<bf16_bits>(q[i]);
  }

  // Query head h (on thread p): softmax(q k^T / sqrt(d)) v over layer l's cache filled so far, float32 as the
  // compiled step's, rounded, into attended_. Its KV head is h / group (HF's repeat_kv).
  void attend(int64_t l, int64_t h, int p) {
    const int64_t g = h / group_, first = h * head_dim_;
    const W* keys = reinterpret_cast<const W*>(caches_[2 * l].data_ptr()) + g * cache_rows_ * head_dim_;
    const W* values = reinterpret_cast<const W*>(caches_[2 * l + 1].data_ptr()) + g * cache_rows_ * head_dim_;
    float* s = scores_.data() + p * length_;
    dot(kernels_, keys, head_dim_, projected_.data() + first, query_bits_.data() + first, 1, length_, s);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    float top = -INFINITY;
    for (int64_t j = 0; j < length_; ++j) top = std::max(top, s[j] *= scale);
    float total = 0.0f;
    for (int64_t j = 0; j < length_; ++j) total += s[j] = std::exp(s[j] - top);
    for (int64_t j = 0; j < length_; ++j) s[j] /= total;
    float* out = attended_.data() + first;
    std::fill(out, out + head_dim_, 0.0f);
    gather(kernels_, values, head_dim_, positions_.data(), s, length_, 1, 0, length_, out);
    for (int64_t d = 0; d < head_dim_; ++d) out[d] = round_to<W>(out[d]);
  }

  at::TensorList qkv_t_, o_t_, gate_up_t_, down_t_, norms_, caches_;
  const float* thresholds_;
  int64_t* skipped_;
  const VectorKernels& kernels_;
  int64_t heads_, kv_heads_, head_dim_, group_, position_, length_, cache_rows_;
  float eps_;
  int64_t hidden_size_ = 0, q_width_ = 0, kv_width_ = 0, inner_ = 0;
  int threads_ = 1;
  std::vector<float> hidden_, h_, projected_, attended_, scores_, xs_, partials_, cos_, sin_;
  std::vector<bf16_bits> query_bits_;
  std::vector<int64_t> idx_, positions_;
  int64_t active_ = 0;  // the picked inputs of the projection about to run
  int sharing_ = 1;     // the threads that stream them
};

std::tuple<at::Tensor, at::Tensor> decode_layers(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                                 int64_t position, at::TensorList qkv_t, at::TensorList o_t,
                                                 at::TensorList gate_up_t, at::TensorList down_t, at::TensorList norms,
                                                 at::TensorList caches, const at::Tensor& thresholds, int64_t heads,
                                                 int64_t kv_heads, double eps) {
  const int64_t layers = static_cast<int64_t>(qkv_t.size());
  TORCH_CHECK_VALUE(layers > 0 && o_t.size() == qkv_t.size() && gate_up_t.size() == qkv_t.size() &&
                        down_t.size() == qkv_t.size() && norms.size() == 2 * qkv_t.size() &&
                        caches.size() == 2 * qkv_t.size(),
                    "decode_layers needs four projections, two norms and two caches per layer.");
  TORCH_CHECK_VALUE(thresholds.dim() == 2 && thresholds.size(0) == layers && thresholds.size(1) == 4,
                    "decode_layers needs thresholds as [layers, 4] (attn_in, attn_out, mlp_in, mlp_mid).");
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, "decode_layers takes float32 or bfloat16, not ",
                    dtype, ".");
  TORCH_CHECK_VALUE(cos.numel() <= kMaxHeadDim && cos.numel() % 2 == 0, "decode_layers takes an even head_dim up to ",
                    kMaxHeadDim, ".");
  TORCH_CHECK_VALUE(position < caches[0].size(1), "decode_layers: position ", position, " is beyond the cache.");
  for (const at::TensorList& list : {qkv_t, o_t, gate_up_t, down_t, norms, caches})
    for (const at::Tensor& t : list)
      TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.is_contiguous(),
                        "decode_layers needs every weight, norm and cache contiguous in the hidden state's dtype.");
  const at::Tensor limits = thresholds.to(at::kFloat).contiguous();
  at::Tensor skipped = at::zeros({layers, 4}, at::kLong);
  if (dtype == at::kBFloat16) {
    TokenStep<bf16_bits> step(x, cos, sin, position, qkv_t, o_t, gate_up_t, down_t, norms, caches,
                              limits.data_ptr<float>(), heads, kv_heads, eps, skipped.data_ptr<int64_t>());
    step.run();
    return {step.hidden(dtype), skipped};
  }
  TokenStep<float> step(x, cos, sin, position, qkv_t, o_t, gate_up_t, down_t, norms, caches, limits.data_ptr<float>(),
                        heads, kv_heads, eps, skipped.data_ptr<int64_t>());
  step.run();
  return {step.hidden(dtype), skipped};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_lab, CPU, m) { m.impl("decode_layers", &decode_layers); }
