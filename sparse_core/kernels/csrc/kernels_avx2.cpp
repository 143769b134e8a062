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
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static float sum(F v) {
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static F exp(F x) {  // Cephes' expf, as the AVX-512 path's
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
    const F n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    F p = _mm256_set1_ps(1.9875691500e-4f);
    const float terms[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    for (float c : terms) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  }
};

#include "vector_kernels.inc"
#include "decode_engine.inc"


}  // namespace avx2

const VectorKernels kAvx2Kernels{"avx2", avx2::gather_f32, avx2::gather_bf16, avx2::dot_f32, avx2::dot_bf16,
                                 avx2::read_sum, avx2::decode_f32, avx2::decode_bf16};

}  // namespace sparse_lab

#endif  // x86
