// Attention of one decode step on a MoQAECache layer's packed units, with no dequantized copy of the cache.
//
// Keys of a quantized unit hold one scale s_d and minimum m_d per channel, so a score is
//   q·k_t = Σ_d (q_d s_d) code_{t,d} + Σ_d q_d m_d:
// the query is scaled once per unit and dotted with each token's codes as they are unpacked. Values hold a
// scale and minimum per token per group of channels, so the output is
//   Σ_t a_t v_t = Σ_t (a_t s_t) code_t + Σ_t a_t m_t.
// Units at every expert, binary16 units (16-bit experts and a frozen chunk 0) and the binary16 residual are
// read where they lie, with one online softmax over all of them (as flash attention does). Each KV head's
// units are read once for all the query heads it serves (grouped-query attention).
//
// The loops are written for the compiler to vectorise; `target_clones` builds each hot function for AVX2
// and for the baseline x86-64 (clones by feature: "arch=" clones dispatch on the CPU model, so AMD CPUs missed them), and the loader picks one at run time by the CPU's features;
// built with -DMOQAE_PORTABLE, only the baseline (the tests compare both).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MOQAE_PORTABLE)
#define MOQAE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define MOQAE_VECTOR_CLONES_ON
#include <immintrin.h>
#else
#define MOQAE_VECTOR_CLONES
#endif

