/* Matrix-vector kernels for one-token decoding on x86-64 CPUs with AVX2 + FMA.
 *
 * Decoding one token reads every weight once and does two flops per weight, so it is bound by memory
 * bandwidth. PyTorch's bf16 GEMV reaches ~13 GB/s on the 2-core AVX2 machine this was written on, where
 * merely streaming the weights reaches ~15-18 GB/s. These kernels stream at that rate (bf16), or read half
 * the bytes (int8 weights with one scale per output row, the activation quantized per block of 32 so the
 * dot products run on integer instructions).
 *
 * Layouts: W is row-major [N, K] (nn.Linear's weight), x is [K], y is [N]. Activations and outputs are
 * bf16 (is_bf16 = 1) or fp32. Threads come from OpenMP; linked into a process that has imported torch, the
 * loader resolves libgomp.so.1 to torch's own copy, so these kernels share torch's thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "common.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

static void load_vector(const void *x, int is_bf16, float *out, int K) {
    if (!is_bf16) { memcpy(out, x, (size_t)K * sizeof(float)); return; }
    const uint16_t *h = (const uint16_t *)x;
    for (int k = 0; k < K; k++) out[k] = bf16_to_f32(h[k]);
}

static inline __m256 load8(const void *p, size_t i, int bf16) {
    if (bf16) return bf16x8_to_f32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

static inline float load1(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* v as the dtype holds it: rounded to bf16 and back, or unchanged (fp32). */
static inline float round_to(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* e^x for x <= 0 (attention scores minus their max; -|g| in SiLU), eight at a time: 2^n · e^r with r = x - n·ln2
 * in [-ln2/2, ln2/2] and a degree-6 polynomial for e^r (relative error ~2e-7, against ~1e-7 for libm's expf).
 * Below -87 the result is clamped to e^-87 ≈ 1.6e-38, nothing next to a softmax max's weight of 1. */
static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* in this order a NaN score stays NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.0f / 720);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 120));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 24));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 6));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* ------------------------------------------------------------------ bf16 weights */
/* A bf16 weight becomes an fp32 by going into the high half of a 32-bit lane: unpacking 16 weights against zero
 * does that in one in-lane instruction per 8, where zero-extending and shifting takes two (one of them across
 * lanes). The unpacked order is lanes [0..3, 8..11] then [4..7, 12..15] of each 16, so x is stored in that order. */
static void interleave_quads(float *x, int K) { /* per 16: swap elements 4..7 with 8..11 */
    for (int k = 0; k < K; k += 16) {
        __m128 b = _mm_loadu_ps(x + k + 4), c = _mm_loadu_ps(x + k + 8);
        _mm_storeu_ps(x + k + 4, c);
        _mm_storeu_ps(x + k + 8, b);
    }
}

static inline __m256 bf16_low8(__m256i w) {
    return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), w));
}

static inline __m256 bf16_high8(__m256i w) {
    return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), w));
}

/* y[n] = W[n]·x for rows n in [lo, hi) of bf16 W [N, K]; x fp32 in interleave_quads' order, 32-byte aligned; K a
 * multiple of 16. */
static void rows_bf16(const uint16_t *W, const float *xf, int K, int lo, int hi, float *y) {
    int n = lo;
    for (; n + 4 <= hi; n += 4) {
        /* Four rows at a time share each load of x; two accumulators per row hide the FMA latency. */
        const uint16_t *r0 = W + (size_t)n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (int k = 0; k < K; k += 16) {
            __m256 x0 = _mm256_load_ps(xf + k), x1 = _mm256_load_ps(xf + k + 8);
            __m256i w;
            w = _mm256_loadu_si256((const __m256i *)(r0 + k));
            a0 = _mm256_fmadd_ps(bf16_low8(w), x0, a0);
            c0 = _mm256_fmadd_ps(bf16_high8(w), x1, c0);
            w = _mm256_loadu_si256((const __m256i *)(r1 + k));
            a1 = _mm256_fmadd_ps(bf16_low8(w), x0, a1);
            c1 = _mm256_fmadd_ps(bf16_high8(w), x1, c1);
            w = _mm256_loadu_si256((const __m256i *)(r2 + k));
            a2 = _mm256_fmadd_ps(bf16_low8(w), x0, a2);
            c2 = _mm256_fmadd_ps(bf16_high8(w), x1, c2);
            w = _mm256_loadu_si256((const __m256i *)(r3 + k));
            a3 = _mm256_fmadd_ps(bf16_low8(w), x0, a3);
            c3 = _mm256_fmadd_ps(bf16_high8(w), x1, c3);
        }
        y[n] = hsum(_mm256_add_ps(a0, c0));
        y[n + 1] = hsum(_mm256_add_ps(a1, c1));
        y[n + 2] = hsum(_mm256_add_ps(a2, c2));
        y[n + 3] = hsum(_mm256_add_ps(a3, c3));
    }
    for (; n < hi; n++) {
        const uint16_t *r = W + (size_t)n * K;
        __m256 a = _mm256_setzero_ps(), c = a;
        for (int k = 0; k < K; k += 16) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(r + k));
            a = _mm256_fmadd_ps(bf16_low8(w), _mm256_load_ps(xf + k), a);
            c = _mm256_fmadd_ps(bf16_high8(w), _mm256_load_ps(xf + k + 8), c);
        }
        y[n] = hsum(_mm256_add_ps(a, c));
    }
}

