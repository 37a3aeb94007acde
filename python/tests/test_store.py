"""The one manifest reader: typed fields from a good manifest, and a one-line error naming the file and the
key for a damaged one, through the library and through the command line of eval, pareto and benchmark."""
import copy
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from conftest import PYTHON, REFERENCE_MODEL
from moqae import MoqaeError
from moqae.__main__ import main
from moqae.experts import Expert
from moqae.model import model_shape
from moqae.router import random_export, write_export
from moqae.selection import unit_value
from moqae.store import ModelShape, Sequence, read_manifest

GOOD = {
    "format": "moqae-calibration", "version": 1,
    "model": {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8},
    "router_input": "key", "chunk_size": 32, "value_group": 8,
    "experts": [{"name": "fp16", "key_bits": 16, "value_bits": 16}, {"name": "int2", "key_bits": 2, "value_bits": 2}],
    "sensitivity": "taylor", "selection": {"seed": 0, "fraction": 1.0},
    "corpus": {"source": "valid.txt", "tokenizer": "bytes", "seq_len": 64, "num_sequences": 4},
    "sequences": [{"id": 1, "shard": "shard-00000.safetensors", "tokens": 64},
                  {"id": 3, "shard": "shard-00001.safetensors", "tokens": 64}],
}


def write_store(directory, manifest):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        f.write(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return str(directory)


def damaged(change):
    manifest = copy.deepcopy(GOOD)
    change(manifest)
    return manifest


def test_a_good_manifest_reads_as_typed_fields(tmp_path):
    manifest = read_manifest(write_store(tmp_path / "store", GOOD))
    assert manifest.model == ModelShape("tiny", 2, 2, 8)
    assert manifest.experts == [Expert("fp16", 16, 16), Expert("int2", 2, 2)]
    assert (manifest.chunk_size, manifest.value_group, manifest.seq_len, manifest.num_sequences) == (32, 8, 64, 4)
    assert manifest.sequences == [Sequence(1, "shard-00000.safetensors", 64), Sequence(3, "shard-00001.safetensors", 64)]
    fraction = (unit_value(1, 0) + unit_value(3, 0)) / 2
    assert manifest.split(fraction) == [s for s in manifest.sequences if unit_value(s.id, 0) < fraction]
    assert len(manifest.split(fraction)) == 1 and manifest.split(1.0) == manifest.sequences


DAMAGES = [
    (lambda m: m.pop("chunk_size"), "chunk_size: missing"),
    (lambda m: m["model"].update(num_layers="2"), "model.num_layers: expected an integer in 1...65535"),
    (lambda m: m["model"].update(head_dim=True), "model.head_dim: expected an integer in 1...65535"),
    (lambda m: m.update(format="other"), 'format: expected "moqae-calibration"'),
    (lambda m: m.update(version=4), "version: expected one of 1, 2, 3"),
    (lambda m: m.update(version=3), "first_held_chunks: missing"),
    (lambda m: m.update(version=3, first_held_chunks=[0, 0]), "first_held_chunks: expected a layer whose cache holds only"),
    (lambda m: m.update(version=3, first_held_chunks=[1, True]), "first_held_chunks: expected 2 integers in 0...2"),
    (lambda m: m.update(version=3, first_held_chunks=[3, 0]), "first_held_chunks: expected 2 integers in 0...2"),
    (lambda m: m.update(version=3, first_held_chunks=[1]), "first_held_chunks: expected a list of 2 to 2 items"),
    (lambda m: m.update(version=2), "background.experts: missing"),
    (lambda m: m.update(version=2, background={"experts": ["int2", "int3"], "frozen_chunks": 1}),
     "background.experts: expected 2 names of the store's experts"),
    (lambda m: m.update(version=2, background={"experts": ["int2", "int2"], "frozen_chunks": 3}),
     "background.frozen_chunks: expected an integer in 0...2"),
    (lambda m: m.update(router_input="query"), 'router_input: expected one of key, key-prerope, key+value, key+chunk, got "query"'),
    (lambda m: m.update(value_group=3), "value_group: must divide head_dim 8, got 3"),
    (lambda m: m["experts"][1].update(name="fp16"), 'experts[1]: duplicate expert name "fp16"'),
    (lambda m: m["experts"][1].update(key_bits=12), "experts[1]: bits must be 16 or in 1...8, got (12, 2)"),
    (lambda m: m["experts"].pop(0), "experts: no expert has 16 key and 16 value bits"),
    (lambda m: m.update(experts=[]), "experts: expected a list of 1 to 255 items"),
    (lambda m: m["selection"].update(fraction=0), "selection.fraction: expected a value in (0, 1], got 0"),
    (lambda m: m["selection"].update(seed=-1), "selection.seed: expected an integer in 0..."),
    (lambda m: m["corpus"].pop("tokenizer"), "corpus.tokenizer: missing"),
    (lambda m: m["sequences"][1].update(tokens=63), "sequences[1].tokens: expected corpus.seq_len = 64, got 63"),
    (lambda m: m["sequences"][1].update(id=4), "sequences[1].id: id 4 is outside the corpus of 4 sequences"),
    (lambda m: m["sequences"][1].update(id=1), "sequences[1].id: duplicate sequence id 1"),
    (lambda m: m["sequences"][0].update(shard="../x.safetensors"), "sequences[0].shard: expected a file name ending in .safetensors"),
    (lambda m: m["sequences"][0].pop("shard"), "sequences[0].shard: missing"),
    (lambda m: m["selection"].update(fraction=unit_value(1, 0)), "sequences[0].id: sequence 1 is not in the store's selection"),
]


@pytest.mark.parametrize("change,message", DAMAGES)
def test_a_damaged_manifest_names_the_file_and_the_key(tmp_path, change, message):
    store = write_store(tmp_path / "store", damaged(change))
    with pytest.raises(MoqaeError) as error:
        read_manifest(store)
    assert str(error.value).startswith(f"{store}/manifest.json: {message}")


def test_a_missing_directory_or_a_file_is_not_a_store(tmp_path):
    with pytest.raises(MoqaeError, match=f"^{tmp_path}/nowhere: no such store directory$"):
        read_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("")
    with pytest.raises(MoqaeError, match=f"^{tmp_path}/file: is a file, expected a store directory$"):
        read_manifest(str(tmp_path / "file"))


# Each bad store beside the one line every command prints for it.
BAD_STORES = {
    "missing file": (None, "manifest.json: cannot read (No such file or directory)"),
    "bad JSON": ("{", "manifest.json: invalid JSON at line 1 column 2: Expecting property name enclosed in double quotes"),
    "missing key": (damaged(lambda m: m["model"].pop("head_dim")), "manifest.json: model.head_dim: missing"),
    "wrong type": (damaged(lambda m: m["corpus"].update(seq_len="64")), "manifest.json: corpus.seq_len: expected an integer"),
}


def bad_store(tmp_path, case):
    content, message = BAD_STORES[case]
    store = tmp_path / "store"
    store.mkdir()
    if content is not None:
        write_store(store, content)
    return str(store), f"error: {store}/{message}"


def expect_one_line(capsys, status, expected):
    stderr = capsys.readouterr().err
    assert status == 1 and "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(expected), stderr


@pytest.fixture(scope="module")
def reference_router(tmp_path_factory):
    """A router export of random weights that fits the reference model."""
    layers, heads, head_dim, _ = model_shape(AutoConfig.from_pretrained(REFERENCE_MODEL, local_files_only=True))
    path = str(tmp_path_factory.mktemp("router") / "router.bin")
    write_export(path, random_export(layers, heads, head_dim))
    return path


@pytest.mark.parametrize("case", BAD_STORES)
def test_eval_reports_a_bad_store_in_one_line(tmp_path, capsys, small_corpus, reference_router, case):
    store, expected = bad_store(tmp_path, case)
    status = main(["eval", "--model", REFERENCE_MODEL, "--text", small_corpus, "--tokenizer", "bytes", "--router",
                   reference_router, "--store", store, "--max-windows", "2"])
    expect_one_line(capsys, status, expected)


@pytest.mark.parametrize("case", BAD_STORES)
def test_pareto_reports_a_bad_store_in_one_line_before_training(tmp_path, capsys, small_corpus, case):
    store, expected = bad_store(tmp_path, case)
    status = main(["pareto", "--moqae-train", str(tmp_path / "no-trainer"), "--store", store, "--model", REFERENCE_MODEL,
                   "--text", small_corpus, "--out", str(tmp_path / "out")])
    expect_one_line(capsys, status, expected)
    assert not (tmp_path / "out").exists()


def test_benchmark_reports_a_bad_store_in_one_line(tmp_path, capsys):
    write_store(tmp_path / "store-tiny-4", "{")
    status = main(["benchmark", "--moqae-train", str(tmp_path / "no-trainer"), "--work", str(tmp_path), "--shape", "tiny",
                   "--sequences", "4"])
    expect_one_line(capsys, status, f"error: {tmp_path}/store-tiny-4/manifest.json: invalid JSON at line 1 column 2")


def test_the_command_line_prints_no_traceback_for_a_bad_store(tmp_path, small_corpus, reference_router):
    store, expected = bad_store(tmp_path, "wrong type")
    result = subprocess.run([sys.executable, "-m", "moqae", "eval", "--model", REFERENCE_MODEL, "--text", small_corpus,
                             "--tokenizer", "bytes", "--router", reference_router, "--store", store],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=PYTHON))
    assert result.returncode == 1 and result.stderr == f"{expected} in 1...2147483647\n"