namespace {

using Half = at::Half;

// One storage expert's units: keys and values, each either packed codes with binary16 scale and minimum,
// or 16-bit values: binary16, or bfloat16 where `brain` (a bfloat16 model's cache).
struct Part {
    int key_bits, value_bits;
    bool brain;
    const uint8_t* key_codes;   // (U, packed N·D) when key_bits < 16
    const uint16_t* key_half;   // (U, N, D) when key_bits == 16
    const Half* key_scale;      // (U, D)
    const Half* key_min;        // (U, D)
    int64_t key_stride;         // bytes (codes) or elements (binary16) per unit
    const uint8_t* value_codes;
    const uint16_t* value_half;
    const Half* value_scale;    // (U, N, D / value_group)
    const Half* value_min;
    int64_t value_stride;
};

// Codes (count) of `bits` bits starting at code `first` of a little-endian bit stream, as floats.
MOQAE_VECTOR_CLONES
void unpack(const uint8_t* stream, int bits, int64_t first, int count, float* out) {
    if (bits == 8) {
        const uint8_t* bytes = stream + first;
        for (int i = 0; i < count; ++i) out[i] = bytes[i];
    } else if (bits == 4 && first % 2 == 0 && count % 2 == 0) {
        const uint8_t* bytes = stream + first / 2;
        for (int i = 0; i < count / 2; ++i) {
            out[2 * i] = bytes[i] & 15;
            out[2 * i + 1] = bytes[i] >> 4;
        }
    } else if (bits == 2 && first % 4 == 0 && count % 4 == 0) {
        const uint8_t* bytes = stream + first / 4;
        for (int i = 0; i < count / 4; ++i) {
            out[4 * i] = bytes[i] & 3;
            out[4 * i + 1] = (bytes[i] >> 2) & 3;
            out[4 * i + 2] = (bytes[i] >> 4) & 3;
            out[4 * i + 3] = bytes[i] >> 6;
        }
    } else {   // any width: code i at bits i·b … i·b + b − 1, possibly across a byte boundary
        const int mask = (1 << bits) - 1;
        for (int i = 0; i < count; ++i) {
            const int64_t bit = (first + i) * bits;
            const int64_t byte = bit >> 3;
            int word = stream[byte];
            if ((bit & 7) + bits > 8) word |= stream[byte + 1] << 8;
            out[i] = (word >> (bit & 7)) & mask;
        }
    }
}

// binary16 → float32. The compiler converts _Float16 with a library call even for F16C, so the AVX2 path
// converts eight at a time with the F16C instruction itself.
#if defined(MOQAE_VECTOR_CLONES_ON)
__attribute__((target("avx2,f16c"))) void widen_f16c(const Half* in, int count, float* out) {
    int i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
    for (; i < count; ++i) out[i] = static_cast<float>(in[i]);
}
const bool has_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif

void widen(const Half* in, int count, float* out) {
#if defined(MOQAE_VECTOR_CLONES_ON)
    if (has_f16c) return widen_f16c(in, count, out);
#endif
    for (int i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

// bfloat16 → float32: the 16 bits are the float's upper half.
MOQAE_VECTOR_CLONES
void widen_brain(const uint16_t* in, int count, float* out) {
    for (int i = 0; i < count; ++i) {
        const uint32_t bits = uint32_t(in[i]) << 16;
        std::memcpy(out + i, &bits, sizeof(float));
    }
}

// 16-bit values of a part (binary16, or bfloat16 where `brain`) → float32.
void widen(const uint16_t* in, int count, float* out, bool brain) {
    if (brain) return widen_brain(in, count, out);
    widen(reinterpret_cast<const Half*>(in), count, out);
}

MOQAE_VECTOR_CLONES
float dot(const float* a, const float* b, int count) {
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < count; ++i) sum += a[i] * b[i];
    return sum;
}

// acc += weight · x + offset
MOQAE_VECTOR_CLONES
void accumulate(float* acc, const float* x, float weight, float offset, int count) {
    for (int i = 0; i < count; ++i) acc[i] += weight * x[i] + offset;
}

MOQAE_VECTOR_CLONES
void rescale(float* acc, float factor, int count) {
    for (int i = 0; i < count; ++i) acc[i] *= factor;
}

// Widths that divide 8 are read byte by byte in planes: plane k of a token's W = D / P bytes (P = 8 / bits
// codes a byte) holds the codes of channels P·i + k. The query (keys) and the accumulator (values) are
// laid out in the same planes for one unit, so that the loops run over whole bytes without reordering.
template <int Bits>
__attribute__((always_inline)) inline void planar_scores(const uint8_t* codes, int n, int D, int G, const float* planes,
                                                         const float* bias, float* scores) {
    constexpr int P = 8 / Bits, mask = (1 << Bits) - 1;
    const int W = D / P;
    for (int t = 0; t < n; ++t) {
        const uint8_t* row = codes + t * W;
        for (int g = 0; g < G; ++g) {
            const float* q = planes + g * D;
            float sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < W; ++i) {
                const int byte = row[i];
                float part = 0;
                for (int k = 0; k < P; ++k) part += q[k * W + i] * float((byte >> (k * Bits)) & mask);
                sum += part;
            }
            scores[g * n + t] = bias[g] + sum;
        }
    }
}

// planes (G, P, W) += Σ_t weights[g, t, group] · codes_t, per group of `value_group` channels.
template <int Bits>
__attribute__((always_inline)) inline void planar_values(const uint8_t* codes, int n, int D, int G, int value_group,
                                                         const float* weights, float* planes) {
    constexpr int P = 8 / Bits, mask = (1 << Bits) - 1;
    const int W = D / P, groups = D / value_group, width = value_group / P;
    for (int t = 0; t < n; ++t) {
        const uint8_t* row = codes + t * W;
        for (int g = 0; g < G; ++g) {
            float* acc = planes + g * D;
            for (int group = 0; group < groups; ++group) {
                const float w = weights[(g * n + t) * groups + group];
#pragma omp simd
                for (int i = group * width; i < (group + 1) * width; ++i) {
                    const int byte = row[i];
                    for (int k = 0; k < P; ++k) acc[k * W + i] += w * float((byte >> (k * Bits)) & mask);
                }
            }
        }
    }
}

#if defined(MOQAE_VECTOR_CLONES_ON)
// AVX2 with FMA: eight bytes of a plane row at a time, widened to int32 lanes, each plane's codes shifted
// out, converted and multiplied in; one horizontal sum per token and query head.
const bool has_avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// e^x in eight lanes (Cephes' expf: x = k·ln 2 + r, a degree-5 polynomial in r, 2^k through the exponent bits),
// within 2 ulp of std::exp for x in [−87.3, 88]; smaller x gives about 1e-38 instead of 0.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.0f));
    const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

// x[t] ← e^(x[t] − top) for t < n; returns their sum.
__attribute__((target("avx2,fma"))) float exp_shifted_avx2(float* x, int n, float top) {
    const __m256 shift = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + t), shift));
        _mm256_storeu_ps(x + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = horizontal_sum(sum);
    for (; t < n; ++t) total += x[t] = std::exp(x[t] - top);
    return total;
}