/* The same on a CPU with AVX512_BF16 (Zen 4, Sapphire Rapids): vdpbf16ps multiplies 32 bf16 weights by 32 bf16
 * activations and adds the pairs into 16 fp32 sums, so the weights need no conversion at all. x is bf16 here (a
 * bf16 model's activation as it is, natural order). On a 2-core Zen 4 the AVX2 loop above decoded the 1.3B at
 * 8.6 tok/s, this one at 10.2 (four rows at a time as above: 9.2), against llama.cpp's BF16 at 10.3-11.6, which
 * uses these instructions. Compiled for that target alone and chosen at run time, so the library still loads on
 * AVX2-only CPUs; DSVL_NO_AVX512=1 keeps the AVX2 loop (for comparisons). */
__attribute__((target("avx512f,avx512bf16,avx512vl")))
static void rows_bf16_dp(const uint16_t *W, const uint16_t *xb, int K, int lo, int hi, float *y) {
    int K64 = K / 64 * 64; /* K is a multiple of 16 */
    for (int n = lo; n < hi; n++) {
        /* One row at a time, one sequential stream per thread (as rows_int8), in two independent chains. */
        const uint16_t *r = W + (size_t)n * K;
        __m512 a = _mm512_setzero_ps(), c = a;
        int k = 0;
        for (; k < K64; k += 64) {
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xb + k));
            c = _mm512_dpbf16_ps(c, (__m512bh)_mm512_loadu_si512(r + k + 32),
                                 (__m512bh)_mm512_loadu_si512(xb + k + 32));
        }
        for (; k + 16 <= K; k += 16) {
            __m256 t = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)_mm256_loadu_si256((const __m256i *)(r + k)),
                                        (__m256bh)_mm256_loadu_si256((const __m256i *)(xb + k)));
            a = _mm512_add_ps(a, _mm512_zextps256_ps512(t));
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
    }
}

/* Whether the bf16 GEMV runs rows_bf16_dp here (Python's backends() asks this too, so both say the same). */
int dsvl_bf16_dot(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512bf16") && getenv("DSVL_NO_AVX512") == NULL;
    }
    return known;
}

/* ------------------------------------------------------------------ int8 weights, one scale per row */
#define QBLOCK 32

/* x [K] -> int8 [K] in [-qmax, qmax] and one scale (amax / qmax) per block (symmetric, round half to even). With
 * `split`, each block's even elements come first and its odd ones after, to line up with NF4's high and low
 * nibbles. */
static void quantize_blocks(const float *x, int8_t *xq, float *scales, int K, int block, int split, int qmax) {
    for (int b = 0; b < K / block; b++) {
        const float *v = x + b * block;
        int8_t *out = xq + b * block;
        /* block is a multiple of 8. max_ps(|v|, a) keeps a where |v| is NaN, as fmaxf would. */
        __m256 a8 = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < block; i += 8) a8 = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)), a8);
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        float inv = amax > 0.0f ? qmax / amax : 0.0f;
        scales[b] = amax / qmax;
        /* cvtss2si rounds as lrintf does (to nearest even, the default mode) without a call into libm */
        for (int i = 0; i < block; i++)
            out[split ? (i % 2) * (block / 2) + i / 2 : i] = (int8_t)_mm_cvtss_si32(_mm_set_ss(v[i] * inv));
    }
}

