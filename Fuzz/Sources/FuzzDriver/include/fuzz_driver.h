#ifndef MOQAE_FUZZ_DRIVER_H
#define MOQAE_FUZZ_DRIVER_H

#include <stddef.h>
#include <stdint.h>

/// libFuzzer's driver (from the `-sanitize=fuzzer` runtime): parses libFuzzer's command line and
/// calls `test_one_input` on each input. SwiftPM gives an executable target its own `main`, so the
/// targets call the driver from there instead of linking libFuzzer's `main`.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*test_one_input)(const uint8_t *data, size_t size));

#endif
