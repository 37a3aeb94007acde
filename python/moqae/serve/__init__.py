"""Serve: `MoQAECache`, a KV cache for transformers' `generate()` that stores every chunk at the expert
its router picks, packed; the `generate` and `serve-passkey` commands."""