/* Eight int32 partial sums of w·x over 32 int8 pairs. maddubs wants one unsigned operand: |x| and w·sign(x)
 * give the same products (x is never -128, since it is rounded from [-127, 127]). */
static inline __m256i dot32_i8(__m256i w, __m256i x) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* acc + the block of 32 at k of row w · the quantized activation, in fp32 (the block's activation scale applied). */
static inline __m256 add_block_i8(const int8_t *w, const int8_t *xq, const float *xs, int k, __m256 acc) {
    __m256i d = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + k)), _mm256_load_si256((const __m256i *)(xq + k)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(xs + k / QBLOCK), acc);
}

/* y[n] = scale[n] · W[n]·x for rows n in [lo, hi) of int8 W [N, K]; x quantized per block of 32 (xq aligned). */
static void rows_int8(const int8_t *W, const float *scale, const int8_t *xq, const float *xs, int K, int lo, int hi,
                      float *y) {
    /* One row at a time in two independent chains: one sequential stream per thread reads faster than four
     * interleaved rows (27.9 vs 23.6 GB/s over 48 distinct 5632 x 2048 matrices, 2 threads, this machine). */
    for (int n = lo; n < hi; n++) {
        const int8_t *r = W + (size_t)n * K;
        __m256 a = _mm256_setzero_ps(), c = a;
        int k = 0;
        for (; k + 2 * QBLOCK <= K; k += 2 * QBLOCK) {
            a = add_block_i8(r, xq, xs, k, a);
            c = add_block_i8(r, xq, xs, k + QBLOCK, c);
        }
        if (k < K) a = add_block_i8(r, xq, xs, k, a);
        y[n] = hsum(_mm256_add_ps(a, c)) * scale[n];
    }
}

/* ------------------------------------------------------------------ NF4 weights (bitsandbytes' 4-bit format) */
/* W is bitsandbytes' packed NF4: two 4-bit codes per byte, the first element in the high nibble, one absmax per
 * block of 64 consecutive elements (taken here as fp32, already un-double-quantized). The 16 NF4 levels come as
 * int8 (round(level * 127)); a code becomes the unsigned byte level + 127 (0..254) with one byte shuffle, so the
 * products run on maddubs (unsigned × signed bytes) with no sign fix-up (a third fewer instructions: the kernel
 * was compute-bound at ~14 GB/s on 2 AVX2 cores), and 127·Σx per block is taken back off in integers. maddubs
 * adds pairs of products in 16 bits and 2 · 254 · 63 fits, so the activation is quantized to [-63, 63] per block
 * of 64 (the kernel's own error is then ~1.4 % of a product, NF4's ~9 %), its even and odd elements stored apart
 * so that they line up with the high and low nibbles. */
#define NF4QMAX 63

/* Eight int32 partial sums of one row's 64-element block against the split activation block: the products with
 * level + 127 (0..254), less `correction` (127·Σx of the block in lane 0), so exactly Σ level·x. */
static inline __m256i dot64_nf4(const uint8_t *packed, const int8_t *xq, __m256i lut, const int32_t *correction) {
    __m256i v = _mm256_loadu_si256((const __m256i *)packed), low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)xq)), ones);
    __m256i q = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + 32))), ones);
    p = _mm256_add_epi32(p, q);
    return _mm256_sub_epi32(p, _mm256_load_si256((const __m256i *)correction));
}

/* y[n] = dequant(W[n])·x for rows n in [lo, hi); W packed [N * K / 2] bytes, absmax [N * K / 64], levels int8
 * [16]; x quantized per split block of 64, xs its scales already divided by 127 (the levels' scale), correction
 * eight int32 per block (see dot64_nf4). */
