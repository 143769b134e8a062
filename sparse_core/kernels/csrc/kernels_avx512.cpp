// AVX-512 (F, BW): 16 floats per vector; bfloat16 widened by a zero-extend and a shift. Also compiled with
// AVX512_BF16 (SPARSE_LAB_BF16_DOT), where bfloat16 dot products use the CPU's own dot instruction.
#if defined(__x86_64__) || defined(__i386__)  // elsewhere only the scalar path is built
#ifdef SPARSE_LAB_BF16_DOT
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#endif
#include <immintrin.h>

#include "vector_kernels.h"

namespace sparse_lab {
#ifdef SPARSE_LAB_BF16_DOT
namespace avx512_bf16 {
#else
namespace avx512 {
#endif

struct V {
  using F = __m512;
  static constexpr int64_t width = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F bcast(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const bf16_bits* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F clamp(F v, float low, float high) {
    return _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(high)), _mm512_set1_ps(low));
  }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2(F n) {  // 2^n for whole n in float's exponent range
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
};

#ifdef SPARSE_LAB_BF16_DOT
// Four bfloat16 rows against bfloat16 x: vdpbf16ps multiplies 32 pairs and adds them into 16 float32 lanes.
void dot4_bf16(const bf16_bits* const* r, const bf16_bits* const* ahead, const bf16_bits* xb, const float* x,
               int64_t in, float* s) {
  if (ahead)
    for (int64_t p = 0; p < in; p += 32)
      for (int q = 0; q < 4; ++q) __builtin_prefetch(ahead[q] + p, 0, 2);
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + i);
    c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_loadu_si512(r[0] + i), xv);
    c1 = _mm512_dpbf16_ps(c1, (__m512bh)_mm512_loadu_si512(r[1] + i), xv);
    c2 = _mm512_dpbf16_ps(c2, (__m512bh)_mm512_loadu_si512(r[2] + i), xv);
    c3 = _mm512_dpbf16_ps(c3, (__m512bh)_mm512_loadu_si512(r[3] + i), xv);
  }
  s[0] = _mm512_reduce_add_ps(c0), s[1] = _mm512_reduce_add_ps(c1), s[2] = _mm512_reduce_add_ps(c2),
  s[3] = _mm512_reduce_add_ps(c3);
  for (; i < in; ++i)
    for (int q = 0; q < 4; ++q) {
      union { uint32_t u; float f; } bits;
      bits.u = static_cast<uint32_t>(r[q][i]) << 16;
      s[q] += bits.f * x[i];
    }
}
#endif

#include "vector_kernels.inc"
#include "decode_engine.inc"

}  // namespace

#ifdef SPARSE_LAB_BF16_DOT
const VectorKernels kAvx512Bf16Kernels{"avx512_bf16", avx512_bf16::gather_f32, avx512_bf16::gather_bf16,
                                       avx512_bf16::gather_int8, avx512_bf16::dot_f32, avx512_bf16::dot_bf16, avx512_bf16::read_sum,
                                       avx512_bf16::decode_f32, avx512_bf16::decode_bf16, avx512_bf16::decode_int8};
#else
const VectorKernels kAvx512Kernels{"avx512", avx512::gather_f32, avx512::gather_bf16, avx512::gather_int8, avx512::dot_f32,
                                   avx512::dot_bf16, avx512::read_sum, avx512::decode_f32, avx512::decode_bf16, avx512::decode_int8};
#endif

}  // namespace sparse_lab

#endif  // x86
