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

/* ------------------------------------------------------------------ conversions */
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

static inline void store(void *y, int is_bf16, int n, float v) {
    if (is_bf16) ((uint16_t *)y)[n] = f32_to_bf16(v);
    else ((float *)y)[n] = v;
}

/* ------------------------------------------------------------------ bf16 weights */
/* One row's dot product, for the N % 4 tail rows. */
static float dot_bf16_row(const uint16_t *w, const float *x, int K) {
    __m256 a = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8)
        a = _mm256_fmadd_ps(bf16x8_to_f32(_mm_loadu_si128((const __m128i *)(w + k))), _mm256_loadu_ps(x + k), a);
    float s = hsum(a);
    for (; k < K; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}

/* y = W x for bf16 W [N, K]; K must be a multiple of 16 (checked by the caller). Returns 0, or -1 on OOM. */
int dsvl_gemv_bf16(const uint16_t *W, const void *x, int x_bf16, void *y, int y_bf16, int N, int K, int threads) {
    float *xf = aligned_alloc(64, ((size_t)K * sizeof(float) + 63) / 64 * 64);
    if (!xf) return -1;
    load_vector(x, x_bf16, xf, K);
    int blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        /* Four rows at a time share each load of x; two accumulators per row hide the FMA latency. */
        const uint16_t *r0 = W + (size_t)b * 4 * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (int k = 0; k < K; k += 16) {
            __m256 x0 = _mm256_load_ps(xf + k), x1 = _mm256_load_ps(xf + k + 8);
            __m256i w;
            w = _mm256_loadu_si256((const __m256i *)(r0 + k));
            a0 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_castsi256_si128(w)), x0, a0);
            c0 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_extracti128_si256(w, 1)), x1, c0);
            w = _mm256_loadu_si256((const __m256i *)(r1 + k));
            a1 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_castsi256_si128(w)), x0, a1);
            c1 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_extracti128_si256(w, 1)), x1, c1);
            w = _mm256_loadu_si256((const __m256i *)(r2 + k));
            a2 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_castsi256_si128(w)), x0, a2);
            c2 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_extracti128_si256(w, 1)), x1, c2);
            w = _mm256_loadu_si256((const __m256i *)(r3 + k));
            a3 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_castsi256_si128(w)), x0, a3);
            c3 = _mm256_fmadd_ps(bf16x8_to_f32(_mm256_extracti128_si256(w, 1)), x1, c3);
        }
        int n = b * 4;
        store(y, y_bf16, n, hsum(_mm256_add_ps(a0, c0)));
        store(y, y_bf16, n + 1, hsum(_mm256_add_ps(a1, c1)));
        store(y, y_bf16, n + 2, hsum(_mm256_add_ps(a2, c2)));
        store(y, y_bf16, n + 3, hsum(_mm256_add_ps(a3, c3)));
    }
    for (int n = blocks * 4; n < N; n++) store(y, y_bf16, n, dot_bf16_row(W + (size_t)n * K, xf, K));
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------ int8 weights, one scale per row */
#define QBLOCK 32

/* x [K] -> int8 [K] and one scale (amax / 127) per block (symmetric, round half to even). With `split`, each
 * block's even elements come first and its odd ones after, to line up with NF4's high and low nibbles. */
static void quantize_blocks(const float *x, int8_t *xq, float *scales, int K, int block, int split) {
    for (int b = 0; b < K / block; b++) {
        const float *v = x + b * block;
        int8_t *out = xq + b * block;
        /* block is a multiple of 8. max_ps(|v|, a) keeps a where |v| is NaN, as fmaxf would. */
        __m256 a8 = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < block; i += 8) a8 = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)), a8);
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        scales[b] = amax / 127.0f;
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

/* y = (W * scale[:, None]) x for int8 W [N, K]; K must be a multiple of 32. Returns 0, or -1 on OOM. */
int dsvl_gemv_int8(const int8_t *W, const float *scale, const void *x, int x_bf16, void *y, int y_bf16,
                   int N, int K, int threads) {
    float *xf = malloc((size_t)K * sizeof(float));
    int8_t *xq = aligned_alloc(64, ((size_t)K + 63) / 64 * 64);
    float *xs = malloc((size_t)(K / QBLOCK) * sizeof(float));
    if (!xf || !xq || !xs) { free(xf); free(xq); free(xs); return -1; }
    load_vector(x, x_bf16, xf, K);
    quantize_blocks(xf, xq, xs, K, QBLOCK, 0);
    /* One row at a time in two independent chains: one sequential stream per thread reads faster than four
     * interleaved rows (27.9 vs 23.6 GB/s over 48 distinct 5632 x 2048 matrices, 2 threads, this machine). */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const int8_t *r = W + (size_t)n * K;
        __m256 a = _mm256_setzero_ps(), c = a;
        int k = 0;
        for (; k + 2 * QBLOCK <= K; k += 2 * QBLOCK) {
            a = add_block_i8(r, xq, xs, k, a);
            c = add_block_i8(r, xq, xs, k + QBLOCK, c);
        }
        if (k < K) a = add_block_i8(r, xq, xs, k, a);
        store(y, y_bf16, n, hsum(_mm256_add_ps(a, c)) * scale[n]);
    }
    free(xf);
    free(xq);
    free(xs);
    return 0;
}

