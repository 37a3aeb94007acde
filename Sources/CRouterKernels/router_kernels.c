#include "router_kernels.h"

#include <string.h>

// Written in C because a C function can be compiled once per x86-64 level and picked at load time
// (`target_clones`, an ifunc): the AVX-512 clone runs the products on 16-lane registers, the
// AVX2 and baseline clones run the same source on narrower ones. Swift has no per-function targets.
#if defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

/// 16 floats, loaded and stored unaligned through pointers. Values of this type never cross a
/// function boundary (its calling convention differs between the clones), hence the macros.
typedef float f32x16 __attribute__((ext_vector_type(16), aligned(4)));
#define LANES 16
#define LOAD(p) (*(const f32x16 *)(p))
#define STORE(p, v) (*(f32x16 *)(p) = (v))

// Register tiles of the two matrix products: TILE_TOKENS tokens × TILE_COLUMNS columns of [W1 W2]
// in the forward, TILE_COLUMNS columns × TILE_VECTORS vectors of d in the backward: 24 accumulators,
// which need AVX-512's 32 registers (`wide`). Otherwise the tiles are 1 token and 1 vector (6 accumulators).
#define TILE_TOKENS 4
#define TILE_COLUMNS 6
#define TILE_VECTORS 4
#define TILE_SUMS (TILE_TOKENS * TILE_COLUMNS)

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/// eˣ, branch-free so loops that call it vectorise (the Cephes expf polynomial): x = n·ln 2 + r
/// with |r| ≤ ln 2 / 2, eʳ by a degree-6 polynomial, 2ⁿ through the exponent bits. Inputs are
/// clamped to [−87.3, 88.3], where the result is a normal float.
INLINE float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    // Adding 1.5·2²³ rounds to an integer n, held in the low mantissa bits: bits = 0x4B40_0000 + n.
    float shifted = x * 1.44269504f + 12582912.0f;
    float n = shifted - 12582912.0f;
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.98756915e-4f;
    p = p * r + 1.39819995e-3f;
    p = p * r + 8.33345190e-3f;
    p = p * r + 4.16657959e-2f;
    p = p * r + 0.166666655f;
    p = p * r + 0.500000012f;
    float er = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, 4);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return er * scale;
}