static void rows_nf4(const uint8_t *W, const float *absmax, const int8_t *levels, const int8_t *xq, const float *xs,
                     const int32_t *correction, int K, int lo, int hi, float *y) {
    uint8_t shifted[16];
    for (int i = 0; i < 16; i++) shifted[i] = (uint8_t)(levels[i] + 127);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)shifted));
    const int nb = K / NF4BLOCK;
    for (int n = lo; n < hi; n++) {
        const uint8_t *row = W + (size_t)n * K / 2;
        const float *am = absmax + (size_t)n * nb;
        __m256 a = _mm256_setzero_ps(), c = a;
        int b = 0;
        for (; b + 2 <= nb; b += 2) { /* two blocks per pass: two independent chains */
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64_nf4(row + b * 32, xq + b * NF4BLOCK, lut, correction + b * 8)),
                                _mm256_set1_ps(am[b] * xs[b]), a);
            c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64_nf4(row + (b + 1) * 32, xq + (b + 1) * NF4BLOCK, lut,
                                                             correction + (b + 1) * 8)),
                                _mm256_set1_ps(am[b + 1] * xs[b + 1]), c);
        }
        if (b < nb)
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64_nf4(row + b * 32, xq + b * NF4BLOCK, lut, correction + b * 8)),
                                _mm256_set1_ps(am[b] * xs[b]), a);
        y[n] = hsum(_mm256_add_ps(a, c));
    }
}

/* ------------------------------------------------------------------ several products of one activation */
/* A decoder layer multiplies one vector by q, k and v, and another by gate and up: one call does each group,
 * preparing (converting, quantizing) the vector once and waking the threads once. With `swiglu` the two
 * products g = gate·x and u = up·x leave as silu(g)·u, rounded where PyTorch rounds (g, u, silu(g) and the
 * product each to the output dtype). */

/* Thread t's share of n rows: contiguous, starting on a multiple of 8 (the silu below runs 8 at a time). The
 * same n gives the same share, so a thread reads back exactly the gate rows it wrote. */
static inline int share(int n, int t, int threads) { return t >= threads ? n : (int)((long)n * t / threads) & ~7; }

/* out[n] = silu(g[n]) · u[n] for n in [lo, hi). silu(g) = g·σ(g), with σ from e = exp(-|g|) (never overflows). */
static void swiglu_rows(const float *g, const float *u, void *out, int bf16, int lo, int hi) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int n = lo;
    for (; n + 8 <= hi; n += 8) {
        __m256 gv = _mm256_loadu_ps(g + n), uv = _mm256_loadu_ps(u + n);
        if (bf16) gv = round_bf16x8(gv), uv = round_bf16x8(uv);
        __m256 m = _mm256_or_ps(gv, sign); /* -|g| */
        __m256 e = exp8_nonpositive(m);
        e = _mm256_and_ps(e, _mm256_cmp_ps(m, _mm256_set1_ps(-87.0f), _CMP_GE_OQ)); /* 0 where it underflows */
        __m256 num = _mm256_blendv_ps(one, e, gv);           /* σ(g) = 1/(1+e) for g ≥ 0, e/(1+e) below */
        __m256 s = _mm256_div_ps(_mm256_mul_ps(gv, num), _mm256_add_ps(one, e)); /* g/(1+e) as PyTorch, g ≥ 0 */
        if (bf16) s = round_bf16x8(s);
        store8(out, bf16, n, _mm256_mul_ps(s, uv));
    }
    for (; n < hi; n++) {
        float gv = round_to(g[n], bf16), uv = round_to(u[n], bf16), e = expf(-fabsf(gv));
        float s = round_to(gv * (gv >= 0.0f ? 1.0f : e) / (1.0f + e), bf16);
        store(out, bf16, n, s * uv);
    }
}

/* y[m] = W[m]·x for m < count, every W[m] [N[m], K] of one kind: bf16 (scale, levels unused), int8 (scale
 * [N] per row) or NF4 (scale: absmax per 64; levels int8 [16]). K a multiple of 16 (bf16), 32 (int8), 64 (NF4).
 * With swiglu (count 2, N[0] = N[1]): y[0] = silu(W[0]·x)·(W[1]·x), y[1] unused. x and y bf16 or fp32.
 * Returns 0, or -1 on OOM. */
