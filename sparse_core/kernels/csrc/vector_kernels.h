// The vector kernels' table: one per instruction set, compiled in its own file with that file's target, chosen at
// run time from the CPU (sparse_gemv.cpp). Raw pointers only: these files include no ATen or standard-library
// code, so no inline function compiled for a wider ISA can be linked into the portable launcher.
#pragma once
#include <omp.h>  // the decode engine's team

#include <cstdint>

namespace sparse_lab {

using bf16_bits = uint16_t;  // bfloat16 as its raw bits

// One token of a Llama-family model (decode_engine.inc; decode_step.cpp fills it in): every decoder layer, the
// final norm and the lm_head. Per layer l the four projections are (in, out) row-major weights in the model's
// dtype, the norms that dtype's vectors, the caches [kv_heads, cache_rows, head_dim]; thresholds[4 l + g] is group
// g's (attn_in, attn_out, mlp_in, mlp_mid) in float32, already rounded to the dtype. Top-k passes keep[4 l + g]
// instead, the inputs each group keeps (its largest |x|); CATS passes gate[l], the threshold on |act(gate)| at or
// below which a neuron's up and down rows are skipped. The head is HF's (vocab,
// hidden) rows, the embedding's when tied. int8 weights (quantize.py): the projections are int8 (in, out) rows with
// their scales (*_s, one float32 row per kScaleBlock inputs), the head int8 (hidden, vocab) rows with head_s, and
// everything else float32; the float models' *_s are null.
struct DecodeStep {
  int64_t layers, hidden, heads, kv_heads, head_dim, inner, position, cache_rows, vocab;
  float eps;
  const void* const* qkv_t;
  const void* const* o_t;
  const void* const* gate_up_t;
  const void* const* down_t;
  const void* const* norms;  // input_layernorm and post_attention_layernorm of each layer, in turn
  void* const* caches;       // K and V of each layer, in turn
  const void* final_norm;
  const void* head;
  const float* const* qkv_s;
  const float* const* o_s;
  const float* const* gate_up_s;
  const float* const* down_s;
  const float* head_s;
  const float* thresholds;
  const int64_t* keep;  // null unless top-k
  const float* gate;    // null unless CATS
  const float* cos;  // head_dim values at this position
  const float* sin;
  int threads;
  float* state;      // in: the token's embedding row (float32 values of the dtype)
  float* logits;     // out: vocab values, rounded to the model's dtype as HF's lm_head rounds them
  int64_t* skipped;  // out: [layers, 4] inputs skipped (at or below their group's threshold)
  double* phases;    // null, or out: thread 0's seconds in each Phase added to it (bench profile)
};

// Where thread 0 spends a token, each phase running until the next begins (so a wait belongs to the phase it
// ends): the profile of the weights' share of a token against everything else.
enum Phase : int {
  kGlue,       // residual adds, norms, picking the inputs, summing partial rows, rotary, the cache row
  kQkvGather,  // this thread's share of each projection's active rows
  kOGather,
  kGateUpGather,
  kDownGather,
  kGatherWait,  // the barrier after each gather: waiting for the other threads' shares
  kAttention,   // attention over the cache, its parts merged, and its barriers
  kGate,        // the SiLU gate and its barrier
  kHead,        // the lm_head's rows
  kPhases
};

struct VectorKernels {
  const char* name;
  // acc[t * out + j] += sum over k in share `share` of `shares` of xs[t * n + k] * wt[idx[k] * out + j]: the
  // input-sparse gather. The shares interleave blocks of kBlock picked rows (block b is share b % shares's), so
  // a team's threads stream neighbouring rows.
  void (*gather_f32)(const float* wt, int64_t out, const int64_t* idx, const float* xs, int64_t n, int64_t tokens,
                     int64_t share, int64_t shares, float* acc);
  void (*gather_bf16)(const bf16_bits* wt, int64_t out, const int64_t* idx, const float* xs, int64_t n,
                      int64_t tokens, int64_t share, int64_t shares, float* acc);
  // The same gather over int8 rows with float32 scales, one per output and per kScaleBlock inputs (quantize.py):
  // the weight is q[i * out + j] * scales[(i / kScaleBlock) * out + j].
  // Rows `stride` long in memory, of which the first `out` are computed (a thread's columns of the int8 head).
  void (*gather_int8)(const int8_t* q, const float* scales, int64_t stride, int64_t out, const int64_t* idx,
                      const float* xs, int64_t n, int64_t tokens, int64_t share, int64_t shares, float* acc);
  // y[t * out + rows[r]] = dot(w[rows[r] * in ...], x[t * in ...]) for r in [r0, r1) (rows null: every row), where keep is null or
  // keep[t * out + rows[r]]: the (out, in) rows' dot products (CATS' up projection, the tied lm_head). x is given
  // as float32 and, for bfloat16 weights, also as its bfloat16 bits.
  void (*dot_f32)(const float* w, int64_t in, const float* x, int64_t tokens, const int64_t* rows, int64_t r0,
                  int64_t r1, const bool* keep, int64_t out, float* y);
  void (*dot_bf16)(const bf16_bits* w, int64_t in, const float* x, const bf16_bits* xb, int64_t tokens,
                   const int64_t* rows, int64_t r0, int64_t r1, const bool* keep, int64_t out, float* y);
  // The sum of n floats, read with this ISA's widest loads, the next lines requested ahead or not: the bandwidth
  // probe's inner loop.
  float (*read_sum)(const float* data, int64_t n, bool prefetch);
  // One token through every layer and the head (DecodeStep), for float32, bfloat16 and int8-weight models.
  void (*decode_f32)(const DecodeStep& step);
  void (*decode_bf16)(const DecodeStep& step);
  void (*decode_int8)(const DecodeStep& step);
};

extern const VectorKernels kScalarKernels, kAvx2Kernels, kAvx512Kernels, kAvx512Bf16Kernels;

// The table the CPU ops run now: the CPU's widest, or what SPARSE_LAB_ISA / sparse_lab::vector_path chose.
const VectorKernels& active_kernels();

// The gather takes rows a block at a time (vector_kernels.inc), and a team's threads take blocks in turn.
constexpr int64_t kBlock = 8;

// int8 weights' inputs per scale: quantize.BLOCK, which cpu_native passes to the build.
#ifndef SPARSE_LAB_INT8_BLOCK
#error "build through sparse_core.kernels.cpu_native, which defines SPARSE_LAB_INT8_BLOCK"
#endif
constexpr int64_t kScaleBlock = SPARSE_LAB_INT8_BLOCK;

// Below ~256 KiB of weight rows a second thread costs more than it saves: the projection runs on one.
constexpr int64_t kParallelBytes = 1 << 18;
// Inside the decode engine the team is already running, so a second thread costs only a barrier and a partial
// sum: a projection is shared from 64 KiB of rows (a sparse int8 o projection reads ~170 KB; docs/PERFORMANCE.md).
constexpr int64_t kTeamBytes = 1 << 16;

}  // namespace sparse_lab