template <int Bits>
__attribute__((target("avx2,fma"))) void planar_scores_avx2(const uint8_t* codes, int n, int D, int G, const float* planes,
                                                            const float* bias, float* scores) {
    constexpr int P = 8 / Bits;
    const int W = D / P;
    const __m256i mask = _mm256_set1_epi32((1 << Bits) - 1);
    for (int t = 0; t < n; ++t) {
        const uint8_t* row = codes + t * W;
        __m256 sums[8];
        for (int g = 0; g < G && g < 8; ++g) sums[g] = _mm256_setzero_ps();
        for (int i = 0; i < W; i += 8) {
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i)));
            for (int k = 0; k < P; ++k) {
                const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bytes, k * Bits), mask));
                for (int g = 0; g < G; ++g) sums[g] = _mm256_fmadd_ps(_mm256_loadu_ps(planes + g * D + k * W + i), c, sums[g]);
            }
        }
        for (int g = 0; g < G; ++g) scores[g * n + t] = bias[g] + horizontal_sum(sums[g]);
    }
}

template <int Bits>
__attribute__((target("avx2,fma"))) void planar_values_avx2(const uint8_t* codes, int n, int D, int G, int value_group,
                                                            const float* weights, float* planes) {
    constexpr int P = 8 / Bits;
    const int W = D / P, groups = D / value_group, width = value_group / P;
    const __m256i mask = _mm256_set1_epi32((1 << Bits) - 1);
    for (int t = 0; t < n; ++t) {
        const uint8_t* row = codes + t * W;
        for (int i = 0; i < W; i += 8) {
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i)));
            const int group = i / width;
            for (int k = 0; k < P; ++k) {
                const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bytes, k * Bits), mask));
                for (int g = 0; g < G; ++g) {
                    float* acc = planes + g * D + k * W + i;
                    const __m256 w = _mm256_set1_ps(weights[(g * n + t) * groups + group]);
                    _mm256_storeu_ps(acc, _mm256_fmadd_ps(w, c, _mm256_loadu_ps(acc)));
                }
            }
        }
    }
}
#endif

// The AVX2 loops take eight bytes of a plane row at a time within one value group, and at most 8 query
// heads per KV head; other shapes run the portable loops.
bool avx2_fits(int bits, int D, int G, int value_group) {
#if defined(MOQAE_VECTOR_CLONES_ON)
    const int P = 8 / bits;
    return has_avx2_fma && G <= 8 && (D / P) % 8 == 0 && (value_group / P) % 8 == 0;
#else
    (void)bits, (void)D, (void)G, (void)value_group;
    return false;
#endif
}

#if defined(MOQAE_VECTOR_CLONES_ON)
#define MOQAE_AVX2_OR(call_avx2, call_portable) \
    if (avx2_fits(Bits, D, G, vg)) return call_avx2;   \
    return call_portable;
#else
#define MOQAE_AVX2_OR(call_avx2, call_portable) return call_portable;
#endif

template <int Bits>
void planar_scores_dispatch(const uint8_t* c, int n, int D, int G, const float* q, const float* b, float* s) {
    const int vg = D;
    MOQAE_AVX2_OR(planar_scores_avx2<Bits>(c, n, D, G, q, b, s), planar_scores<Bits>(c, n, D, G, q, b, s))
}

template <int Bits>
void planar_values_dispatch(const uint8_t* c, int n, int D, int G, int vg, const float* w, float* a) {
    MOQAE_AVX2_OR(planar_values_avx2<Bits>(c, n, D, G, vg, w, a), planar_values<Bits>(c, n, D, G, vg, w, a))
}

bool planar(int bits, int D, int value_group) { return 8 % bits == 0 && D % (8 / bits) == 0 && value_group % (8 / bits) == 0; }

void scores_by_width(int bits, const uint8_t* c, int n, int D, int G, const float* q, const float* b, float* s) {
    switch (bits) {
        case 1: return planar_scores_dispatch<1>(c, n, D, G, q, b, s);
        case 2: return planar_scores_dispatch<2>(c, n, D, G, q, b, s);
        case 4: return planar_scores_dispatch<4>(c, n, D, G, q, b, s);
        default: return planar_scores_dispatch<8>(c, n, D, G, q, b, s);
    }
}

