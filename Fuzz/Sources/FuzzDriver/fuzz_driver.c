// Declarations only; the driver is in the libFuzzer runtime.
