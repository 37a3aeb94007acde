"""Memory accounting, Swift against Python: the bits the trainer's validation report gives each plan are the
bits the evaluator's accounting gives the same decisions, on a real dumped store with a value group
smaller than the head, a tail of unrouted tokens, several router groups, and chunk 0 frozen or routed."""
import json
import subprocess

import pytest

from conftest import run_moqae, train_on
from moqae.evaluate.plans import Layout
from moqae.evaluate.scoring import kv_memory_bits
from moqae.store import read_manifest

EXPERTS = ["fp16", "k4v2", "int2"]


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("accounting") / "store")
    corpus = tmp_path_factory.getbasetemp() / "accounting-corpus.txt"
    corpus.write_bytes(bytes(range(32, 127)) * 400)
    result = run_moqae("dump", "--model", tiny_llama, "--corpus", str(corpus), "--out", out, "--tokenizer", "bytes",
                       "--seq-len", "144", "--fraction", "0.5", "--value-group", "4", "--experts", "fp16,int4,k4v2,int2")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("group_size,freeze", [(2, True), (1, False)])
def test_the_trainers_bits_are_the_evaluators(store, group_size, freeze, moqae_train, tmp_path):
    run_dir = str(tmp_path / "run")
    train = train_on(moqae_train, store, run_dir, f"router.experts=[{', '.join(EXPERTS)}]", f"router.group_size={group_size}",
                     f"router.freeze_first_chunk={str(freeze).lower()}", "data.calibration_fraction=0.25",
                     "data.validation_fraction=0.25", max_steps=0)
    assert train.returncode == 0, train.stderr
    evaluated = subprocess.run([moqae_train, "eval", run_dir, "--json"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)

    manifest = read_manifest(store)
    experts = [next(e for e in manifest.experts if e.name == name) for name in EXPERTS]
    shape = manifest.model
    layout = Layout(manifest.seq_len, manifest.chunk_size, 1 if freeze else 0, shape.num_layers, shape.num_kv_heads,
                    shape.head_dim, manifest.value_group)
    assert layout.value_group < layout.head_dim and layout.tokens % layout.chunk_size, "the store should exercise both"
    windows = report["sequences"]
    layer_units = windows * layout.num_layers * layout.num_heads * layout.routed   # routed (layer, head, chunk) units

    group_layers = [len(range(r * group_size, min(shape.num_layers, (r + 1) * group_size)))
                    for r in range(len(report["decisions_per_router"]))]
    router_units = [sum(counts[e] * layers for counts, layers in zip(report["decisions_per_router"], group_layers))
                    for e in range(len(experts))]
    assert sum(router_units) == layer_units
    rows = [(report["router"], router_units), (report["static"], [f * layer_units for f in report["static"]["expert_fractions"]])]
    rows += [(row, [layer_units if m == e else 0 for m in range(len(experts))]) for e, row in enumerate(report["uniform"])]
    for row, units in rows:
        payload, with_constants = kv_memory_bits(layout, experts, units, windows)
        assert payload == pytest.approx(row["payload_bits"], rel=1e-12, abs=0), row["name"]
        assert with_constants == pytest.approx(row["bits_with_constants"], rel=1e-12, abs=0), row["name"]
