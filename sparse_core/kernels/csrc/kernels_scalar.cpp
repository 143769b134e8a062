// The portable path: one float per "vector", for CPUs with neither AVX2 nor AVX-512 (and as the reference path
// every CI machine can run: SPARSE_LAB_ISA=scalar).
#include "vector_kernels.h"

namespace sparse_lab {
namespace scalar {

struct V {
  using F = float;
  static constexpr int64_t width = 1;
  static F zero() { return 0.0f; }
  static F bcast(float v) { return v; }
  static F load(const float* p) { return *p; }
  static F load(const bf16_bits* p) {
    union { uint32_t u; float f; } bits;
    bits.u = static_cast<uint32_t>(*p) << 16;
    return bits.f;
  }
  static F load(const int8_t* p) { return static_cast<float>(*p); }
  static F fma(F a, F b, F c) { return a * b + c; }
  static void store(float* p, F v) { *p = v; }
  static float sum(F v) { return v; }
  static F mul(F a, F b) { return a * b; }
  static F add(F a, F b) { return a + b; }
  static F clamp(F v, float low, float high) { return v < low ? low : (v > high ? high : v); }
  static F round(F v) { return __builtin_rintf(v); }  // to nearest, ties to even, as the vector paths round
  static F pow2(F n) {
    union { uint32_t u; float f; } bits;
    bits.u = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    return bits.f;
  }
};

#include "vector_kernels.inc"
#include "decode_engine.inc"


}  // namespace scalar

const VectorKernels kScalarKernels{"scalar", scalar::gather_f32, scalar::gather_bf16, scalar::gather_int8,
                                   scalar::dot_f32,
                                   scalar::dot_bf16, scalar::read_sum, scalar::decode_f32, scalar::decode_bf16,
                                 scalar::decode_int8};

}  // namespace sparse_lab
