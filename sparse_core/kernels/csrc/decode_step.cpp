// decode_layers: one token through every decoder layer of a Llama-family model in one native call, dense or with
// TEAL thresholds, on the CPU. The step's glue (RMSNorm, rotary embedding, residual adds, SiLU gate) runs as plain
// loops over one token's vectors, rounded to the model's dtype where HF's forward rounds; the four projections of a
// layer go through sparse_lab::sparse_linear (the row gather) and attention through ATen's batched matmuls over the
// cache filled so far. What it replaces: the compiled step's per-token Python wrapper, dynamo's guards and inductor's
// dozens of small parallel kernels a layer (docs/PERFORMANCE.md).
//
// Returns the last layer's hidden state (the model's dtype) and, per (layer, group), the inputs at or below the
// group's threshold: what a SparsityCounter counts.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

// Rounds a float32 value to the model's dtype and back, as each op of HF's forward rounds its output.
struct Rounding {
  bool bf16;
  float operator()(float v) const { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }
};

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& wt, double threshold) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_lab::sparse_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double)>();
  return op.call(x, wt.t(), wt, std::nullopt, std::nullopt, threshold);
}

// v in the model's dtype as a (1, n) tensor, counting the inputs at or below `threshold` into `skipped`.
at::Tensor as_input(const std::vector<float>& v, at::ScalarType dtype, float threshold, int64_t* skipped) {
  int64_t below = 0;
  for (float e : v) below += std::fabs(e) <= threshold;
  *skipped = below;
  return at::from_blob(const_cast<float*>(v.data()), {1, static_cast<int64_t>(v.size())}, at::kFloat).to(dtype);
}

std::vector<float> as_floats(const at::Tensor& t) {
  const at::Tensor f = t.reshape({-1}).to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// HF's RMSNorm: float32 statistics, the normalised value rounded to the dtype, then times the weight (in the dtype).
std::vector<float> rms_norm(const std::vector<float>& x, const std::vector<float>& weight, double eps, Rounding round) {
  double squares = 0.0;
  for (float v : x) squares += static_cast<double>(v) * v;
  const float scale = 1.0f / std::sqrt(static_cast<float>(squares / x.size()) + static_cast<float>(eps));
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = round(weight[i] * round(x[i] * scale));
  return y;
}

// q * cos + rotate_half(q) * sin for each head of width cos.size(), in place, each product rounded as HF's are.
void rotate(float* heads, int64_t count, const std::vector<float>& cos, const std::vector<float>& sin, Rounding round) {
  const int64_t width = static_cast<int64_t>(cos.size()), half = width / 2;
  std::vector<float> head(width);
  for (int64_t h = 0; h < count; ++h) {
    float* q = heads + h * width;
    std::copy(q, q + width, head.begin());
    for (int64_t i = 0; i < width; ++i) {
      const float turned = i < half ? -head[i + half] : head[i - half];
      q[i] = round(round(head[i] * cos[i]) + round(turned * sin[i]));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> decode_layers(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                                 int64_t position, at::TensorList qkv_t, at::TensorList o_t,
                                                 at::TensorList gate_up_t, at::TensorList down_t, at::TensorList norms,
                                                 at::TensorList caches, const at::Tensor& thresholds, int64_t heads,
                                                 int64_t kv_heads, double eps) {
  const int64_t layers = static_cast<int64_t>(qkv_t.size());
  TORCH_CHECK_VALUE(o_t.size() == qkv_t.size() && gate_up_t.size() == qkv_t.size() && down_t.size() == qkv_t.size() &&
                        norms.size() == 2 * qkv_t.size() && caches.size() == 2 * qkv_t.size(),
                    "decode_layers needs four projections, two norms and two caches per layer.");
  TORCH_CHECK_VALUE(thresholds.dim() == 2 && thresholds.size(0) == layers && thresholds.size(1) == 4,
                    "decode_layers needs thresholds as [layers, 4] (attn_in, attn_out, mlp_in, mlp_mid).");
  const at::ScalarType dtype = x.scalar_type();
  const Rounding round{dtype == at::kBFloat16};
  const int64_t head_dim = cos.numel(), q_width = heads * head_dim, kv_width = kv_heads * head_dim;
  const int64_t group = heads / kv_heads, length = position + 1;
  TORCH_CHECK_VALUE(position < caches[0].size(1), "decode_layers: position ", position, " is beyond the cache.");
  const std::vector<float> cosv = as_floats(cos), sinv = as_floats(sin);
  const at::Tensor limits = thresholds.to(at::kFloat).contiguous();
  const float* limit = limits.data_ptr<float>();
  at::Tensor skipped = at::zeros({layers, 4}, at::kLong);
  int64_t* counts = skipped.data_ptr<int64_t>();
  std::vector<float> hidden = as_floats(x);
  for (int64_t l = 0; l < layers; ++l) {
    const float* thr = limit + 4 * l;
    int64_t* count = counts + 4 * l;
    // attention
    std::vector<float> h = rms_norm(hidden, as_floats(norms[2 * l]), eps, round);
    std::vector<float> qkv = as_floats(sparse_linear(as_input(h, dtype, thr[0], &count[0]), qkv_t[l], thr[0]));
    rotate(qkv.data(), heads, cosv, sinv, round);
    rotate(qkv.data() + q_width, kv_heads, cosv, sinv, round);
    const at::Tensor k_new = at::from_blob(qkv.data() + q_width, {kv_heads, head_dim}, at::kFloat);
    const at::Tensor v_new = at::from_blob(qkv.data() + q_width + kv_width, {kv_heads, head_dim}, at::kFloat);
    at::Tensor k_cache = caches[2 * l], v_cache = caches[2 * l + 1];
    k_cache.select(1, position).copy_(k_new);
    v_cache.select(1, position).copy_(v_new);
    const at::Tensor q = at::from_blob(qkv.data(), {kv_heads, group, head_dim}, at::kFloat);
    const at::Tensor keys = k_cache.narrow(1, 0, length).to(at::kFloat);
    const at::Tensor values = v_cache.narrow(1, 0, length).to(at::kFloat);
    const at::Tensor weights = at::softmax(at::bmm(q, keys.transpose(1, 2)).mul_(1.0 / std::sqrt(double(head_dim))), -1);
    std::vector<float> attended = as_floats(at::bmm(weights, values));
    for (float& v : attended) v = round(v);
    std::vector<float> o = as_floats(sparse_linear(as_input(attended, dtype, thr[1], &count[1]), o_t[l], thr[1]));
    for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = round(hidden[i] + o[i]);
    // MLP: down(silu(gate) * up)
    h = rms_norm(hidden, as_floats(norms[2 * l + 1]), eps, round);
    std::vector<float> gate_up = as_floats(sparse_linear(as_input(h, dtype, thr[2], &count[2]), gate_up_t[l], thr[2]));
    const size_t width = gate_up.size() / 2;
    std::vector<float> mid(width);
    for (size_t i = 0; i < width; ++i) {
      const float g = gate_up[i];
      mid[i] = round(round(g / (1.0f + std::exp(-g))) * gate_up[width + i]);
    }
    std::vector<float> down = as_floats(sparse_linear(as_input(mid, dtype, thr[3], &count[3]), down_t[l], thr[3]));
    for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = round(hidden[i] + down[i]);
  }
  // a copy: from_blob views `hidden`, which ends with this call (and .to(float32) would return that view)
  return {at::from_blob(hidden.data(), {static_cast<int64_t>(hidden.size())}, at::kFloat).to(dtype, false, true),
          skipped};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_lab, CPU, m) { m.impl("decode_layers", &decode_layers); }
