"""moqae: calibration stores for moqae-train from Hugging Face causal LMs (calibrate), real perplexity and
task accuracy of routers beside baselines (evaluate), a mixed-precision KV cache for generation (serve),
and the harnesses that measure them (harness). The shared core sits at the top: experts, quantizer,
router exports, stores, models, capture, corpora and tasks."""

__version__ = "0.1.0"   # the project's; `moqae-train --version` prints the same (Sources/moqae-train/Version.swift)


class MoqaeError(Exception):
    """A user-facing error: one line that names the file or option at fault and what was expected."""


def __getattr__(name):
    """`from moqae import MoQAECache`, imported on first use so that `moqae --version` loads no torch."""
    if name == "MoQAECache":
        from .serve.cache import MoQAECache
        return MoQAECache
    raise AttributeError(f"module 'moqae' has no attribute {name!r}")
