// decode_token: one token of a Llama-family model in one native call, every decoder layer dense, with TEAL
// thresholds, top-k's keep counts or CATS' gate thresholds, then the final norm and the lm_head, on the CPU. What it replaces: the compiled step's per-token Python wrapper, dynamo's guards and
// inductor's dozens of small parallel kernels a layer, and then one thread fork, a few tensors and a dispatch per
// projection (docs/PERFORMANCE.md).
//
// This launcher checks the call and hands raw pointers to the decode engine of the active vector path
// (decode_engine.inc, compiled per instruction set): one OpenMP team for the whole token, no allocation, tensor or
// dispatch inside it. Returns the logits (rounded to the model's dtype as HF's lm_head rounds them, held in float32
// so a sampler reads them without a conversion) and, per (layer, group), the inputs it skipped: what a
// SparsityCounter counts.
#include "vector_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

namespace {

// A small tensor's values as float32, read directly (a torch conversion costs dispatches on every token).
std::vector<float> as_floats(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
                    "decode_token takes its vectors contiguous in float32 or bfloat16.");
  const int64_t n = t.numel();
  std::vector<float> out(n);
  if (t.scalar_type() == at::kFloat) {
    const float* p = t.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    const c10::BFloat16* p = t.const_data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  }
  return out;
}

std::vector<const void*> pointers(at::TensorList tensors) {
  std::vector<const void*> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.const_data_ptr());
  return out;
}

