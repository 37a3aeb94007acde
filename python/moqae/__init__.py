"""moqae: calibration stores for moqae-train from real Hugging Face causal LMs."""


class CalibError(Exception):
    """A user-facing error: one line that names the file or option at fault and what was expected."""