int dsvl_gemv(int kind, int count, const void *const *W, const float *const *scale, const int8_t *const *levels,
              const int *N, const void *x, int x_bf16, void *const *y, int y_bf16, int K, int swiglu, int threads) {
    long total = 0;
    for (int m = 0; m < count; m++) total += N[m];
    float *xf = aligned_alloc(64, ((size_t)K * sizeof(float) + 63) / 64 * 64);
    int8_t *xq = aligned_alloc(64, ((size_t)K + 63) / 64 * 64);
    float *xs = malloc((size_t)(K / QBLOCK + 1) * sizeof(float));
    int32_t *correction = aligned_alloc(64, ((size_t)(K / NF4BLOCK) * 32 + 63) / 64 * 64 + 64); /* NF4: 8 per block */
    float *f = malloc((size_t)(total + 1) * sizeof(float)); /* every product in fp32, one after another */
    if (!xf || !xq || !xs || !correction || !f) { free(xf); free(xq); free(xs); free(correction); free(f); return -1; }
    /* A bf16 activation goes as it is to vdpbf16ps (an fp32 one keeps the AVX2 loop: no rounding of x added). */
    const int dot = kind == KIND_BF16 && x_bf16 && dsvl_bf16_dot();
    if (!dot) load_vector(x, x_bf16, xf, K);
    if (kind == KIND_BF16 && !dot) interleave_quads(xf, K);
    if (kind == KIND_INT8) quantize_blocks(xf, xq, xs, K, QBLOCK, 0, 127);
    if (kind == KIND_NF4) {
        memset(correction, 0, (size_t)(K / NF4BLOCK) * 32);
        quantize_blocks(xf, xq, xs, K, NF4BLOCK, 1, NF4QMAX);
        for (int b = 0; b < K / NF4BLOCK; b++) {
            int sum = 0;
            for (int i = 0; i < NF4BLOCK; i++) sum += xq[b * NF4BLOCK + i];
            correction[b * 8] = 127 * sum;
            xs[b] /= 127.0f; /* times the levels' 1/127 */
        }
    }
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *fm = f;
        for (int m = 0; m < count; fm += N[m], m++) {
            int lo = share(N[m], t, nt), hi = share(N[m], t + 1, nt);
            if (dot) rows_bf16_dp((const uint16_t *)W[m], (const uint16_t *)x, K, lo, hi, fm);
            else if (kind == KIND_BF16) rows_bf16((const uint16_t *)W[m], xf, K, lo, hi, fm);
            else if (kind == KIND_INT8) rows_int8((const int8_t *)W[m], scale[m], xq, xs, K, lo, hi, fm);
            else rows_nf4((const uint8_t *)W[m], scale[m], levels[m], xq, xs, correction, K, lo, hi, fm);
            if (!swiglu)
                for (int n = lo; n < hi; n++) store(y[m], y_bf16, n, fm[n]);
        }
        if (swiglu) swiglu_rows(f, f + N[0], y[0], y_bf16, share(N[0], t, nt), share(N[0], t + 1, nt));
    }
    free(xf);
    free(xq);
    free(xs);
    free(correction);
    free(f);
    return 0;
}

/* ------------------------------------------------------------------ one-token attention over the KV cache */
/* softmax(q·Kᵀ·scale)·V for every query head, in fp32, for a single new token (batch 1, no mask).
 * q [H, D]; keys: element (kv, s, d) at k + kv*k_head + s*k_pos + d; values stored transposed: element
 * (kv, s, d) at vt + kv*v_head + d*v_dim + s; out [H, D]. Query head h reads kv head h / (H / Hkv).
 * All tensors share one dtype (bf16 or fp32). D must be a multiple of 8. Returns 0, or -1 on OOM. */
