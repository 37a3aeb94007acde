"""The dump command end to end: stores from Llama and Qwen2, resume, parallel parts, bad inputs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REFERENCE_MODEL, copy_model, run_moqae, train_on
from moqae import MoqaeError


def dump(model, corpus, out, *extra):
    return run_moqae("dump", "--model", model, "--corpus", corpus, "--out", out, "--tokenizer", "bytes", *extra)


def store_tensors(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def expect_clean_failure(result, out, *mentions):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in mentions:
        assert text in lines[0], lines[0]
    assert not os.path.exists(os.path.join(out, "manifest.json"))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_dumps_llama_and_qwen2_and_the_trainer_reads_them(family, request, small_corpus, tmp_path, moqae_train):
    model = request.getfixturevalue(family)
    out = str(tmp_path / "store")
    result = dump(model, small_corpus, out, "--seq-len", "128", "--fraction", "0.2", "--experts", "fp16,int8,k4v2,int2")
    assert result.returncode == 0, result.stderr
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["corpus"]["seq_len"] == 128 and manifest["chunk_size"] == 32
    assert [e["name"] for e in manifest["experts"]] == ["fp16", "int8", "k4v2", "int2"]
    inspect = subprocess.run([moqae_train, "inspect", out], capture_output=True, text=True)
    assert inspect.returncode == 0 and "every tensor verified" in inspect.stdout, inspect.stderr
    train = train_on(moqae_train, out, str(tmp_path / "run"), "router.experts=[fp16, k4v2, int2]",
                     "data.calibration_fraction=0.1", "data.validation_fraction=0.1", max_steps=3)
    assert train.returncode == 0, train.stderr
    assert "validation:" in train.stdout


@pytest.mark.parametrize("router_input", ["key-prerope", "key+value", "key+chunk"])
def test_router_inputs_reach_the_store_trainer_export_and_evaluator(router_input, tiny_llama, small_corpus, tmp_path, moqae_train):
    common = ["--seq-len", "128", "--fraction", "0.05"]
    key_store, out = str(tmp_path / "key"), str(tmp_path / "store")
    assert dump(tiny_llama, small_corpus, key_store, *common).returncode == 0
    result = dump(tiny_llama, small_corpus, out, *common, "--router-input", router_input)
    assert result.returncode == 0, result.stderr
    assert json.load(open(os.path.join(out, "manifest.json")))["router_input"] == router_input
    keys, inputs = store_tensors(key_store), store_tensors(out)
    for name in (n for n in keys if n.endswith(".inputs")):
        if router_input == "key+value":   # (L, H, T, 2D): the cached key, then the value
            assert inputs[name].shape[-1] == 32 and torch.equal(inputs[name][..., :16], keys[name])
        elif router_input == "key+chunk":   # (L, H, T, D + 7): the cached key, then its chunk's statistics
            assert inputs[name].shape[-1] == 23 and torch.equal(inputs[name][..., :16], keys[name])
            statistics = inputs[name][..., 16:].float()
            assert torch.equal(statistics[..., :32, :], statistics[..., :1, :].expand_as(statistics[..., :32, :]))
            assert not torch.equal(statistics[..., 0, :], statistics[..., 32, :])
        else:                             # RoPE turns position 0 by no angle and every later one by some
            assert inputs[name].shape == keys[name].shape
            assert torch.equal(inputs[name][..., 0, :], keys[name][..., 0, :])
            assert not torch.allclose(inputs[name][..., 1:, :].float(), keys[name][..., 1:, :].float(), atol=1e-2)

    run_dir, export = str(tmp_path / "run"), str(tmp_path / "router.bin")
    train = train_on(moqae_train, out, run_dir, "data.calibration_fraction=0.03", "data.validation_fraction=0.02", max_steps=3)
    assert train.returncode == 0, train.stderr
    assert subprocess.run([moqae_train, "export", run_dir, "--out", export], capture_output=True).returncode == 0
    inspect = subprocess.run([moqae_train, "inspect", export], capture_output=True, text=True)
    width = {"key+value": 32, "key+chunk": 23}.get(router_input, 16)
    assert f"D = {width} (router input {router_input})" in inspect.stdout, inspect.stdout
    scored = run_moqae("eval", "--model", tiny_llama, "--text", small_corpus, "--tokenizer", "bytes", "--seq-len", "128",
                       "--router", export, "--max-windows", "2", "--store", out, "--json", "--layer-plan", "int4,int2,int2")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    names = [r["name"] for r in report["results"]]
    assert names[0] == "router" and "static" in names and "layer-wise" in names
    layer_plan = report["results"][names.index("layer plan (int4, int2, int2)")]
    assert layer_plan["experts"] == ["int4", "int2"] and layer_plan["decisions_per_layer"][0][0] > 0 == layer_plan["decisions_per_layer"][1][0]
    prescient = report["results"][names.index("prescient (gradients of the evaluated text)")]
    assert prescient["diagnostic"] and "not a target" in prescient["note"]
    comparison = report["router_vs_static"]
    assert (comparison["a"], comparison["b"], comparison["unit"], comparison["windows"]) == ("router", "static", "bits_per_byte", 2)
    assert comparison["ci95"][0] <= comparison["mean"] <= comparison["ci95"][1]


def test_resume_continues_an_interrupted_dump(tiny_llama, small_corpus, tmp_path, monkeypatch):
    from moqae.calibrate import dump as dump_module
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    args = ["--seq-len", "128", "--fraction", "0.2", "--shard-size", "100K"]
    assert dump(tiny_llama, small_corpus, whole, *args).returncode == 0

    real_add = dump_module.StoreWriter.add
    calls = {"n": 0}

    def interrupted_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(dump_module.StoreWriter, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        dump_module.dump(tiny_llama, [small_corpus], split, tokenizer="bytes", seq_len=128, fraction=0.2, shard_size=100 << 10)
    assert not os.path.exists(os.path.join(split, "manifest.json"))
    assert any(n.startswith("shard-") for n in os.listdir(split))
    monkeypatch.setattr(dump_module.StoreWriter, "add", real_add)
    refused = dump(tiny_llama, small_corpus, split, *args)
    expect_clean_failure(refused, split, "--resume")
    assert dump(tiny_llama, small_corpus, split, *args, "--resume").returncode == 0
    a, b = store_tensors(whole), store_tensors(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shards = [n for n in os.listdir(split) if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(os.path.getsize(os.path.join(split, n)) <= 100 * 1024 for n in shards)
    assert json.load(open(os.path.join(whole, "manifest.json")))["sequences"] == \
        json.load(open(os.path.join(split, "manifest.json")))["sequences"]


def test_parallel_parts_merge_into_the_same_store(tiny_llama, small_corpus, tmp_path):
    """Engine-free: one process per --shard-index, then merge; and torchrun with two CPU processes on gloo,
    whose rank 0 merges: both stores equal the single-process one, tensor for tensor."""
    single, merged, launched = str(tmp_path / "single"), str(tmp_path / "merged"), str(tmp_path / "torchrun")
    common = ["--seq-len", "128", "--fraction", "0.2"]
    assert dump(tiny_llama, small_corpus, single, *common).returncode == 0
    parts = []
    for index in range(2):
        part = str(tmp_path / f"part{index}")
        result = dump(tiny_llama, small_corpus, part, *common, "--num-shards", "2", "--shard-index", str(index))
        assert result.returncode == 0, result.stderr
        assert not os.path.exists(os.path.join(part, "manifest.json"))
        parts.append(part)
    incomplete = run_moqae("merge", "--out", merged, parts[0])
    expect_clean_failure(incomplete, merged, "parts 0..1")
    assert run_moqae("merge", "--out", merged, *parts).returncode == 0

    env = dict(os.environ, PYTHONPATH=PYTHON, OMP_NUM_THREADS="1")
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "moqae", "dump", "--model", tiny_llama, "--corpus", small_corpus, "--out", launched,
                               "--tokenizer", "bytes", *common], capture_output=True, text=True, env=env)
    assert torchrun.returncode == 0, torchrun.stderr
    assert not os.path.exists(launched + ".parts")

    ids = lambda d: [s["id"] for s in json.load(open(os.path.join(d, "manifest.json")))["sequences"]]
    a = store_tensors(single)
    for store in (merged, launched):
        b = store_tensors(store)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), store
        assert ids(single) == ids(store)


def test_damaged_parts_are_refused_before_anything_is_merged(tiny_llama, small_corpus, tmp_path):
    parts, out = [str(tmp_path / f"part{index}") for index in range(2)], str(tmp_path / "merged")
    for index, part in enumerate(parts):
        result = dump(tiny_llama, small_corpus, part, "--seq-len", "128", "--fraction", "0.1", "--num-shards", "2",
                      "--shard-index", str(index))
        assert result.returncode == 0, result.stderr
    path = os.path.join(parts[0], "part.json")
    original = json.load(open(path))
    for damage, mention in [(lambda p: p.pop("part"), "part.json: part.count: missing"),
                            (lambda p: p["part"].update(index=7), "part.json: part.index: expected an integer in 0...1"),
                            (lambda p: p["sequences"][0].update(shard="../x.safetensors"), "part.json: sequences[0].shard"),
                            (lambda p: p["sequences"][0].update(id=10 ** 9), "is outside the corpus")]:
        damaged = json.loads(json.dumps(original))
        damage(damaged)
        json.dump(damaged, open(path, "w"))
        expect_clean_failure(run_moqae("merge", "--out", out, *parts), out, mention)
        assert not os.path.exists(out)
    json.dump(original, open(path, "w"))
    assert run_moqae("merge", "--out", out, *parts).returncode == 0


def test_bad_inputs(tmp_path, small_corpus):
    out = str(tmp_path / "store")
    expect_clean_failure(dump(str(tmp_path / "nowhere"), small_corpus, out), out, "model directory not found")
    no_weights = copy_model(REFERENCE_MODEL, str(tmp_path / "no-weights"))
    os.unlink(os.path.join(no_weights, "model.safetensors"))
    expect_clean_failure(dump(no_weights, small_corpus, out), out, "no weights")
    no_config = copy_model(REFERENCE_MODEL, str(tmp_path / "no-config"))
    os.unlink(os.path.join(no_config, "config.json"))
    expect_clean_failure(dump(no_config, small_corpus, out), out, "config.json")
    expect_clean_failure(dump(REFERENCE_MODEL, small_corpus, out, "--seq-len", "1024"), out, "max_position_embeddings 512")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_clean_failure(dump(REFERENCE_MODEL, str(empty), out), out, "fewer than one window")
    expect_clean_failure(dump(REFERENCE_MODEL, small_corpus, out, "--experts", "int4,int2"), out, "no 16/16 expert")
    expect_clean_failure(dump(REFERENCE_MODEL, str(tmp_path / "missing.txt"), out), out, "missing.txt")
    assert not os.path.exists(out)


def test_attention_outside_the_interface_is_refused(tmp_path, small_corpus, monkeypatch):
    """A model whose attention bypasses transformers' attention interface cannot be captured."""
    from transformers.models.llama import modeling_llama
    from moqae.calibrate.dump import dump

    def bypassing_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        output, weights = modeling_llama.eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1)), weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", bypassing_forward)
    out = str(tmp_path / "store")
    with pytest.raises(MoqaeError, match="does not go through transformers' attention interface"):
        dump(REFERENCE_MODEL, [small_corpus], out, tokenizer="bytes", fraction=0.05)
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_a_store_around_a_background_records_it_and_the_trainer_reads_it(tiny_llama, small_corpus, tmp_path, moqae_train):
    """`--background int4,int2,int2 --exact-answers`: a version 2 store whose nll is the background's loss
    and whose delta_nll is 0 at every unit's background expert; inspect, train and needle-signal read it."""
    out = str(tmp_path / "store")
    result = dump(tiny_llama, small_corpus, out, "--seq-len", "128", "--fraction", "0.1", "--passkey", "0.5",
                  "--answer-weight", "20", "--background", "int4,int2,int2", "--exact-answers")
    assert result.returncode == 0, result.stderr
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["version"] == 2 and manifest["sensitivity"] == "taylor+exact-answers"
    assert manifest["background"] == {"experts": ["int4", "int2", "int2"], "frozen_chunks": 1}
    tensors = store_tensors(out)
    for sequence in manifest["sequences"]:
        delta = tensors[f"seq.{sequence['id']}.delta_nll"]                     # (L, H, C, M): fp16, int4, int2
        assert (delta[:, :, 0, 0] == 0).all() and (delta[0, :, 1:, 1] == 0).all() and (delta[1:, :, 1:, 2] == 0).all()
        assert (delta[1:, :, 1:, 0] != 0).all()                                # fp16 above an int2 background: measured
    inspect = subprocess.run([moqae_train, "inspect", out], capture_output=True, text=True)
    assert inspect.returncode == 0 and "store version 2" in inspect.stdout and "int4,int2,int2" in inspect.stdout
    train = train_on(moqae_train, out, str(tmp_path / "run"), "data.calibration_fraction=0.06",
                     "data.validation_fraction=0.04", "router.freeze_first_chunk=true", max_steps=3)
    assert train.returncode == 0, train.stderr
    signal = run_moqae("needle-signal", "--store", out, "--corpus", small_corpus)
    assert signal.returncode == 0 and "| 0 |" in signal.stdout, signal.stderr
    refused = dump(tiny_llama, small_corpus, str(tmp_path / "other"), "--seq-len", "128", "--background", "int2",
                   "--exact-answers")
    expect_clean_failure(refused, str(tmp_path / "other"), "--exact-answers", "--passkey")
    refused = dump(tiny_llama, small_corpus, str(tmp_path / "other"), "--seq-len", "128", "--background", "int3")
    expect_clean_failure(refused, str(tmp_path / "other"), "--background int3", "not one of the store's")