int moqae_router_wide_tiles(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/// Prefetches share `part` of `parts` of the `bytes` at `base` (if any) into the L2 cache.
INLINE void prefetch_share(const char *base, size_t bytes, size_t part, size_t parts) {
    if (base == NULL) return;
    for (size_t at = bytes * part / parts / 64 * 64; at < bytes * (part + 1) / parts; at += 64) __builtin_prefetch(base + at, 0, 2);
}

/// sums[i] = Σ lanes of acc[i] for 8 accumulators: three rounds of adding the halves of two
/// vectors side by side, then one within a vector.
INLINE void sum8(const f32x16 *acc, float *sums) {
#define HALVES(x, y) (__builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) + \
                      __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#define QUARTERS(x, y) (__builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) + \
                        __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
#define EIGHTHS(x, y) (__builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) + \
                       __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    // Lanes of each result hold partial sums of: [a0 ×8, a1 ×8], then [a0 a2 a1 a3] ×4, then
    // [a0 a4 a2 a6 a1 a5 a3 a7] ×2.
    f32x16 b0 = HALVES(acc[0], acc[1]), b1 = HALVES(acc[2], acc[3]), b2 = HALVES(acc[4], acc[5]), b3 = HALVES(acc[6], acc[7]);
    f32x16 c0 = QUARTERS(b0, b1), c1 = QUARTERS(b2, b3);
    f32x16 e = EIGHTHS(c0, c1);
    float pairs[16];
    memcpy(pairs, &e, sizeof pairs);
    static const int order[8] = {0, 4, 2, 6, 1, 5, 3, 7};
    for (int i = 0; i < 8; i++) sums[order[i]] = pairs[2 * i] + pairs[2 * i + 1];
#undef HALVES
#undef QUARTERS
#undef EIGHTHS
}

/// sums[t·TILE_COLUMNS + c] = x[t] · w[c] for `tokens` (TILE_TOKENS or 1) rows of x (row stride d).
INLINE void dot_tile(const float *x, size_t d, const float *const w[TILE_COLUMNS], int tokens, float sums[TILE_SUMS]) {
    f32x16 acc[TILE_SUMS] = {0};
    size_t k = 0;
    for (; k + LANES <= d; k += LANES) {
        f32x16 xk[TILE_TOKENS];
        for (int t = 0; t < tokens; t++) xk[t] = LOAD(x + t * d + k);
        for (int c = 0; c < TILE_COLUMNS; c++) {
            f32x16 wc = LOAD(w[c] + k);
            for (int t = 0; t < tokens; t++) acc[t * TILE_COLUMNS + c] += xk[t] * wc;
        }
    }
    for (int i = 0; i < tokens * TILE_COLUMNS; i += 8) sum8(acc + i, sums + i);
    for (; k < d; k++) {
        for (int t = 0; t < tokens; t++) {
            for (int c = 0; c < TILE_COLUMNS; c++) sums[t * TILE_COLUMNS + c] += x[t * d + k] * w[c][k];
        }
    }
}

/// part[c][k ..< k + 16·vectors] += Σ_t g[c][t] · x[t][same], for the TILE_COLUMNS rows of a column tile
/// (rows at and past `columns` repeat the last real one and are not stored).
INLINE void outer_tile(const float *x, size_t n, size_t d, size_t k, const float *const g[TILE_COLUMNS],
                       float *const part[TILE_COLUMNS], size_t columns, int vectors, const char *prefetch, size_t prefetch_bytes) {
    f32x16 acc[TILE_COLUMNS][TILE_VECTORS];
    for (int c = 0; c < TILE_COLUMNS; c++) {
        for (int v = 0; v < vectors; v++) acc[c][v] = LOAD(part[c] + k + v * LANES);
    }
    for (size_t t = 0; t < n; t++) {
        prefetch_share(prefetch, prefetch_bytes, t, n);
        f32x16 xt[TILE_VECTORS];
        for (int v = 0; v < vectors; v++) xt[v] = LOAD(x + t * d + k + v * LANES);
        for (int c = 0; c < TILE_COLUMNS; c++) {
            float gct = g[c][t];
            for (int v = 0; v < vectors; v++) acc[c][v] += gct * xt[v];
        }
    }
    for (size_t c = 0; c < columns; c++) {
        for (int v = 0; v < vectors; v++) STORE(part[c] + k + v * LANES, acc[c][v]);
    }
}

/// σ(a), h = SiLU(a) ⊙ b (hw hidden columns), p = softmax(h·W3) and each token's argmax, for `rows`
/// tokens; scratch holds 2·rows floats.
INLINE void head_forward(size_t rows, size_t m, size_t hw, const float *w3, size_t stride, const float *ab,
                         float *sig, float *hidden, float *prob, int32_t *choice, float *scratch) {
    // The buffers never overlap (restrict), which lets these loops vectorise.
    for (size_t j = 0; j < hw; j++) {
        const float *restrict a = ab + j * stride, *restrict b = ab + (hw + j) * stride;
        float *restrict s = sig + j * stride, *restrict h = hidden + j * stride;
        for (size_t t = 0; t < rows; t++) {
            s[t] = 1.0f / (1.0f + exp_approx(-a[t]));
            h[t] = a[t] * s[t] * b[t];
        }
    }
    float *restrict maximum = scratch, *restrict sum = scratch + rows;
    for (size_t k = 0; k < m; k++) {
        float *restrict z = prob + k * stride;
        for (size_t t = 0; t < rows; t++) z[t] = 0;
        for (size_t j = 0; j < hw; j++) {
            const float *restrict h = hidden + j * stride;
            const float weight = w3[j * m + k];
            for (size_t t = 0; t < rows; t++) z[t] += h[t] * weight;
        }
        for (size_t t = 0; t < rows; t++) maximum[t] = k == 0 || z[t] > maximum[t] ? z[t] : maximum[t];
    }
    for (size_t t = 0; t < rows; t++) sum[t] = 0;
    for (size_t k = 0; k < m; k++) {
        float *restrict z = prob + k * stride;
        for (size_t t = 0; t < rows; t++) {
            z[t] = exp_approx(z[t] - maximum[t]);
            sum[t] += z[t];
        }
    }
    for (size_t k = 0; k < m; k++) {
        float *restrict p = prob + k * stride;
        for (size_t t = 0; t < rows; t++) p[t] /= sum[t];
    }
    // The argmax keeps the lowest index among equal probabilities; `maximum` holds the best so far.
    int32_t *restrict best = choice;
    for (size_t t = 0; t < rows; t++) {
        maximum[t] = prob[t];
        best[t] = 0;
    }
    for (size_t k = 1; k < m; k++) {
        const float *restrict p = prob + k * stride;
        for (size_t t = 0; t < rows; t++) {
            const int better = p[t] > maximum[t];
            maximum[t] = better ? p[t] : maximum[t];
            best[t] = better ? (int32_t)k : best[t];
        }
    }
}

CPU_CLONES
void moqae_router_forward(const float *x, size_t rows, size_t d, size_t m, size_t hw,
                          const float *w12t, const float *w3, size_t stride,
                          float *ab, float *sig, float *hidden, float *prob, int32_t *choice, float *scratch,
                          int wide, const void *prefetch, size_t prefetch_bytes) {
    // ab (2hw, stride) = [W1 W2]ᵀ · xᵀ, a column tile at a time; the first one also prefetches.
    const size_t tile_tokens = wide ? TILE_TOKENS : 1;
    const size_t token_tiles = rows / tile_tokens + rows % tile_tokens;
    const size_t columns = 2 * hw;
    for (size_t c0 = 0; c0 < columns; c0 += TILE_COLUMNS) {
        const size_t count = MIN(TILE_COLUMNS, columns - c0);
        const float *w[TILE_COLUMNS];
        for (size_t c = 0; c < TILE_COLUMNS; c++) w[c] = w12t + (c0 + MIN(c, count - 1)) * d;
        float sums[TILE_SUMS];
        for (size_t t0 = 0, tile = 0; t0 < rows; tile++) {
            if (c0 == 0) prefetch_share(prefetch, prefetch_bytes, tile, token_tiles);
            const int tokens = t0 + tile_tokens <= rows ? (int)tile_tokens : 1;
            if (tokens == TILE_TOKENS) dot_tile(x + t0 * d, d, w, TILE_TOKENS, sums);
            else dot_tile(x + t0 * d, d, w, 1, sums);
            for (int t = 0; t < tokens; t++) {
                for (size_t c = 0; c < count; c++) ab[(c0 + c) * stride + t0 + t] = sums[t * TILE_COLUMNS + c];
            }
            t0 += tokens;
        }
    }
    head_forward(rows, m, hw, w3, stride, ab, sig, hidden, prob, choice, scratch);
}

/// The backward of one chunk from its logit gradient dz (m, n) (see moqae_router_backward_chunk_logits).
INLINE void backward_from_logits(const float *x, size_t n, size_t d, size_t m, size_t hw, const float *w3, size_t stride,
                                 const float *ab, const float *sig, const float *hidden, const float *dz,
                                 float *scratch, float *part_w12t, float *part_w3, int wide,
                                 const void *prefetch, size_t prefetch_bytes) {
    float *restrict dh = scratch, *restrict g = dh + hw * n;  // (hw, n), (2hw, n)
    // dh = dz · W3ᵀ, part_w3 += hᵀ dz; then through h = SiLU(a) ⊙ b to ∂/∂a and ∂/∂b.
    for (size_t j = 0; j < hw; j++) {
        float *restrict dhj = dh + j * n;
        const float *restrict h = hidden + j * stride;
        for (size_t t = 0; t < n; t++) dhj[t] = 0;
        for (size_t k = 0; k < m; k++) {
            const float *restrict dzk = dz + k * n;
            const float weight = w3[j * m + k];
            for (size_t t = 0; t < n; t++) dhj[t] += dzk[t] * weight;
            f32x16 lanes = 0;
            size_t t = 0;
            for (; t + LANES <= n; t += LANES) lanes += LOAD(h + t) * LOAD(dzk + t);
            float total = 0;
            for (int l = 0; l < LANES; l++) total += lanes[l];
            for (; t < n; t++) total += h[t] * dzk[t];
            part_w3[j * m + k] += total;
        }
        const float *restrict a = ab + j * stride, *restrict b = ab + (hw + j) * stride, *restrict s = sig + j * stride;
        float *restrict ga = g + j * n, *restrict gb = g + (hw + j) * n;
        for (size_t t = 0; t < n; t++) {
            ga[t] = dhj[t] * b[t] * s[t] * (1.0f + a[t] * (1.0f - s[t]));
            gb[t] = dhj[t] * a[t] * s[t];
        }
    }
    // part_w12t (2hw, d) += g (2hw, n) · x (n, d), a column tile at a time; the first tile also prefetches.
    const size_t columns = 2 * hw;
    for (size_t c0 = 0; c0 < columns; c0 += TILE_COLUMNS) {
        const size_t count = MIN(TILE_COLUMNS, columns - c0);
        const float *gc[TILE_COLUMNS];
        float *part[TILE_COLUMNS];
        for (size_t c = 0; c < TILE_COLUMNS; c++) {
            gc[c] = g + (c0 + MIN(c, count - 1)) * n;
            part[c] = part_w12t + (c0 + MIN(c, count - 1)) * d;
        }
        size_t k = 0;
        for (; wide && k + TILE_VECTORS * LANES <= d; k += TILE_VECTORS * LANES) {
            const int first = c0 == 0 && k == 0;
            outer_tile(x, n, d, k, gc, part, count, TILE_VECTORS, first ? prefetch : NULL, prefetch_bytes);
        }
        for (; k + LANES <= d; k += LANES) {
            const int first = c0 == 0 && k == 0;
            outer_tile(x, n, d, k, gc, part, count, 1, first ? prefetch : NULL, prefetch_bytes);
        }
        for (; k < d; k++) {
            for (size_t c = 0; c < count; c++) {
                float total = 0;
                for (size_t t = 0; t < n; t++) total += gc[c][t] * x[t * d + k];
                part[c][k] += total;
            }
        }
    }
}

CPU_CLONES
void moqae_router_backward_chunk(const float *x, size_t n, size_t d, size_t m, size_t hw,
                                 const float *w3, size_t stride,
                                 const float *ab, const float *sig, const float *hidden, const float *prob,
                                 const float *upstream, float *scratch, float *part_w12t, float *part_w3,
                                 int wide, const void *prefetch, size_t prefetch_bytes) {
    // The buffers never overlap (restrict), which lets these loops vectorise.
    float *restrict inner = scratch, *restrict dz = inner + n;  // (n), (m, n); the rest goes to the shared backward
    // dz = p ⊙ (dP − ⟨p, dP⟩) / n: the softmax backward of dp = dP / n.
    const float seed = 1.0f / (float)n;
    for (size_t t = 0; t < n; t++) inner[t] = 0;
    for (size_t j = 0; j < m; j++) {
        const float *restrict p = prob + j * stride;
        for (size_t t = 0; t < n; t++) inner[t] += p[t] * upstream[j];
    }
    for (size_t k = 0; k < m; k++) {
        const float *restrict p = prob + k * stride;
        for (size_t t = 0; t < n; t++) dz[k * n + t] = p[t] * (upstream[k] - inner[t]) * seed;
    }
    backward_from_logits(x, n, d, m, hw, w3, stride, ab, sig, hidden, dz, dz + m * n, part_w12t, part_w3, wide, prefetch, prefetch_bytes);
}

CPU_CLONES
void moqae_router_backward_chunk_logits(const float *x, size_t n, size_t d, size_t m, size_t hw,
                                        const float *w3, size_t stride,
                                        const float *ab, const float *sig, const float *hidden, const float *dz,
                                        float *scratch, float *part_w12t, float *part_w3,
                                        int wide, const void *prefetch, size_t prefetch_bytes) {
    backward_from_logits(x, n, d, m, hw, w3, stride, ab, sig, hidden, dz, scratch, part_w12t, part_w3, wide, prefetch, prefetch_bytes);
}

CPU_CLONES
void moqae_router_exp(const float *in, float *out, size_t count) {
    for (size_t i = 0; i < count; i++) out[i] = exp_approx(in[i]);
}
