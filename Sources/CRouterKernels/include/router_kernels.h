#ifndef MOQAE_ROUTER_KERNELS_H
#define MOQAE_ROUTER_KERNELS_H

#include <stddef.h>
#include <stdint.h>

// The streaming pass's per-block router arithmetic (docs/FORMATS.md, the router): m experts, hw hidden
// columns (m for the paper's router), token vectors of d values.
// Per-token buffers are expert-major: column j of token t is at j·stride + t, so elementwise loops
// run over contiguous tokens. Each kernel also brings `prefetch_bytes` bytes at `prefetch` (the
// next block's inputs, or NULL) toward the CPU's L2 cache, spread over its work, so that memory
// reads overlap the arithmetic. `wide` selects register tiles that need 32 vector registers of 16
// floats (see moqae_router_wide_tiles); both settings compute the same values.

/// Whether this CPU has the registers for the wide tiles (AVX-512).
int moqae_router_wide_tiles(void);

/// Forward over `rows` token vectors: x (rows, d) row-major; w12t (2hw, d) holds W1's columns then
/// W2's, one per row; w3 (hw, m) row-major. Writes ab (2hw, stride): a = x·W1 then b = x·W2;
/// sig (hw, stride) = σ(a); hidden (hw, stride) = SiLU(a) ⊙ b; prob (m, stride) = softmax(hidden·W3);
/// choice (rows) = each token's argmax expert, the lowest index among equal probabilities.
/// scratch holds 2·rows floats.
void moqae_router_forward(const float *x, size_t rows, size_t d, size_t m, size_t hw,
                          const float *w12t, const float *w3, size_t stride,
                          float *ab, float *sig, float *hidden, float *prob, int32_t *choice, float *scratch,
                          int wide, const void *prefetch, size_t prefetch_bytes);

/// Backward of one chunk's P = (1/n) Σ_t p_t from upstream = dL/dP (m). x (n, d) are the chunk's
/// rows; ab, sig, hidden, prob point at the chunk's first token of the forward's buffers (same
/// stride). Adds hiddenᵀ·dz into part_w3 (hw, m) and the chunk's gradient of [W1 W2], transposed,
/// into part_w12t (2hw, d). scratch holds (m + 3hw + 1)·n floats.
void moqae_router_backward_chunk(const float *x, size_t n, size_t d, size_t m, size_t hw,
                                 const float *w3, size_t stride,
                                 const float *ab, const float *sig, const float *hidden, const float *prob,
                                 const float *upstream, float *scratch, float *part_w12t, float *part_w3,
                                 int wide, const void *prefetch, size_t prefetch_bytes);

/// The same backward of one chunk from the gradient of its token logits instead: dz (m, n) holds
/// dL/dz of token t, expert k at k·n + t (pooled chunk probabilities compute it themselves).
/// scratch holds 3hw·n floats.
void moqae_router_backward_chunk_logits(const float *x, size_t n, size_t d, size_t m, size_t hw,
                                        const float *w3, size_t stride,
                                        const float *ab, const float *sig, const float *hidden, const float *dz,
                                        float *scratch, float *part_w12t, float *part_w3,
                                        int wide, const void *prefetch, size_t prefetch_bytes);

/// out[i] = eˣ for x = in[i], the kernels' exp: within 4e-7 relative of expf on [-87, 88], clamped outside.
void moqae_router_exp(const float *in, float *out, size_t count);

#endif