void values_by_width(int bits, const uint8_t* c, int n, int D, int G, int vg, const float* w, float* a) {
    switch (bits) {
        case 1: return planar_values_dispatch<1>(c, n, D, G, vg, w, a);
        case 2: return planar_values_dispatch<2>(c, n, D, G, vg, w, a);
        case 4: return planar_values_dispatch<4>(c, n, D, G, vg, w, a);
        default: return planar_values_dispatch<8>(c, n, D, G, vg, w, a);
    }
}

// The online softmax of the G query heads of one KV head.
struct Heads {
    int G, D;
    std::vector<float> query;        // (G, D), times the attention scaling
    std::vector<float> running_max;  // (G)
    std::vector<float> total;        // (G)
    std::vector<float> acc;          // (G, D)
    std::vector<float> scaled;       // (G, D): the query times a unit's key scales
    std::vector<float> scores;       // (G, N)
    std::vector<float> token;        // (D): one token's codes or values, as floats
    std::vector<float> scale, minimum;
    std::vector<float> bias;         // (G): the query times a unit's key minima
    std::vector<float> planes;       // (G, D): a unit's values in planes
    std::vector<float> weights;      // (G, N, groups): softmax numerators times value scales
    std::vector<float> offsets;      // (G, groups): softmax numerators times value minima, summed

    int groups;
    int planar_bits = 0;             // the width whose units `planes` and `offsets` hold (0: none)

    Heads(int G, int D, int N, int groups)
        : G(G), D(D), groups(groups), query(G * D), running_max(G, -std::numeric_limits<float>::infinity()), total(G, 0),
          acc(G * D, 0), scaled(G * D), scores(G * N), token(D), scale(std::max(D, N * groups)),
          minimum(std::max(D, N * groups)), bias(G), planes(G * D),
          weights(G * N * groups), offsets(G * groups) {}

    // Scores (G, n) are in `scores`; moves the softmax's maximum and rescales what came before.
    void open(int n) {
        for (int g = 0; g < G; ++g) {
            float top = running_max[g];
            for (int t = 0; t < n; ++t) top = std::max(top, scores[g * n + t]);
            if (top == -std::numeric_limits<float>::infinity()) continue;
            const float factor = std::exp(running_max[g] - top);
            if (factor != 1) {
                rescale(&acc[g * D], factor, D);
                rescale(&planes[g * D], factor, D);
                rescale(&offsets[g * groups], factor, groups);
                total[g] *= factor;
            }
            running_max[g] = top;
            float* row = &scores[g * n];   // becomes the softmax numerators
#if defined(MOQAE_VECTOR_CLONES_ON)
            if (has_avx2_fma) {
                total[g] += exp_shifted_avx2(row, n, top);
                continue;
            }
#endif
            for (int t = 0; t < n; ++t) total[g] += row[t] = std::exp(row[t] - top);
        }
    }
};

// Adds what `planes` and `offsets` hold into `acc`, in channel order, and empties them.
void fold(Heads& heads, int value_group) {
    if (heads.planar_bits == 0) return;
    const int G = heads.G, D = heads.D, P = 8 / heads.planar_bits, W = D / P;
    for (int g = 0; g < G; ++g)
        for (int k = 0; k < P; ++k)
            for (int i = 0; i < W; ++i)
                heads.acc[g * D + P * i + k] += heads.planes[g * D + k * W + i] + heads.offsets[g * heads.groups + P * i / value_group];
    std::fill(heads.planes.begin(), heads.planes.end(), 0.0f);
    std::fill(heads.offsets.begin(), heads.offsets.end(), 0.0f);
    heads.planar_bits = 0;
}

