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
// (arch=haswell: with FMA and F16C) and for the baseline x86-64, and the loader picks one at run time by the CPU's features;
// built with -DMOQAE_PORTABLE, only the baseline (the tests compare both).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MOQAE_PORTABLE)
#define MOQAE_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define MOQAE_VECTOR_CLONES
#endif

namespace {

using Half = at::Half;

// One storage expert's units: keys and values, each either packed codes with binary16 scale and minimum,
// or binary16 values.
struct Part {
    int key_bits, value_bits;
    const uint8_t* key_codes;   // (U, packed N·D) when key_bits < 16
    const Half* key_half;       // (U, N, D) when key_bits == 16
    const Half* key_scale;      // (U, D)
    const Half* key_min;        // (U, D)
    int64_t key_stride;         // bytes (codes) or elements (binary16) per unit
    const uint8_t* value_codes;
    const Half* value_half;
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

MOQAE_VECTOR_CLONES
void widen(const Half* in, int count, float* out) {
    const _Float16* half = reinterpret_cast<const _Float16*>(in);   // at::Half is IEEE binary16
    for (int i = 0; i < count; ++i) out[i] = static_cast<float>(half[i]);
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

    Heads(int G, int D, int N)
        : G(G), D(D), query(G * D), running_max(G, -std::numeric_limits<float>::infinity()), total(G, 0),
          acc(G * D, 0), scaled(G * D), scores(G * N), token(D), scale(D), minimum(D) {}

    // Scores (G, n) are in `scores`; moves the softmax's maximum and rescales what came before.
    void open(int n) {
        for (int g = 0; g < G; ++g) {
            float top = running_max[g];
            for (int t = 0; t < n; ++t) top = std::max(top, scores[g * n + t]);
            if (top == -std::numeric_limits<float>::infinity()) continue;
            const float factor = std::exp(running_max[g] - top);
            if (factor != 1) {
                rescale(&acc[g * D], factor, D);
                total[g] *= factor;
            }
            running_max[g] = top;
            for (int t = 0; t < n; ++t) {
                scores[g * n + t] = std::exp(scores[g * n + t] - top);   // now the softmax numerator
                total[g] += scores[g * n + t];
            }
        }
    }
};

// Keys (n tokens) of a unit into scores; `codes` or `half` per the key bits.
void key_scores(Heads& heads, const Part& part, int64_t unit, int n, const Half* residual) {
    const int G = heads.G, D = heads.D;
    if (residual != nullptr || part.key_bits == 16) {
        const Half* keys = residual != nullptr ? residual : part.key_half + unit * part.key_stride;
        for (int t = 0; t < n; ++t) {
            widen(keys + t * D, D, heads.token.data());
            for (int g = 0; g < G; ++g) heads.scores[g * n + t] = dot(&heads.query[g * D], heads.token.data(), D);
        }
        return;
    }
    widen(part.key_scale + unit * D, D, heads.scale.data());
    widen(part.key_min + unit * D, D, heads.minimum.data());
    std::vector<float> bias(G);
    for (int g = 0; g < G; ++g) {
        for (int d = 0; d < D; ++d) heads.scaled[g * D + d] = heads.query[g * D + d] * heads.scale[d];
        bias[g] = dot(&heads.query[g * D], heads.minimum.data(), D);
    }
    const uint8_t* codes = part.key_codes + unit * part.key_stride;
    for (int t = 0; t < n; ++t) {
        unpack(codes, part.key_bits, int64_t(t) * D, D, heads.token.data());
        for (int g = 0; g < G; ++g) heads.scores[g * n + t] = bias[g] + dot(&heads.scaled[g * D], heads.token.data(), D);
    }
}

// Adds the unit's values, weighted by the softmax numerators in `scores`.
void add_values(Heads& heads, const Part& part, int64_t unit, int n, int value_group, const Half* residual) {
    const int G = heads.G, D = heads.D;
    if (residual != nullptr || part.value_bits == 16) {
        const Half* values = residual != nullptr ? residual : part.value_half + unit * part.value_stride;
        for (int t = 0; t < n; ++t) {
            widen(values + t * D, D, heads.token.data());
            for (int g = 0; g < G; ++g) accumulate(&heads.acc[g * D], heads.token.data(), heads.scores[g * n + t], 0, D);
        }
        return;
    }
    const int groups = D / value_group;
    const uint8_t* codes = part.value_codes + unit * part.value_stride;
    const Half* scales = part.value_scale + unit * n * groups;
    const Half* minima = part.value_min + unit * n * groups;
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
// and unit_rows[p] (U_p) int64, the b·H + h of each unit; residual_keys, residual_values (B·H, r, D) binary16.
// Returns (B, Hq, D) float32.
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
    std::vector<Part> parts;
    std::vector<std::vector<int64_t>> units_of_row(B * H);   // (part, unit) of each row, in storage order
    std::vector<std::vector<int>> part_of_row(B * H);
    for (size_t p = 0; p < key_bits.size(); ++p) {
        Part part{};
        part.key_bits = key_bits[p];
        part.value_bits = value_bits[p];
        if (part.key_bits == 16) {
            part.key_half = key_data[p].data_ptr<Half>();
            part.key_stride = N * D;
        } else {
            part.key_codes = key_data[p].data_ptr<uint8_t>();
            part.key_stride = key_data[p].size(1);
            part.key_scale = key_scale[p].data_ptr<Half>();
            part.key_min = key_min[p].data_ptr<Half>();
        }
        if (part.value_bits == 16) {
            part.value_half = value_data[p].data_ptr<Half>();
            part.value_stride = N * D;
        } else {
            part.value_codes = value_data[p].data_ptr<uint8_t>();
            part.value_stride = value_data[p].size(1);
            part.value_scale = value_scale[p].data_ptr<Half>();
            part.value_min = value_min[p].data_ptr<Half>();
        }
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
    const Half* rk = residual_keys.data_ptr<Half>();
    const Half* rv = residual_values.data_ptr<Half>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            Heads heads(G, D, std::max<int64_t>(N, r));
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
                const Part none{};
                key_scores(heads, none, 0, r, rk + row * r * D);
                heads.open(r);
                add_values(heads, none, 0, r, value_group, rv + row * r * D);
            }
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