int dsvl_attend_decode(const void *q, const void *k, long k_head, long k_pos, const void *vt, long v_head,
                       long v_dim, void *out, int H, int Hkv, int D, int S, float scale, int bf16, int threads) {
    int group = H / Hkv, failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *p = malloc((size_t)S * sizeof(float)), *qf = malloc((size_t)D * sizeof(float));
        if (!p || !qf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int h = 0; h < H; h++) {
            if (!p || !qf) continue;
            int kv = h / group;
            for (int d = 0; d < D; d++) qf[d] = load1(q, (size_t)h * D + d, bf16);
            const size_t kbase = (size_t)kv * k_head, vbase = (size_t)kv * v_head;
            /* Scores: four keys at a time, so four independent FMA chains hide the FMA latency. */
            float max = -INFINITY;
            int s = 0;
            for (; s + 4 <= S; s += 4) {
                const size_t r = kbase + (size_t)s * k_pos;
                if (s + 20 <= S) { /* each head's keys are a short stream: pull the rows 16 keys ahead in */
                    const size_t item = bf16 ? 2 : 4;
                    const char *ahead = (const char *)k + (r + 16 * (size_t)k_pos) * item;
                    for (int j = 0; j < 4; j++)
                        for (size_t b = 0; b < (size_t)D * item; b += 64) _mm_prefetch(ahead + j * k_pos * item + b, _MM_HINT_T0);
                }
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int d = 0; d < D; d += 8) {
                    __m256 qv = _mm256_loadu_ps(qf + d);
                    a0 = _mm256_fmadd_ps(load8(k, r + d, bf16), qv, a0);
                    a1 = _mm256_fmadd_ps(load8(k, r + k_pos + d, bf16), qv, a1);
                    a2 = _mm256_fmadd_ps(load8(k, r + 2 * k_pos + d, bf16), qv, a2);
                    a3 = _mm256_fmadd_ps(load8(k, r + 3 * k_pos + d, bf16), qv, a3);
                }
                p[s] = hsum(a0) * scale, p[s + 1] = hsum(a1) * scale;
                p[s + 2] = hsum(a2) * scale, p[s + 3] = hsum(a3) * scale;
                max = fmaxf(max, fmaxf(fmaxf(p[s], p[s + 1]), fmaxf(p[s + 2], p[s + 3])));
            }
            for (; s < S; s++) {
                __m256 a = _mm256_setzero_ps();
                for (int d = 0; d < D; d += 8)
                    a = _mm256_fmadd_ps(load8(k, kbase + (size_t)s * k_pos + d, bf16), _mm256_loadu_ps(qf + d), a);
                p[s] = hsum(a) * scale;
                max = fmaxf(max, p[s]);
            }
            __m256 sum8 = _mm256_setzero_ps(), m8 = _mm256_set1_ps(max); /* libm's expf was ~10% of the call */
            for (s = 0; s + 8 <= S; s += 8) {
                __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + s), m8));
                _mm256_storeu_ps(p + s, e);
                sum8 = _mm256_add_ps(sum8, e);
            }
            float total = hsum(sum8);
            for (; s < S; s++) total += (p[s] = expf(p[s] - max));
            float inv = 1.0f / total;
            /* Weighted sum of values: four value rows (head dims) at a time share each load of p. */
            for (int d = 0; d < D; d += 4) {
                const size_t r = vbase + (size_t)d * v_dim;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                int t = 0;
                for (; t + 8 <= S; t += 8) {
                    if ((t & 31) == 0 && d + 4 < D) {
                        /* Value rows are short (S elements) and far apart: the hardware prefetcher barely ramps
                         * up on each. Pull the next four rows in while these four are summed (~30% faster). */
                        const size_t item = bf16 ? 2 : 4, row_bytes = (size_t)v_dim * item;
                        const char *next = (const char *)vt + (r + 4 * (size_t)v_dim + t) * item;
                        _mm_prefetch(next, _MM_HINT_T0);
                        _mm_prefetch(next + row_bytes, _MM_HINT_T0);
                        _mm_prefetch(next + 2 * row_bytes, _MM_HINT_T0);
                        _mm_prefetch(next + 3 * row_bytes, _MM_HINT_T0);
                    }
                    __m256 pv = _mm256_loadu_ps(p + t);
                    a0 = _mm256_fmadd_ps(load8(vt, r + t, bf16), pv, a0);
                    a1 = _mm256_fmadd_ps(load8(vt, r + v_dim + t, bf16), pv, a1);
                    a2 = _mm256_fmadd_ps(load8(vt, r + 2 * v_dim + t, bf16), pv, a2);
                    a3 = _mm256_fmadd_ps(load8(vt, r + 3 * v_dim + t, bf16), pv, a3);
                }
                float y0 = hsum(a0), y1 = hsum(a1), y2 = hsum(a2), y3 = hsum(a3);
                for (; t < S; t++) {
                    y0 += load1(vt, r + t, bf16) * p[t];
                    y1 += load1(vt, r + v_dim + t, bf16) * p[t];
                    y2 += load1(vt, r + 2 * v_dim + t, bf16) * p[t];
                    y3 += load1(vt, r + 3 * v_dim + t, bf16) * p[t];
                }
                store(out, bf16, h * D + d, y0 * inv);
                store(out, bf16, h * D + d + 1, y1 * inv);
                store(out, bf16, h * D + d + 2, y2 * inv);
                store(out, bf16, h * D + d + 3, y3 * inv);
            }
        }
        free(p);
        free(qf);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------ small fused steps of a decoder layer */
