#include "half_precision.h"

#include <string.h>

/// half_to_float on bit patterns: move exponent and mantissa into place and rebias; fix up
/// infinities/NaNs (exponent 31) and subnormals (exponent 0, renormalised by one float subtraction).
static inline float decode_one(uint16_t h) {
    const uint32_t shifted_exponent = 0x7C00u << 13;
    uint32_t bits = ((uint32_t)h & 0x7FFFu) << 13;
    uint32_t exponent = bits & shifted_exponent;
    bits += (127u - 15u) << 23;
    if (exponent == shifted_exponent) {
        bits += (128u - 16u) << 23;
    } else if (exponent == 0) {
        bits += 1u << 23;
        float value, magic;
        uint32_t magic_bits = 113u << 23;
        memcpy(&value, &bits, 4);
        memcpy(&magic, &magic_bits, 4);
        value -= magic;
        memcpy(&bits, &value, 4);
    }
    bits |= ((uint32_t)h & 0x8000u) << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

void moqae_decode_f16_portable(const uint16_t *in, float *out, size_t count) {
    for (size_t i = 0; i < count; i++) out[i] = decode_one(in[i]);
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx,f16c")))
static void decode_f16c(const uint16_t *in, float *out, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m128i halves = _mm_loadu_si128((const __m128i *)(in + i));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(halves));
    }
    for (; i < count; i++) out[i] = decode_one(in[i]);
}

void moqae_decode_f16(const uint16_t *in, float *out, size_t count) {
    static int has_f16c = -1;
    if (has_f16c < 0) {
        __builtin_cpu_init();
        has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    }
    if (has_f16c) decode_f16c(in, out, count); else moqae_decode_f16_portable(in, out, count);
}
#else
void moqae_decode_f16(const uint16_t *in, float *out, size_t count) { moqae_decode_f16_portable(in, out, count); }
#endif
