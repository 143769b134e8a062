// The AVX-512 kernels again, with AVX512_BF16's dot instruction for bfloat16 dot products.
#define SPARSE_LAB_BF16_DOT
#include "kernels_avx512.cpp"
