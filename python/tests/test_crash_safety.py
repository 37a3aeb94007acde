"""Crash and full-disk safety: a file-size limit (RLIMIT_FSIZE, the same failed write as a full disk)
on checkpoint, export and dump writes, and a dump killed with SIGKILL and resumed."""
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time

import torch

from conftest import PYTHON
from test_dump import dump, store_tensors


def limited(max_bytes):
    """preexec_fn: every file the child writes is limited to `max_bytes`."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def train(moqae_train, store, run_dir, *extra, max_bytes=None):
    config = os.path.join(os.path.dirname(run_dir), "empty.yaml")
    open(config, "w").close()
    command = [moqae_train, "train", "--config", config, "--set", f"store={store}", "--set", f"run_dir={run_dir}",
               "--set", "checkpoint.every_steps=1", "--set", "train.eval_every=0", *extra]
    return subprocess.run(command, capture_output=True, text=True, preexec_fn=limited(max_bytes) if max_bytes else None)


def expect_one_line_error(result, *mentions):
    """Exit status 1 and one error line, the last thing on stderr (progress lines may come before it)."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr
    for text in mentions:
        assert text in errors[0], errors[0]


def test_checkpoint_on_a_full_disk_fails_cleanly_and_the_run_resumes(moqae_train, tmp_path):
    store, run_dir = str(tmp_path / "store"), str(tmp_path / "run")
    subprocess.run([moqae_train, "synth", "--shape", "tiny", "--sequences", "64", "--out", store], check=True, capture_output=True)
    assert train(moqae_train, store, run_dir, "--max-steps", "1").returncode == 0
    first = os.path.join(run_dir, "ckpt-000000001.safetensors")
    before = open(first, "rb").read()
    assert len(before) > 4096

    # Step 2's log line fits in 4 KB, its checkpoint does not.
    full = train(moqae_train, store, run_dir, "--max-steps", "2", "--resume", "latest", max_bytes=4096)
    expect_one_line_error(full, "ckpt-000000002.safetensors", "File too large")
    assert open(first, "rb").read() == before
    assert not glob.glob(os.path.join(run_dir, "*.tmp-*"))
    assert not os.path.exists(os.path.join(run_dir, "ckpt-000000002.safetensors"))

    resumed = train(moqae_train, store, run_dir, "--max-steps", "2", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert os.path.exists(os.path.join(run_dir, "ckpt-000000002.safetensors"))


def test_export_on_a_full_disk_keeps_the_previous_export(moqae_train, tmp_path):
    store, run_dir = str(tmp_path / "store"), str(tmp_path / "run")
    subprocess.run([moqae_train, "synth", "--shape", "tiny", "--sequences", "64", "--out", store], check=True, capture_output=True)
    assert train(moqae_train, store, run_dir, "--max-steps", "1").returncode == 0
    out = os.path.join(run_dir, "router.bin")
    subprocess.run([moqae_train, "export", run_dir, "--out", out], check=True, capture_output=True)
    before = open(out, "rb").read()
    full = subprocess.run([moqae_train, "export", run_dir, "--out", out], capture_output=True, text=True,
                          preexec_fn=limited(len(before) // 2))
    expect_one_line_error(full, "router.bin", "File too large")
    assert open(out, "rb").read() == before
    assert not glob.glob(out + ".tmp-*")


DUMP_ARGS = ["--seq-len", "128", "--fraction", "0.2", "--shard-size", "100K"]
DUMP_ENV = dict(os.environ, PYTHONPATH=PYTHON)


def dump_command(model, corpus, out, *extra):
    """The `dump` command line as `test_dump.dump` runs it, for a child with limits or a kill."""
    return [sys.executable, "-m", "moqae", "dump", "--model", model, "--corpus", corpus, "--out", out,
            "--tokenizer", "bytes", *extra]


def limited_dump(model, corpus, out, args, max_bytes):
    return subprocess.run(dump_command(model, corpus, out, *args), capture_output=True, text=True, env=DUMP_ENV,
                          preexec_fn=limited(max_bytes))


def expect_no_store_then_resume_to(whole, model, corpus, limited_out, args):
    """After a failed dump into limited_out: no manifest and no temporary file; `--resume` then gives
    the same tensors as the uninterrupted dump in whole."""
    assert not os.path.exists(os.path.join(limited_out, "manifest.json"))
    assert not glob.glob(os.path.join(limited_out, "*.tmp-*"))
    assert dump(model, corpus, limited_out, *args, "--resume").returncode == 0
    a, b = store_tensors(whole), store_tensors(limited_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dump_on_a_full_disk_fails_cleanly_and_resumes_to_the_same_store(tiny_llama, small_corpus, tmp_path):
    whole, limited_out = str(tmp_path / "whole"), str(tmp_path / "limited")
    assert dump(tiny_llama, small_corpus, whole, *DUMP_ARGS).returncode == 0
    shard = os.path.getsize(os.path.join(whole, "shard-00000.safetensors"))
    full = limited_dump(tiny_llama, small_corpus, limited_out, DUMP_ARGS, shard // 2)
    expect_one_line_error(full, "shard-00000.safetensors", "File too large")
    expect_no_store_then_resume_to(whole, tiny_llama, small_corpus, limited_out, DUMP_ARGS)


def test_dump_manifest_on_a_full_disk_fails_cleanly_and_resumes(tiny_llama, small_corpus, tmp_path):
    # Short sequences in small shards: every shard fits under the limit, the manifest (one entry per
    # sequence) does not.
    args = ["--seq-len", "64", "--fraction", "0.2", "--shard-size", "40K"]
    whole, limited_out = str(tmp_path / "whole"), str(tmp_path / "limited")
    assert dump(tiny_llama, small_corpus, whole, *args).returncode == 0
    largest_shard = max(os.path.getsize(path) for path in glob.glob(os.path.join(whole, "shard-*.safetensors")))
    manifest_size = os.path.getsize(os.path.join(whole, "manifest.json"))
    assert largest_shard < manifest_size
    full = limited_dump(tiny_llama, small_corpus, limited_out, args, (largest_shard + manifest_size) // 2)
    expect_one_line_error(full, "manifest.json", "File too large")
    expect_no_store_then_resume_to(whole, tiny_llama, small_corpus, limited_out, args)
    assert manifest_without_shards(whole) == manifest_without_shards(limited_out)


def manifest_without_shards(store):
    with open(os.path.join(store, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["sequences"] = [{k: v for k, v in entry.items() if k != "shard"} for entry in manifest["sequences"]]
    return manifest


def test_dump_killed_and_resumed_equals_an_uninterrupted_dump(tiny_llama, small_corpus, tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert dump(tiny_llama, small_corpus, whole, *DUMP_ARGS).returncode == 0
    process = subprocess.Popen(dump_command(tiny_llama, small_corpus, killed, *DUMP_ARGS), env=DUMP_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(killed, "shard-*.safetensors")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(killed, "manifest.json")), "the dump finished before it could be killed"
    assert dump(tiny_llama, small_corpus, killed, *DUMP_ARGS, "--resume").returncode == 0
    a, b = store_tensors(whole), store_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Shard boundaries may differ (the sequences that were pending at the kill go into later shards).
    assert manifest_without_shards(whole) == manifest_without_shards(killed)