// Keys (n tokens) of a unit into scores; `codes` or `half` per the key bits.
void key_scores(Heads& heads, const Part& part, int64_t unit, int n, const uint16_t* residual) {
    const int G = heads.G, D = heads.D;
    if (residual != nullptr || part.key_bits == 16) {
        const uint16_t* keys = residual != nullptr ? residual : part.key_half + unit * part.key_stride;
        for (int t = 0; t < n; ++t) {
            widen(keys + t * D, D, heads.token.data(), part.brain);
            for (int g = 0; g < G; ++g) heads.scores[g * n + t] = dot(&heads.query[g * D], heads.token.data(), D);
        }
        return;
    }
    widen(part.key_scale + unit * D, D, heads.scale.data());
    widen(part.key_min + unit * D, D, heads.minimum.data());
    const bool planes = planar(part.key_bits, D, D);
    const int P = planes ? 8 / part.key_bits : 1, W = D / P;
    for (int g = 0; g < G; ++g) {
        for (int k = 0; k < P; ++k)
            for (int i = 0; i < W; ++i) heads.scaled[g * D + k * W + i] = heads.query[g * D + P * i + k] * heads.scale[P * i + k];
        heads.bias[g] = dot(&heads.query[g * D], heads.minimum.data(), D);
    }
    const uint8_t* codes = part.key_codes + unit * part.key_stride;
    if (planes) return scores_by_width(part.key_bits, codes, n, D, G, heads.scaled.data(), heads.bias.data(), heads.scores.data());
    for (int t = 0; t < n; ++t) {
        unpack(codes, part.key_bits, int64_t(t) * D, D, heads.token.data());
        for (int g = 0; g < G; ++g) heads.scores[g * n + t] = heads.bias[g] + dot(&heads.scaled[g * D], heads.token.data(), D);
    }
}

// Adds the unit's values, weighted by the softmax numerators in `scores`.
void add_values(Heads& heads, const Part& part, int64_t unit, int n, int value_group, const uint16_t* residual) {
    const int G = heads.G, D = heads.D;
    if (residual != nullptr || part.value_bits == 16) {
        const uint16_t* values = residual != nullptr ? residual : part.value_half + unit * part.value_stride;
        for (int t = 0; t < n; ++t) {
            widen(values + t * D, D, heads.token.data(), part.brain);
            for (int g = 0; g < G; ++g) accumulate(&heads.acc[g * D], heads.token.data(), heads.scores[g * n + t], 0, D);
        }
        return;
    }
    const int groups = D / value_group;
    const uint8_t* codes = part.value_codes + unit * part.value_stride;
    const Half* scales = part.value_scale + unit * n * groups;
    const Half* minima = part.value_min + unit * n * groups;
    if (planar(part.value_bits, D, value_group)) {
        if (heads.planar_bits != part.value_bits) {   // units of one width accumulate in its planes
            fold(heads, value_group);
            heads.planar_bits = part.value_bits;
        }
        widen(scales, n * groups, heads.scale.data());       // (n, groups)
        widen(minima, n * groups, heads.minimum.data());
        for (int g = 0; g < G; ++g)
            for (int t = 0; t < n; ++t)
                for (int k = 0; k < groups; ++k) {
                    const float a = heads.scores[g * n + t];
                    heads.weights[(g * n + t) * groups + k] = a * heads.scale[t * groups + k];
                    heads.offsets[g * groups + k] += a * heads.minimum[t * groups + k];
                }
        values_by_width(part.value_bits, codes, n, D, G, value_group, heads.weights.data(), heads.planes.data());
        return;
    }
    for (int t = 0; t < n; ++t) {
        unpack(codes, part.value_bits, int64_t(t) * D, D, heads.token.data());
        for (int k = 0; k < groups; ++k) {
            const float s = scales[t * groups + k], m = minima[t * groups + k];
            for (int g = 0; g < G; ++g) {
                const float a = heads.scores[g * n + t];
                accumulate(&heads.acc[g * D + k * value_group], &heads.token[k * value_group], a * s, a * m, value_group);
            }
        }
    }
}

}  // namespace

