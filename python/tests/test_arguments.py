"""`python -m moqae` option values: numbers out of range, unknown devices and misplaced outputs are refused before
anything loads or is written, in one line naming the option (usage errors: status 64, as moqae-train's)."""
import os

import pytest

from conftest import REFERENCE_MODEL, VALID_TXT, run_moqae

EVAL = ["eval", "--model", REFERENCE_MODEL, "--text", VALID_TXT, "--router", "router.bin", "--tokenizer", "bytes"]
DUMP = ["dump", "--model", REFERENCE_MODEL, "--corpus", VALID_TXT, "--tokenizer", "bytes"]


@pytest.mark.parametrize("args, message", [
    (EVAL + ["--seq-len", "0"], "argument --seq-len: expected a positive integer, got 0"),
    (EVAL + ["--seq-len", "-5"], "argument --seq-len: expected a positive integer, got -5"),
    (EVAL + ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (EVAL + ["--batch-size", "-3"], "argument --batch-size: expected a positive integer, got -3"),
    (EVAL + ["--max-windows", "0"], "argument --max-windows: expected a positive integer, got 0"),
    (EVAL + ["--max-windows", "-1"], "argument --max-windows: expected a positive integer, got -1"),
    (EVAL + ["--value-group", "0"], "argument --value-group: expected a positive integer, got 0"),
    (EVAL + ["--device", "tpu:7"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu:7'"),
    (EVAL + ["--task-seed", "-1"], "argument --task-seed: expected a non-negative integer, got -1"),
    (DUMP + ["--out", "store", "--chunk-size", "0"], "argument --chunk-size: expected a positive integer, got 0"),
    (DUMP + ["--out", "store", "--num-shards", "0"], "argument --num-shards: expected a positive integer, got 0"),
    (DUMP + ["--out", "store", "--shard-index", "-1"], "argument --shard-index: expected a non-negative integer, got -1"),
    (["generate", "--model", REFERENCE_MODEL, "--prompt", "x", "--max-new-tokens", "0"],
     "argument --max-new-tokens: expected a positive integer, got 0"),
])
def test_option_values_are_checked_when_parsed(args, message, tmp_path):
    result = run_moqae(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 64 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: python -m moqae ") and message in lines[0] and lines[0].endswith("--help for usage)")
    assert not os.path.exists("store")


def test_a_dump_into_an_existing_file_is_refused_and_the_file_kept(tmp_path):
    out = tmp_path / "store"
    out.write_text("mine")
    result = run_moqae(*DUMP, "--out", str(out))
    assert result.returncode == 1 and result.stderr.strip() == \
        f"error: {out}: exists and is not a directory (--out names a store directory to create)"
    assert out.read_text() == "mine"


def test_a_value_group_that_does_not_divide_the_head_is_refused(tmp_path):
    """The reference model's head dimension is 64: 7 does not divide it (before, a traceback)."""
    from moqae.router import random_export, write_export
    router = str(tmp_path / "router.bin")
    write_export(router, random_export(4, 2, 64))
    result = run_moqae("eval", "--model", REFERENCE_MODEL, "--text", VALID_TXT, "--router", router, "--tokenizer",
                       "bytes", "--value-group", "7", "--max-windows", "1", "--no-baselines")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == \
        f"error: --value-group 7 must divide the head dimension 64 of {REFERENCE_MODEL}"
