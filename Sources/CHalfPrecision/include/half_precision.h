#ifndef MOQAE_HALF_PRECISION_H
#define MOQAE_HALF_PRECISION_H

#include <stddef.h>
#include <stdint.h>

/// out[i] = binary32 value of the binary16 bits in[i], exactly. Uses the CPU's F16C instructions
/// where it has them (checked once at run time), portable bit manipulation otherwise.
void moqae_decode_f16(const uint16_t *in, float *out, size_t count);

/// The portable path of `moqae_decode_f16`, for tests on CPUs that have F16C.
void moqae_decode_f16_portable(const uint16_t *in, float *out, size_t count);

#endif