/* In a decode step these run on one 2048-vector each, where PyTorch spends more time dispatching its five to
 * seven small ops than computing. Both round where transformers' Llama rounds (every op PyTorch rounds to the
 * model dtype is rounded here too); only fp32 summation order differs. */

/* out = w * (x / sqrt(mean(x²) + eps)), statistics in fp32; x, w, out [K] of one dtype. */
void dsvl_rmsnorm(const void *x, const void *w, void *out, int K, float eps, int bf16) {
    __m256 squares = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = load8(x, k, bf16);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    float sum = hsum(squares);
    for (int t = k; t < K; t++) sum += load1(x, t, bf16) * load1(x, t, bf16);
    float r = 1.0f / sqrtf(sum / K + eps);
    for (k = 0; k + 8 <= K; k += 8) {
        __m256 h = _mm256_mul_ps(load8(x, k, bf16), _mm256_set1_ps(r));
        store8(out, bf16, k, _mm256_mul_ps(load8(w, k, bf16), bf16 ? round_bf16x8(h) : h));
    }
    for (; k < K; k++) store(out, bf16, k, load1(w, k, bf16) * round_to(load1(x, k, bf16) * r, bf16));
}

/* x <- x * cos + rotate_half(x) * sin in place, for `heads` rows of D; cos, sin [D]. Each row's halves (x1, x2)
 * become (x1·cos - x2·sin, x2·cos + x1·sin), each product rounded, then the sum. */
static void rotate_rows(void *x, const void *cos, const void *sin, int heads, int D, int bf16) {
    const int half = D / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int h = 0; h < heads; h++) {
        const size_t base = (size_t)h * D;
        int d = 0;
        for (; d + 8 <= half; d += 8) {
            __m256 x1 = load8(x, base + d, bf16), x2 = load8(x, base + half + d, bf16);
            __m256 a1 = _mm256_mul_ps(x1, load8(cos, d, bf16));
            __m256 b1 = _mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(sin, d, bf16));
            __m256 a2 = _mm256_mul_ps(x2, load8(cos, half + d, bf16));
            __m256 b2 = _mm256_mul_ps(x1, load8(sin, half + d, bf16));
            if (bf16) a1 = round_bf16x8(a1), b1 = round_bf16x8(b1), a2 = round_bf16x8(a2), b2 = round_bf16x8(b2);
            store8(x, bf16, base + d, _mm256_add_ps(a1, b1));
            store8(x, bf16, base + half + d, _mm256_add_ps(a2, b2));
        }
        for (; d < half; d++) {
            float x1 = load1(x, base + d, bf16), x2 = load1(x, base + half + d, bf16);
            store(x, bf16, base + d,
                  round_to(x1 * load1(cos, d, bf16), bf16) + round_to(-x2 * load1(sin, d, bf16), bf16));
            store(x, bf16, base + half + d,
                  round_to(x2 * load1(cos, half + d, bf16), bf16) + round_to(x1 * load1(sin, half + d, bf16), bf16));
        }
    }
}

/* RoPE of one token's queries q [q_heads, D] and keys k [k_heads, D], in place. */
void dsvl_rotary(void *q, int q_heads, void *k, int k_heads, const void *cos, const void *sin, int D, int bf16) {
    rotate_rows(q, cos, sin, q_heads, D, bf16);
    rotate_rows(k, cos, sin, k_heads, D, bf16);
}

/* ------------------------------------------------------------------ one decoder layer, one token */
/* x += o over n elements of the dtype, rounded as PyTorch's add rounds (the residual connections). */
static void add_into(void *x, const void *o, int n, int bf16) {
    for (int i = 0; i < n; i++) store(x, bf16, i, load1(x, i, bf16) + load1(o, i, bf16));
}

