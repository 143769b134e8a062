// AVX2 + FMA: 8 floats per vector, for CPUs without AVX-512 (most laptops); SPARSE_LAB_ISA=avx2 forces it.
#if defined(__x86_64__) || defined(__i386__)  // elsewhere only the scalar path is built
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "vector_kernels.h"

namespace sparse_lab {
namespace avx2 {

struct V {
  using F = __m256;
  static constexpr int64_t width = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F bcast(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const bf16_bits* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static float sum(F v) {
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F clamp(F v, float low, float high) {
    return _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(high)), _mm256_set1_ps(low));
  }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2(F n) {  // 2^n for whole n in float's exponent range
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
};

#include "vector_kernels.inc"
#include "decode_engine.inc"


}  // namespace avx2

const VectorKernels kAvx2Kernels{"avx2", avx2::gather_f32, avx2::gather_bf16, avx2::gather_int8, avx2::dot_f32, avx2::dot_bf16,
                                 avx2::read_sum, avx2::decode_f32, avx2::decode_bf16,
                                 avx2::decode_int8};

}  // namespace sparse_lab

#endif  // x86