std::vector<const float*> float_pointers(at::TensorList tensors) {
  std::vector<const float*> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.const_data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_token(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                                int64_t position, at::TensorList qkv_t, at::TensorList o_t,
                                                at::TensorList gate_up_t, at::TensorList down_t, at::TensorList norms,
                                                at::TensorList caches, const at::Tensor& thresholds,
                                                const std::optional<at::Tensor>& keep,
                                                const std::optional<at::Tensor>& gate, const at::Tensor& final_norm, const at::Tensor& head, int64_t heads,
                                                int64_t kv_heads, double eps, at::TensorList scales,
                                                const std::optional<at::Tensor>& phases) {
  const int64_t layers = static_cast<int64_t>(qkv_t.size());
  TORCH_CHECK_VALUE(layers > 0 && o_t.size() == qkv_t.size() && gate_up_t.size() == qkv_t.size() &&
                        down_t.size() == qkv_t.size() && norms.size() == 2 * qkv_t.size() &&
                        caches.size() == 2 * qkv_t.size(),
                    "decode_token needs four projections, two norms and two caches per layer.");
  TORCH_CHECK_VALUE(thresholds.dim() == 2 && thresholds.size(0) == layers && thresholds.size(1) == 4,
                    "decode_token needs thresholds as [layers, 4] (attn_in, attn_out, mlp_in, mlp_mid).");
  TORCH_CHECK_VALUE(!keep || (keep->scalar_type() == at::kLong && keep->is_contiguous() &&
                              keep->sizes() == thresholds.sizes()),
                    "decode_token needs top-k's keep counts as contiguous int64 [layers, 4].");
  TORCH_CHECK_VALUE(!gate || (gate->numel() == layers && !keep),
                    "decode_token needs CATS' gate thresholds as [layers], and not beside top-k's keep counts.");
  const bool int8 = !scales.empty();
  TORCH_CHECK_VALUE(!int8 || static_cast<int64_t>(scales.size()) == 4 * layers + 1,
                    "decode_token's int8 scales are the four projections' of each layer, then the head's.");
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || (dtype == at::kBFloat16 && !int8),
                    "decode_token takes float32 or bfloat16 (int8 weights: float32), not ", dtype, ".");
  const int64_t hidden = x.numel(), head_dim = cos.numel();
  TORCH_CHECK_VALUE(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0 && sin.numel() == head_dim,
                    "decode_token needs query heads grouped evenly over the KV heads and an even head_dim.");
  TORCH_CHECK_VALUE(position >= 0 && position < caches[0].size(1), "decode_token: position ", position,
                    " is beyond the cache.");
  const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim, inner = gate_up_t[0].size(1) / 2;
  const auto blocks = [](int64_t in) { return (in + sparse_lab::kScaleBlock - 1) / sparse_lab::kScaleBlock; };
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK_VALUE(qkv_t[l].sizes() == at::IntArrayRef({hidden, q_width + 2 * kv_width}) &&
                          o_t[l].sizes() == at::IntArrayRef({q_width, hidden}) &&
                          gate_up_t[l].sizes() == at::IntArrayRef({hidden, 2 * inner}) &&
                          down_t[l].sizes() == at::IntArrayRef({inner, hidden}),
                      "decode_token needs each layer's projections as (in, out) matrices of the model's widths.");
    for (int64_t k = 0; k < 2; ++k)
      TORCH_CHECK_VALUE(norms[2 * l + k].numel() == hidden &&
                            caches[2 * l + k].sizes() == at::IntArrayRef({kv_heads, caches[0].size(1), head_dim}),
                        "decode_token needs norms of the hidden width and caches [kv_heads, length, head_dim].");
    if (int8)
      for (int64_t g = 0; g < 4; ++g) {
        const at::Tensor& w = std::array<at::Tensor, 4>{qkv_t[l], o_t[l], gate_up_t[l], down_t[l]}[g];
        const at::Tensor& s = scales[4 * l + g];
        TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.is_contiguous() &&
                              s.sizes() == at::IntArrayRef({blocks(w.size(0)), w.size(1)}),
                          "decode_token needs each int8 projection's float32 scales, a row per ",
                          sparse_lab::kScaleBlock, " inputs.");
      }
  }
  const int64_t vocab = int8 ? head.size(1) : head.size(0);
  TORCH_CHECK_VALUE(final_norm.numel() == hidden && head.dim() == 2 && head.size(int8 ? 0 : 1) == hidden,
                    "decode_token needs the final norm of the hidden width and the head as (vocab, hidden) rows "
                    "((hidden, vocab) int8 rows for int8 weights).");
  TORCH_CHECK_VALUE(!int8 || (scales.back().scalar_type() == at::kFloat && scales.back().is_contiguous() &&
                              scales.back().sizes() == at::IntArrayRef({blocks(hidden), vocab})),
                    "decode_token needs the int8 head's float32 scales, a row per ", sparse_lab::kScaleBlock,
                    " inputs.");
  const at::ScalarType weights = int8 ? at::kChar : dtype;
  for (const at::TensorList& list : {qkv_t, o_t, gate_up_t, down_t, at::TensorList(head)})
    for (const at::Tensor& t : list)
      TORCH_CHECK_VALUE(t.scalar_type() == weights && t.is_contiguous() && t.device().is_cpu(),
                        "decode_token needs every projection and the head contiguous on the CPU in the model's "
                        "weight dtype.");
  for (const at::TensorList& list : {norms, caches, at::TensorList(final_norm)})
    for (const at::Tensor& t : list)
      TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(),
                        "decode_token needs every norm and cache contiguous on the CPU in the hidden state's dtype.");
  TORCH_CHECK_VALUE(!phases || (phases->scalar_type() == at::kDouble && phases->is_contiguous() &&
                                 phases->numel() == sparse_lab::kPhases),
                    "decode_token's phases are ", static_cast<int>(sparse_lab::kPhases), " contiguous float64 seconds.");
  const std::vector<float> limits = as_floats(thresholds), cosv = as_floats(cos), sinv = as_floats(sin);
  const std::vector<float> gate_limits = gate ? as_floats(*gate) : std::vector<float>();
  std::vector<float> state = as_floats(x);
  const std::vector<const void*> qkv = pointers(qkv_t), o = pointers(o_t), gate_up = pointers(gate_up_t),
                                 down = pointers(down_t), norm = pointers(norms);
  std::vector<const float*> scale_rows = int8 ? float_pointers(scales) : std::vector<const float*>();
  // scale_rows holds, per layer, qkv, o, gate_up, down in turn: regrouped per projection for the engine
  std::vector<const float*> per_group[4];
  for (int64_t l = 0; int8 && l < layers; ++l)
    for (int64_t g = 0; g < 4; ++g) per_group[g].push_back(scale_rows[4 * l + g]);
  std::vector<void*> cache;
  cache.reserve(caches.size());
  for (const at::Tensor& t : caches) cache.push_back(t.mutable_data_ptr());
  at::Tensor skipped = at::empty({layers, 4}, x.options().dtype(at::kLong));  // the engine writes every count
  at::Tensor logits = at::empty({vocab}, x.options().dtype(at::kFloat));
  const auto group = [&](int g) { return int8 ? per_group[g].data() : nullptr; };
  const sparse_lab::DecodeStep step{layers, hidden, heads, kv_heads, head_dim, inner, position, caches[0].size(1),
                                    vocab, static_cast<float>(eps), qkv.data(), o.data(), gate_up.data(),
                                    down.data(), norm.data(), cache.data(), final_norm.data_ptr(), head.data_ptr(),
                                    group(0), group(1), group(2), group(3), int8 ? scale_rows.back() : nullptr,
                                    limits.data(), keep ? keep->const_data_ptr<int64_t>() : nullptr,
                                    gate ? gate_limits.data() : nullptr, cosv.data(), sinv.data(), at::get_num_threads(), state.data(),
                                    logits.data_ptr<float>(), skipped.data_ptr<int64_t>(),
                                    phases ? phases->data_ptr<double>() : nullptr};
  const sparse_lab::VectorKernels& kernels = sparse_lab::active_kernels();
  (int8 ? kernels.decode_int8 : dtype == at::kBFloat16 ? kernels.decode_bf16 : kernels.decode_f32)(step);
  return {logits, skipped};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_lab, CPU, m) { m.impl("decode_token", &decode_token); }