/* ------------------------------------------------------------------ one-token attention over the KV cache */
static inline __m256 load8(const void *p, size_t i, int bf16) {
    if (bf16) return bf16x8_to_f32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

static inline float load1(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* e^x for x <= 0 (scores minus their max), eight at a time: 2^n · e^r with r = x - n·ln2 in [-ln2/2, ln2/2] and a
 * degree-6 polynomial for e^r (relative error ~2e-7, against ~1e-7 for libm's expf). Below -87 the result is
 * clamped to e^-87 ≈ 1.6e-38, nothing next to the max's weight of 1. */
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
static inline float round_to(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* out = w * (x / sqrt(mean(x²) + eps)), statistics in fp32; x, w, out [K] of one dtype. */
void dsvl_rmsnorm(const void *x, const void *w, void *out, int K, float eps, int bf16) {
    float sum = 0.0f;
    for (int k = 0; k < K; k++) {
        float v = load1(x, k, bf16);
        sum += v * v;
    }
    float r = 1.0f / sqrtf(sum / K + eps);
    for (int k = 0; k < K; k++) store(out, bf16, k, load1(w, k, bf16) * round_to(load1(x, k, bf16) * r, bf16));
}

/* x <- x * cos + rotate_half(x) * sin in place, for `heads` rows of D; cos, sin [D]. */
void dsvl_rotary(void *x, const void *cos, const void *sin, int heads, int D, int bf16) {
    int half = D / 2;
    float row[1024];
    for (int h = 0; h < heads; h++) {
        size_t base = (size_t)h * D;
        for (int d = 0; d < D; d++) row[d] = load1(x, base + d, bf16);
        for (int d = 0; d < D; d++) {
            float rotated = d < half ? -row[d + half] : row[d - half];
            float a = round_to(row[d] * load1(cos, d, bf16), bf16), b = round_to(rotated * load1(sin, d, bf16), bf16);
            store(x, bf16, base + d, a + b);
        }
    }
}

/* ------------------------------------------------------------------ NF4 weights (bitsandbytes' 4-bit format) */
/* W is bitsandbytes' packed NF4: two 4-bit codes per byte, the first element in the high nibble, one absmax per
 * block of 64 consecutive elements (taken here as fp32, already un-double-quantized). The 16 NF4 levels come as
 * int8 (round(level * 127)): a code becomes an int8 weight with one byte shuffle, then the dot products run on
 * integer instructions as in dsvl_gemv_int8 (llama.cpp's IQ4_NL does the same). The activation is quantized per
 * block of 64, its even and odd elements stored apart so that they line up with the high and low nibbles. */
#define NF4BLOCK 64

/* Eight int32 partial sums of one row's 64-element block against the split activation block. */
static inline __m256i dot64_nf4(const uint8_t *packed, const int8_t *xq, __m256i lut) {
    __m256i v = _mm256_loadu_si256((const __m256i *)packed), low4 = _mm256_set1_epi8(0x0f);
    __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
    return _mm256_add_epi32(dot32_i8(hi, _mm256_loadu_si256((const __m256i *)xq)),
                            dot32_i8(lo, _mm256_loadu_si256((const __m256i *)(xq + NF4BLOCK / 2))));
}

/* y = dequant(W) x; W packed [N * K / 2] bytes, absmax [N * K / 64], levels int8 [16]; K a multiple of 64. */
int dsvl_gemv_nf4(const uint8_t *W, const float *absmax, const int8_t *levels, const void *x, int x_bf16,
                  void *y, int y_bf16, int N, int K, int threads) {
    float *xf = malloc((size_t)K * sizeof(float));
    int8_t *xq = malloc((size_t)K);
    float *xs = malloc((size_t)(K / NF4BLOCK) * sizeof(float));
    if (!xf || !xq || !xs) { free(xf); free(xq); free(xs); return -1; }
    load_vector(x, x_bf16, xf, K);
    quantize_blocks(xf, xq, xs, K, NF4BLOCK, 1);
    for (int b = 0; b < K / NF4BLOCK; b++) xs[b] /= 127.0f; /* times the levels' 1/127 */
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)levels));
    const int nb = K / NF4BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = W + (size_t)n * K / 2;
        const float *am = absmax + (size_t)n * nb;
        __m256 a = _mm256_setzero_ps(), c = a;
        int b = 0;
        for (; b + 2 <= nb; b += 2) { /* two blocks per pass: two independent chains */
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64_nf4(row + b * 32, xq + b * NF4BLOCK, lut)),
                                _mm256_set1_ps(am[b] * xs[b]), a);
            c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64_nf4(row + (b + 1) * 32, xq + (b + 1) * NF4BLOCK, lut)),
                                _mm256_set1_ps(am[b + 1] * xs[b + 1]), c);
        }
        if (b < nb)
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64_nf4(row + b * 32, xq + b * NF4BLOCK, lut)),
                                _mm256_set1_ps(am[b] * xs[b]), a);
        store(y, y_bf16, n, hsum(_mm256_add_ps(a, c)));
    }
    free(xf);
    free(xq);
    free(xs);
    return 0;
}

/* out [N*K] fp32 = level[code] * absmax of its block, for the compute-bound (many-row) products. */
void dsvl_dequantize_nf4(const uint8_t *W, const float *absmax, const float *levels, float *out, long numel,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < numel / 2; i++) {
        float scale = absmax[(2 * i) / NF4BLOCK];
        out[2 * i] = levels[W[i] >> 4] * scale;
        out[2 * i + 1] = levels[W[i] & 15] * scale;
    }
}
