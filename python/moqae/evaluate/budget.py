"""`calibrate-bits`: lands a trained router on a bits target. Training's budget controller ends within
about ±0.1 bits of its target, and on other windows than its store's (pass-key windows, where the router
spends more on the needle) further away. This finds the bits price p that every token logit pays,
z_j − p · bits_j (docs/FORMATS.md, export version 3), at which the router's real payload bits (chunk 0
and the tail counted, as `eval` reports them) on calibration windows meet the target, from below within
`tolerance`: bracketed from 0 by doubling steps, then bisected, each step one scored pass over the
windows. The price is searched in binary32, as the export stores it.
"""
import dataclasses
import os
import struct
import sys

from .. import MoqaeError
from ..corpus import tokenizer_for
from ..model import check_model_dir, load_model, model_shape, resolve_device, window_length
from ..router import read_export, write_export
from ..tasks import scored_windows
from .run import Evaluation

FIRST_STEP = 0.125    # nats per bit: the first bracket; trained routers have needed 0.6 (docs/router-variants.md)
PRICE_LIMIT = 64.0    # nats per bit: beyond it a target is out of reach


def binary32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


def calibrate_bits(model, text, router, out, target_bits, *, tokenizer="auto", seq_len=None, max_windows=None,
                   task=None, task_seed=0, value_group=None, batch_size=8, device="auto", model_dtype="auto",
                   tolerance=0.005, progress=True):
    """Writes `router` with the bits price at which its payload bits on the windows of `text` (or of a
    task built from it) come nearest `target_bits` from below; returns (price, bits)."""
    if os.path.exists(out):
        raise MoqaeError(f"{out}: exists; calibrate-bits writes a new export and does not overwrite")
    export = read_export(router)
    check_model_dir(model)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    _, _, head_dim, _ = model_shape(config)
    encoder = tokenizer_for(tokenizer, model)
    windows, task_set = scored_windows(text, encoder, window_length(config, model, seq_len), max_windows, task, task_seed)
    lm = load_model(model, resolve_device(device), None, model_dtype)
    try:
        evaluation = Evaluation(lm, windows, export, value_group or head_dim, model, batch_size, progress=False, task=task_set)
    except MoqaeError as error:
        raise MoqaeError(f"{router}: {error}") from None

    def bits_at(price):
        evaluation.export = dataclasses.replace(export, bits_price=price)
        bits = evaluation.router().summary(1)["payload_bits"]
        if progress:
            print(f"calibrate-bits: price {price:+.6f} nats/bit: {bits:.4f} payload bits", file=sys.stderr, flush=True)
        return bits

    # Bracket the target from price 0 (the router as trained) outwards by doubling steps, then bisect;
    # bits fall as the price rises, and `high` is always a price whose bits are within the target.
    bits = {0.0: bits_at(0.0)}
    if target_bits - tolerance <= bits[0.0] <= target_bits:
        low = high = 0.0
    else:
        direction = 1.0 if bits[0.0] > target_bits else -1.0
        inner, outer = 0.0, binary32(direction * FIRST_STEP)
        while True:
            bits[outer] = bits_at(outer)
            if (bits[outer] <= target_bits) == (direction > 0):
                break
            if abs(outer) >= PRICE_LIMIT:
                raise MoqaeError(f"{router}: target {target_bits} payload bits is out of reach on these {len(windows)} windows: "
                                 f"the router spends {bits[outer]:.3f} at bits price {outer:g} and {bits[0.0]:.3f} at 0")
            inner, outer = outer, binary32(2 * outer)
        low, high = (inner, outer) if direction > 0 else (outer, inner)   # bits(low) > target ≥ bits(high)
    while target_bits - bits[high] > tolerance:
        middle = binary32((low + high) / 2)
        if middle in (low, high):
            break
        bits[middle] = bits_at(middle)
        low, high = (middle, high) if bits[middle] > target_bits else (low, middle)
    price = high
    write_export(out, dataclasses.replace(export, bits_price=price))
    return price, bits[price], len(windows)