/* A decode step's layer as one call: in Python the same layer costs ~25 small calls and ~0.4 ms of interpreter
 * and dispatch time on top of the kernels (~10 ms of a 4-bit 1.3B step on 2 AVX2 cores). Every step is one of
 * the functions above, so the results are those of the layer run op by op through the native kernels (bitwise):
 *   h = rmsnorm(x, norm1); q, k, v = h·W[0..2]; rotary(q, k); cache[pos] = k, v; a = attention(q, cache[..pos]);
 *   x = x + a·W[3]; h = rmsnorm(x, norm2); x = x + (silu(h·W[4]) · h·W[5])·W[6]
 * x [C] is updated in place; W as in dsvl_gemv (q, k, v, o, gate, up, down; one kind); keys [Hkv, cap, D] and
 * values [Hkv, D, cap] are the layer's KV cache buffers, pos the new token's index in them. Returns 0, -1 on OOM. */
int dsvl_decode_layer(void *x, const void *norm1, const void *norm2, float eps, int kind, const void *const *W,
                      const float *const *scale, const int8_t *const *levels, const void *cos, const void *sin,
                      void *keys, void *values, int cap, int pos, int H, int Hkv, int D, int C, int I,
                      float attn_scale, int bf16, int threads) {
    const size_t item = bf16 ? 2 : 4;
    const int qn = H * D, kn = Hkv * D;
    char *buf = malloc(((size_t)C + 2 * (size_t)qn + 2 * (size_t)kn + (size_t)C + (size_t)I) * item);
    if (!buf) return -1;
    char *h = buf, *q = h + (size_t)C * item, *k = q + (size_t)qn * item, *v = k + (size_t)kn * item;
    char *a = v + (size_t)kn * item, *o = a + (size_t)qn * item, *m = o + (size_t)C * item;
    int rc = 0, qkv_rows[3] = {qn, kn, kn}, c_rows[1] = {C}, i_rows[2] = {I, I};
    void *qkv[3] = {q, k, v}, *out_o[1] = {o}, *out_m[1] = {m};

    dsvl_rmsnorm(x, norm1, h, C, eps, bf16);
    rc |= dsvl_gemv(kind, 3, W, scale, levels, qkv_rows, h, bf16, qkv, bf16, C, 0, threads);
    rotate_rows(q, cos, sin, H, D, bf16);
    rotate_rows(k, cos, sin, Hkv, D, bf16);
    for (int j = 0; j < Hkv; j++) {
        memcpy((char *)keys + (((size_t)j * cap + pos) * D) * item, k + (size_t)j * D * item, (size_t)D * item);
        for (int d = 0; d < D; d++) {
            size_t to = ((size_t)j * D + d) * cap + pos;
            if (bf16) ((uint16_t *)values)[to] = ((const uint16_t *)v)[(size_t)j * D + d];
            else ((float *)values)[to] = ((const float *)v)[(size_t)j * D + d];
        }
    }
    rc |= dsvl_attend_decode(q, keys, (long)cap * D, D, values, (long)D * cap, cap, a, H, Hkv, D, pos + 1,
                             attn_scale, bf16, threads);
    rc |= dsvl_gemv(kind, 1, W + 3, scale + 3, levels + 3, c_rows, a, bf16, out_o, bf16, qn, 0, threads);
    add_into(x, o, C, bf16);
    dsvl_rmsnorm(x, norm2, h, C, eps, bf16);
    rc |= dsvl_gemv(kind, 2, W + 4, scale + 4, levels + 4, i_rows, h, bf16, out_m, bf16, C, 1, threads);
    rc |= dsvl_gemv(kind, 1, W + 6, scale + 6, levels + 6, c_rows, m, bf16, out_o, bf16, I, 0, threads);
    add_into(x, o, C, bf16);
    free(buf);
    return rc ? -1 : 0;
}

/* ------------------------------------------------------------------ NF4 dequantization */
/* out [N*K] = level[code] * absmax of its block, for the compute-bound (many-row) products: fp32, or bf16 rounded
 * to nearest even (as PyTorch rounds) where the product runs in bf16, so no fp32 copy is written and converted. */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void dsvl_dequantize_nf4(const uint8_t *W, const float *absmax, const float *levels, void *out, long numel,
                         int bf16, int threads) {
    float *f32 = out;
    uint16_t *b16 = out;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < numel / 2; i++) {
        float scale = absmax[(2 * i) / NF4BLOCK], hi = levels[W[i] >> 4] * scale, lo = levels[W[i] & 15] * scale;
        if (bf16) {
            b16[2 * i] = bf16_round(hi);
            b16[2 * i + 1] = bf16_round(lo);
        } else {
            f32[2 * i] = hi;
            f32[2 * i + 1] = lo;
        }
    }
}
