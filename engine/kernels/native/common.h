/* What the native kernels (decode_kernels.c, gemm.c) share: the weight formats and bf16 <-> fp32 conversions. */
#ifndef DSVL_COMMON_H
#define DSVL_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* The weight formats (native/__init__.py's BF16, INT8, NF4): bf16 [N, K]; int8 [N, K] with one fp32 scale per row;
 * bitsandbytes' NF4, two 4-bit codes per byte (the first element in the high nibble) with one fp32 absmax per
 * NF4BLOCK consecutive elements. */
enum { KIND_BF16 = 0, KIND_INT8 = 1, KIND_NF4 = 2 };
#define NF4BLOCK 64

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 bf16x8_to_f32(__m128i v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* v into y[n] of the dtype: rounded to bf16, or as it is. */
static inline void store(void *y, int is_bf16, size_t n, float v) {
    if (is_bf16) ((uint16_t *)y)[n] = f32_to_bf16(v);
    else ((float *)y)[n] = v;
}

/* Round eight floats to bf16 (nearest, ties to even), kept as floats; a NaN stays NaN, as in f32_to_bf16. */
static inline __m256 round_bf16x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v), high = _mm256_set1_epi32((int)0xffff0000u);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), high);
    __m256i quiet = _mm256_or_si256(_mm256_and_si256(u, high), _mm256_set1_epi32(0x00400000));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* Eight floats into y[n..n+8) of the dtype: rounded to bf16 as f32_to_bf16 does, or as they are. */
static inline void store8(void *y, int bf16, size_t n, __m256 v) {
    if (!bf16) { _mm256_storeu_ps((float *)y + n, v); return; }
    __m256i r = _mm256_srli_epi32(_mm256_castps_si256(round_bf16x8(v)), 16);
    _mm_storeu_si128((__m128i *)((uint16_t *)y + n),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

#endif
