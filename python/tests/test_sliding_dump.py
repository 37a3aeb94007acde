"""Dump, train and eval on windows longer than a sliding window (tiny random Gemma 3: sliding, global, sliding;
Gemma 2: sliding, global, with soft-capping; Mistral: every layer sliding; W = 64 at 4 W = 256 tokens): the store says which chunks each layer's cache holds at
the window's end (version 3), a sliding layer's older chunks have no sensitivity, and the trainer and evaluator
route and count only what the caches hold, with the same bits on both sides."""
import json
import os
import subprocess

import pytest
import torch

from conftest import run_moqae, train_on
from test_families import family_configs
from moqae.evaluate.plans import Layout
from moqae.evaluate.scoring import kv_memory_bits
from moqae.store import Store, read_manifest

WINDOW, T, CHUNK = 64, 256, 32


@pytest.fixture(scope="module")
def sliding_dir(tmp_path_factory):
    """Family → the directory of its tiny random model with sliding windows of 64 tokens."""
    from transformers import AutoModelForCausalLM
    made = {}

    def make(family):
        if family not in made:
            config = family_configs()[family][0]
            config.sliding_window = WINDOW
            torch.manual_seed(0)
            made[family] = str(tmp_path_factory.mktemp(family))
            AutoModelForCausalLM.from_config(config).save_pretrained(made[family])
        return made[family]
    return make


def expected_first_held(family):
    """The serving rule written out: the next query (at T) sees T − W + 1 … T, so a sliding layer holds its chunks
    from (T − W + 1) // N on."""
    sliding = {"gemma3": [True, False, True], "gemma2": [True, False], "mistral": [True, True]}[family]
    return [(T - WINDOW + 1) // CHUNK if is_sliding else 0 for is_sliding in sliding]


@pytest.mark.parametrize("family,background", [("gemma3", None), ("gemma2", None), ("mistral", "int2")])
def test_a_store_past_the_sliding_window_holds_what_the_caches_hold(family, background, sliding_dir, small_corpus,
                                                                     tmp_path, moqae_train):
    directory, store = sliding_dir(family), str(tmp_path / "store")
    dumped = run_moqae("dump", "--model", directory, "--corpus", small_corpus, "--out", store, "--tokenizer", "bytes",
                       "--seq-len", str(T), "--fraction", "0.1", *(["--background", background] if background else []))
    assert dumped.returncode == 0, dumped.stderr
    with open(os.path.join(store, "manifest.json")) as f:
        raw = json.load(f)
    held = expected_first_held(family)
    assert raw["version"] == 3 and raw["first_held_chunks"] == held and ("background" in raw) == bool(background)
    manifest = read_manifest(store)
    assert manifest.first_held_chunks == held
    opened = Store(store)
    for sequence in manifest.sequences[:4]:
        delta = opened.tensor(sequence, "delta_nll")                        # (L, H, C, M)
        for layer, first in enumerate(held):
            assert not delta[layer, :, :first].any(), (layer, "a chunk the cache does not hold has a sensitivity")
            assert delta[layer, :, max(first, 1):].abs().sum() > 0, layer
    inspected = subprocess.run([moqae_train, "inspect", store], capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr
    assert "store version 3, OK" in inspected.stdout and "layer 0 from chunk 6" in inspected.stdout, inspected.stdout

    run_dir = str(tmp_path / "run")
    trained = train_on(moqae_train, store, run_dir, "router.group_size=1", "data.calibration_fraction=0.05",
                       "data.validation_fraction=0.05", max_steps=2)
    assert trained.returncode == 0, trained.stderr
    evaluated = subprocess.run([moqae_train, "eval", run_dir, "--json"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    windows, heads, experts = report["sequences"], manifest.model.num_kv_heads, manifest.experts
    routed_units = [windows * heads * (T // CHUNK - max(1, first)) for first in held]   # group size 1: a router per layer
    assert [sum(counts) for counts in report["decisions_per_router"]] == routed_units
    units = [sum(counts[m] for counts in report["decisions_per_router"]) for m in range(len(experts))]
    layout = Layout(T, CHUNK, 1, manifest.model.num_layers, heads, manifest.model.head_dim, manifest.value_group, held)
    payload, with_constants = kv_memory_bits(layout, experts, units, windows)
    assert payload == pytest.approx(report["router"]["payload_bits"], rel=1e-12, abs=0)
    assert with_constants == pytest.approx(report["router"]["bits_with_constants"], rel=1e-12, abs=0)
    # uniform fp16 holds what the caches hold at 16 bits: the held elements, not every token of every layer
    held_elements = sum(2 * heads * (T - first * CHUNK) * manifest.model.head_dim for first in held)
    int2 = next(row for row in report["uniform"] if row["name"] == "uniform int2")
    sixteen = held_elements - sum(routed_units) // windows * 2 * CHUNK * manifest.model.head_dim
    assert int2["payload_bits"] == pytest.approx((sum(routed_units) // windows * 2 * CHUNK * manifest.model.head_dim * 2
                                                  + 16 * sixteen) / held_elements, rel=1e-12)

    router = str(tmp_path / "router.bin")
    exported = subprocess.run([moqae_train, "export", run_dir, "--out", router], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    scored = run_moqae("eval", "--model", directory, "--text", small_corpus, "--router", router, "--tokenizer", "bytes",
                       "--seq-len", str(T), "--max-windows", "2", "--store", store, "--json")
    assert scored.returncode == 0, scored.stderr
    rows = {row["name"]: row for row in json.loads(scored.stdout)["results"]}
    printed = run_moqae("eval", "--model", directory, "--text", small_corpus, "--router", router, "--tokenizer", "bytes",
                        "--seq-len", str(T), "--max-windows", "1", "--no-baselines")
    assert printed.returncode == 0 and "layer 0 from chunk 6" in printed.stdout, printed.stderr
    for name in ("router", "uniform int2", "static", "layer-wise"):
        per_layer = [sum(counts) for counts in rows[name]["decisions_per_layer"]]
        assert per_layer == [2 * heads * (T // CHUNK - max(1, first)) for first in held], name


def test_a_router_group_of_sliding_and_global_layers_is_refused(sliding_dir, small_corpus, tmp_path, moqae_train):
    store = str(tmp_path / "store")
    dumped = run_moqae("dump", "--model", sliding_dir("gemma3"), "--corpus", small_corpus, "--out", store, "--tokenizer",
                       "bytes", "--seq-len", str(T), "--fraction", "0.1")
    assert dumped.returncode == 0, dumped.stderr
    trained = train_on(moqae_train, store, str(tmp_path / "run"), "router.group_size=3", "data.calibration_fraction=0.05",
                       "data.validation_fraction=0.05", max_steps=1)
    lines = trained.stderr.strip().splitlines()
    assert trained.returncode != 0 and len(lines) == 1, trained.stderr
    assert "router.group_size" in lines[0] and "router 0 would serve layers 0-2" in lines[0] and "from 6, 0, 6" in lines[0]
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "metrics.jsonl"))