// query (B, Hq, D) float32; per part p: bits, data, scales and minima as MoQAECache's PackedPart holds them,
// and unit_rows[p] (U_p) int64, the b·H + h of each unit; residual_keys, residual_values (B·H, r, D) binary16, or
// bfloat16 (then so are the 16-bit parts). Returns (B, Hq, D) float32.
torch::Tensor packed_decode_attention(torch::Tensor query, std::vector<int64_t> key_bits, std::vector<int64_t> value_bits,
                                      std::vector<torch::Tensor> key_data, std::vector<torch::Tensor> key_scale,
                                      std::vector<torch::Tensor> key_min, std::vector<torch::Tensor> value_data,
                                      std::vector<torch::Tensor> value_scale, std::vector<torch::Tensor> value_min,
                                      std::vector<torch::Tensor> unit_rows, torch::Tensor residual_keys,
                                      torch::Tensor residual_values, int64_t kv_heads, int64_t chunk_size,
                                      int64_t value_group, double scaling) {
    TORCH_CHECK(query.dim() == 3 && query.scalar_type() == torch::kFloat32 && query.is_contiguous(), "query must be (B, Hq, D) float32");
    const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2), H = kv_heads, N = chunk_size;
    TORCH_CHECK(Hq % H == 0 && D % value_group == 0, "query heads must be a multiple of KV heads, D of the value group");
    const int G = Hq / H;
    const int64_t r = residual_keys.size(1);
    const auto sixteen = residual_keys.scalar_type();
    TORCH_CHECK((sixteen == torch::kFloat16 || sixteen == torch::kBFloat16) && residual_values.scalar_type() == sixteen,
                "the residual must be binary16 or bfloat16, keys and values alike");
    const bool brain = sixteen == torch::kBFloat16;
    std::vector<Part> parts;
    std::vector<std::vector<int64_t>> units_of_row(B * H);   // (part, unit) of each row, in storage order
    std::vector<std::vector<int>> part_of_row(B * H);
    for (size_t p = 0; p < key_bits.size(); ++p) {
        Part part{};
        part.key_bits = key_bits[p];
        part.value_bits = value_bits[p];
        part.brain = brain;
        // One side (keys or values): 16-bit (U, N, D) in the residual's dtype, or codes (U, bytes) with scales and minima.
        auto side = [&](int bits, torch::Tensor& data, torch::Tensor& scale, torch::Tensor& minimum, const uint8_t*& codes,
                        const uint16_t*& half, const Half*& scales, const Half*& minima, int64_t& stride) {
            if (bits == 16) {
                TORCH_CHECK(data.scalar_type() == sixteen, "16-bit parts must be in the residual's dtype");
                half = reinterpret_cast<const uint16_t*>(data.data_ptr());
                stride = N * D;
            } else {
                codes = data.data_ptr<uint8_t>();
                stride = data.size(1);
                scales = scale.data_ptr<Half>();
                minima = minimum.data_ptr<Half>();
            }
        };
        side(part.key_bits, key_data[p], key_scale[p], key_min[p], part.key_codes, part.key_half, part.key_scale,
             part.key_min, part.key_stride);
        side(part.value_bits, value_data[p], value_scale[p], value_min[p], part.value_codes, part.value_half,
             part.value_scale, part.value_min, part.value_stride);
        const int64_t* rows = unit_rows[p].data_ptr<int64_t>();
        for (int64_t u = 0; u < unit_rows[p].size(0); ++u) {
            units_of_row[rows[u]].push_back(u);
            part_of_row[rows[u]].push_back(int(p));
        }
        parts.push_back(part);
    }
    auto out = torch::empty({B, Hq, D}, query.options());
    const float* q = query.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const uint16_t* rk = reinterpret_cast<const uint16_t*>(residual_keys.data_ptr());
    const uint16_t* rv = reinterpret_cast<const uint16_t*>(residual_values.data_ptr());
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            Heads heads(G, D, std::max<int64_t>(N, r), D / value_group);
            const int64_t b = row / H, h = row % H;
            for (int g = 0; g < G; ++g)
                for (int d = 0; d < D; ++d) heads.query[g * D + d] = q[(b * Hq + h * G + g) * D + d] * float(scaling);
            for (size_t i = 0; i < units_of_row[row].size(); ++i) {
                const Part& part = parts[part_of_row[row][i]];
                key_scores(heads, part, units_of_row[row][i], N, nullptr);
                heads.open(N);
                add_values(heads, part, units_of_row[row][i], N, value_group, nullptr);
            }
            if (r > 0) {
                Part none{};
                none.brain = brain;
                key_scores(heads, none, 0, r, rk + row * r * D);
                heads.open(r);
                add_values(heads, none, 0, r, value_group, rv + row * r * D);
            }
            fold(heads, value_group);
            for (int g = 0; g < G; ++g)
                for (int d = 0; d < D; ++d) o[(b * Hq + h * G + g) * D + d] = heads.acc[g * D + d] / heads.total[g];
        }
    });
    return out;
}

// The instruction set the hot loops run with on this CPU: "avx2" or "portable".
std::string vector_path() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MOQAE_PORTABLE)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return "avx2";
#endif
    return "portable";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("packed_decode_attention", &packed_decode_attention, "one decode step's attention on packed units");
    m.def("vector_path", &vector_path, "the instruction set the kernel's loops use on this CPU");
}
