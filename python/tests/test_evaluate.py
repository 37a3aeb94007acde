"""The evaluator: plans against direct fake-quantized forwards, router decisions against the trainer's
golden ones, and export damage."""
import dataclasses
import json
import os
import struct
import zlib

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_MODEL, ROOT, VALID_TXT, run_moqae
from moqae import MoqaeError
from moqae.capture import KVHook
from moqae.corpus import ByteTokenizer, read_texts, windows
from moqae.model import load_model
import itertools
import math

from moqae.evaluate.allocation import layerwise_plan, static_plan
from moqae.evaluate.oracles import prescient_plan
from moqae.evaluate.plans import Layout, UniformPlan
from moqae.evaluate.scoring import Result, evaluate_plan, paired_difference
from moqae.experts import parse_expert
from moqae.quantizer import quantize_keys, quantize_values, unit_storage_bits
from moqae.router import POOLINGS, random_export, read_export, route, route_chunks, write_export
from moqae.calibrate.sensitivity import mean_nll

GOLDEN = os.path.join(ROOT, "Tests", "MoQAETrainingTests", "Golden")


@pytest.fixture(scope="module")
def reference():
    model = load_model(REFERENCE_MODEL, "cpu", None, "float32")
    return model, windows(read_texts([VALID_TXT]), ByteTokenizer(), 512)[:6]


def test_uniform_plan_equals_a_direct_fake_quantized_forward(reference):
    model, text = reference
    layout = Layout(512, 32, 1, 4, 2, 64, 64)
    for name in ("int4", "k4v2"):
        expert = parse_expert(name)
        result = evaluate_plan(model, text, UniformPlan(expert), layout, batch_size=4, model_dir=REFERENCE_MODEL, progress=False)

        def direct(layer, key, value):   # chunk 0 and the tail at binary16, chunks 1..15 quantized
            k, v = key.half().float(), value.half().float()
            k[:, :, 32:512] = quantize_keys(key[:, :, 32:512], expert.key_bits, 32)
            v[:, :, 32:512] = quantize_values(value[:, :, 32:512], expert.value_bits, 32, 64)
            return k, v

        with torch.no_grad(), KVHook(transform=direct).active():
            expected = torch.cat([mean_nll(model(w[None]).logits, w[None]) for w in text]).double().mean().item()
        assert abs(result.nll - expected) < 1e-6
        summary = result.summary(bytes_per_token=1)
        assert summary["payload_bits"] == pytest.approx((16 + 15 * (expert.key_bits + expert.value_bits) / 2) / 16)
        assert summary["bits_per_byte"] == pytest.approx(result.nll / torch.log(torch.tensor(2.0)).item())


def resealed(body):
    """An export body (all but the CRC) with its CRC-32 appended."""
    return bytes(body) + zlib.crc32(body).to_bytes(4, "little")


def as_version_2(export_bytes, kind):
    """A version 1 export rewritten as version 2 of router kind `kind` (hidden width M), with its CRC resealed."""
    body = bytearray(export_bytes[:-4])
    body[4], body[21], body[22] = 2, kind, body[7]
    return resealed(body)


@pytest.mark.parametrize("pooling, hidden", [("vote", 3), ("mean", 3), ("max", 3), ("max", 5)])
def test_router_decisions_equal_the_trainers(pooling, hidden, tmp_path):
    """router-init.bin holds the golden initial weights; golden.safetensors the decisions that both the
    Swift trainer and PyTorch float64 make with them on the golden store, for every chunk pooling
    (mean and max read from the same weights written as version 2), and router-h5-max.bin those of a
    max-pooling router of hidden width 5."""
    path = os.path.join(GOLDEN, "router-init.bin" if hidden == 3 else "router-h5-max.bin")
    if pooling != "vote" and hidden == 3:
        path = tmp_path / "router.bin"
        path.write_bytes(as_version_2(open(os.path.join(GOLDEN, "router-init.bin"), "rb").read(), POOLINGS.index(pooling)))
    export = read_export(str(path))
    assert export.pooling == pooling and export.weights[0][2].shape == (hidden, 3)
    prefix = ("" if hidden == 3 else f"h{hidden}.") + ("" if pooling == "vote" else f"{pooling}.")
    golden = load_file(os.path.join(GOLDEN, "golden.safetensors"))[prefix + "decisions"]
    store = load_file(os.path.join(GOLDEN, "store", "shard-00000.safetensors"))
    ids = sorted(int(k.split(".")[1]) for k in store if k.endswith(".inputs"))
    for row, seq_id in enumerate(ids):
        keys = store[f"seq.{seq_id}.inputs"]
        decisions = torch.cat([route(export, r, keys[export.leader(r)]).flatten() for r in range(export.num_routers)])
        assert torch.equal(decisions, golden[row])


def test_damaged_exports_are_rejected(tmp_path):
    source = os.path.join(GOLDEN, "router-init.bin")
    data = bytearray(open(source, "rb").read())
    chunk_input = data[:20] + bytes([data[20] | 3 << 1]) + data[21:-4]
    (tmp_path / "chunk.bin").write_bytes(resealed(chunk_input))
    assert read_export(str(tmp_path / "chunk.bin")).router_input == "key+chunk"   # code 3 of the flags' bits 1–2
    cases = {"flipped": data[:40] + bytes([data[40] ^ 1]) + data[41:], "truncated": data[:-3],
             "magic": b"MQAX" + data[4:], "version": data[:4] + b"\x04" + data[5:],
             "kind": as_version_2(data, 3), "v1 kind": resealed(data[:21] + b"\x01" + data[22:-4])}
    reasons = {"flipped": "CRC-32 mismatch", "truncated": "header implies", "magic": "magic",
               "version": "version 4 is not supported",
               "kind": "router kind 3 is unknown", "v1 kind": "reserved header bits are not zero"}
    for name, damaged in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(bytes(damaged))
        with pytest.raises(MoqaeError, match=reasons[name]):
            read_export(str(path))
    result = run_moqae("eval", "--model", REFERENCE_MODEL, "--text", VALID_TXT, "--tokenizer", "bytes",
                       "--router", str(tmp_path / "flipped.bin"))
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: {tmp_path / 'flipped.bin'}: CRC-32 mismatch: the file is damaged"]


def test_prescient_sensitivities_serve_frozen_and_routed_first_chunks():
    """The prescient plan's sensitivities keep chunk 0, and each plan takes the chunks its layout routes: with
    room for one int2 unit, it goes to the cheapest routed chunk (1), never to chunk 0."""
    experts = [parse_expert(n) for n in ("fp16", "int4", "int2")]
    deltas = torch.zeros(2, 1, 1, 4, 3, dtype=torch.float64)    # (windows, L, H, C, M)
    deltas[..., 1] = 0.01
    deltas[..., 2] = torch.tensor([5.0, 0.02, 0.03, 0.04]).expand(2, 1, 1, 4)
    int4, int2 = (unit_storage_bits(e, 32, 64, 64) for e in experts[1:])
    for first, expected in ((0, [1, 2, 1, 1]), (1, [2, 1, 1])):
        layout = Layout(128, 32, first, 1, 1, 64, 64)
        routed = 4 - first
        plan = prescient_plan(deltas, experts, layout, budget_per_unit=((routed - 1) * int4 + int2) / routed)
        for w in range(2):
            assert plan.decisions[w].flatten().tolist() == expected
        assert plan.note and "not a target" in plan.note


def test_static_plan_is_the_brute_force_optimum():
    """On a hand-made table (1 layer × 2 heads × 3 chunks, 3 experts: 729 plans), the static plan at
    every budget is within the budget, and no plan has a lower summed delta_nll within the bits it uses."""
    experts = [parse_expert(n) for n in ("fp16", "int4", "int2")]
    summed = torch.tensor([[[[0.0, 0.010, 0.300], [0.0, 0.002, 0.040], [0.0, 0.030, 0.050]],
                            [[0.0, 0.001, 0.020], [0.0, 0.020, 0.600], [0.0, 0.004, 0.009]]]], dtype=torch.float64)
    layout = Layout(96, 32, 0, 1, 2, 64, 64)
    bits = [unit_storage_bits(e, 32, 64, 64) for e in experts]
    costs = summed.reshape(6, 3)

    def figures(plan):
        return sum(costs[u, e].item() for u, e in enumerate(plan)), sum(bits[e] for e in plan)

    everything = [figures(plan) for plan in itertools.product(range(3), repeat=6)]
    seen = set()
    for budget in torch.linspace(min(bits), max(bits), 13).tolist():
        plan = static_plan(summed, experts, layout, budget).per_position.flatten().tolist()
        cost, used = figures(plan)
        assert used <= budget * 6 + 1e-9
        assert math.isclose(cost, min(c for c, b in everything if b <= used), abs_tol=1e-12), (budget, plan)
        seen.add(tuple(plan))
    assert len(seen) >= 5   # the budgets really move the plan


def test_static_plan_reuses_its_last_position_past_the_store_windows():
    experts = [parse_expert(n) for n in ("fp16", "int2")]
    summed = torch.tensor([[[[0.0, 1.0], [0.0, 0.1]]]], dtype=torch.float64)   # (L, H, C = 2, M)
    fp16, int2 = (unit_storage_bits(e, 32, 64, 64) for e in experts)
    plan = static_plan(summed, experts, Layout(128, 32, 0, 1, 1, 64, 64), budget_per_unit=(fp16 + int2) / 2)
    assert plan.per_position.flatten().tolist() == [0, 1, 1, 1]


def test_the_static_plan_allocates_over_the_chunks_the_caches_hold():
    """Layer 0 holds chunks 2-3 only (a sliding layer): the static plan fits the 6 held units under the budget, as a
    brute force over them alone does; layer 0's unheld positions take no bits. The layer-wise plan fits a store
    shorter than the windows."""
    experts = [parse_expert(n) for n in ("fp16", "int4", "int2")]
    summed = torch.rand(2, 1, 4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    summed[..., 0] = 0
    layout = Layout(128, 32, 0, 2, 1, 64, 64, first_held=[2, 0])
    bits = [unit_storage_bits(e, 32, 64, 64) for e in experts]
    held = [(0, 2), (0, 3)] + [(1, c) for c in range(4)]
    for budget in (bits[2], (bits[1] + bits[2]) / 2, bits[1], (bits[0] + bits[1]) / 2):
        plan = static_plan(summed, experts, layout, budget).per_position[:, 0]
        cost = sum(summed[l, 0, c, plan[l, c]].item() for l, c in held)
        used = sum(bits[plan[l, c]] for l, c in held)
        assert used <= budget * len(held) + 1e-9
        best = min(sum(summed[l, 0, c, e].item() for (l, c), e in zip(held, choice))
                   for choice in itertools.product(range(3), repeat=len(held))
                   if sum(bits[e] for e in choice) <= used)
        assert math.isclose(cost, best, abs_tol=1e-12), budget

    class Calibration:
        experts, summed = [parse_expert(n) for n in ("fp16", "int4", "int2")], torch.rand(2, 1, 2, 3, dtype=torch.float64)
    assert len(layerwise_plan(Calibration, layout, bits[1]).per_layer) == 2


def test_paired_difference_is_the_mean_of_per_window_differences_with_its_interval():
    layout = Layout(64, 32, 0, 1, 1, 8, 8)
    a, b = Result("router", [], layout, 4), Result("static", [], layout, 4)
    a.window_nll, b.window_nll = [1.0, 1.2, 0.9, 1.1], [1.1, 1.25, 1.0, 1.1]
    d = paired_difference(a, b, fp16_value=2.0, bytes_per_token=1)
    differences = torch.tensor([-0.1, -0.05, -0.1, 0.0], dtype=torch.float64) / math.log(2)
    half = 1.96 * differences.std().item() / 2
    assert math.isclose(d["mean"], differences.mean().item())
    assert all(math.isclose(x, y) for x, y in zip(d["ci95"], [d["mean"] - half, d["mean"] + half]))
    assert math.isclose(d["percent_of_fp16"], 50 * d["mean"]) and d["verdict"] == "router is better"


def test_exports_that_are_not_regular_files_or_too_large_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "router.bin"
    os.mkfifo(fifo)
    with pytest.raises(MoqaeError, match="router.bin: is a FIFO, expected a regular file"):
        read_export(str(fifo))                      # would block in open() without O_NONBLOCK
    with pytest.raises(MoqaeError, match="is a directory"):
        read_export(str(tmp_path))
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.write(b"MQAE")
        f.truncate((64 << 20) + 1)                  # sparse
    with pytest.raises(MoqaeError, match=r"huge.bin: is 67108865 bytes, more than the 67108864"):
        read_export(str(huge))
    text = tmp_path / "notes.txt"
    text.write_bytes(b"plain text" * 10)
    with pytest.raises(MoqaeError, match="magic is not MQAE"):
        read_export(str(text))


def test_lagrangian_allocation_is_the_brute_force_optimum_at_hull_budgets():
    """At a budget equal to the bits of some μ's allocation (a point of the lower convex hull), the
    bisection finds a plan as cheap as the best of all M^items plans within that budget; a tie goes to
    more bits, then to the lower index; a budget nothing meets gets the fewest bits (Swift's rule too)."""
    from moqae.evaluate.allocation import lagrangian_allocation
    generator = torch.Generator().manual_seed(0)
    bits = torch.tensor([32.0, 16.0, 8.0, 4.0]).expand(5, -1)
    for case in range(20):
        costs = torch.rand(5, 4, generator=generator, dtype=torch.float64) * torch.tensor([0.0, 1.0, 2.0, 4.0])
        mu = 10 ** (torch.rand(1, generator=generator).item() * 3 - 3)
        hull = (costs + mu * bits).argmin(-1)
        budget = bits.gather(-1, hull[:, None]).sum().item()
        choice = lagrangian_allocation(costs, bits, budget)
        chosen_bits, chosen_cost = bits.gather(-1, choice[:, None]).sum().item(), costs.gather(-1, choice[:, None]).sum().item()
        best = min(sum(costs[i, e].item() for i, e in enumerate(plan)) for plan in itertools.product(range(4), repeat=5)
                   if sum(bits[i, e].item() for i, e in enumerate(plan)) <= budget)
        assert chosen_bits <= budget and chosen_cost == pytest.approx(best, abs=1e-12), case
    tied = torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.7, 0.2]], dtype=torch.float64)
    assert lagrangian_allocation(tied, torch.tensor([[4.0, 8.0, 2.0], [8.0, 4.0, 8.0]]), 100).tolist() == [1, 0]
    assert lagrangian_allocation(tied, torch.tensor([[4.0, 8.0, 2.0], [8.0, 4.0, 8.0]]), 1).tolist() == [2, 1]


def test_lagrangian_allocation_takes_the_smallest_feasible_multiplier():
    """At any budget, the allocation of the smallest feasible μ, found exactly among the μ where some
    item's choice changes (so a bisection cut short, landing on a larger μ, fails; LagrangianTests.swift too)."""
    from moqae.evaluate.allocation import lagrangian_allocation
    generator = torch.Generator().manual_seed(11)
    bits = torch.tensor([32.0, 16.0, 8.0, 4.0], dtype=torch.float64).expand(12, -1)
    for case in range(20):
        costs = torch.rand(12, 4, generator=generator, dtype=torch.float64) * torch.tensor([0.0, 1.0, 2.0, 3.0])
        multipliers = [0.0] + [((costs[u, b] - costs[u, a]) / (bits[u, a] - bits[u, b])).item() * (1 + 1e-9)
                               for u in range(12) for a in range(4) for b in range(4)
                               if bits[u, a] > bits[u, b] and costs[u, b] > costs[u, a]]
        budget = 12 * (4 + torch.rand(1, generator=generator).item() * 28)
        exact = next(choice for choice in ((costs + mu * bits).argmin(-1) for mu in sorted(multipliers))
                     if bits.gather(-1, choice[:, None]).sum().item() <= budget)
        assert torch.equal(lagrangian_allocation(costs, bits, budget), exact), case


def test_chunk_ties_go_to_more_bits_then_to_the_lower_index():
    """Vote and pooled decisions with built ties (router.best_expert, the trainer's rule)."""
    from moqae.router import chunk_decisions, pooled_decisions
    experts = [parse_expert(name) for name in ("int2", "fp16", "int4", "k4v2", "k2v4")]
    one_hot = torch.eye(5)

    def chunk(*votes):                      # 4 tokens, each a one-hot probability row
        return torch.stack([one_hot[v] for v in votes])

    probabilities = torch.cat([chunk(0, 0, 2, 2), chunk(1, 1, 2, 2), chunk(3, 3, 4, 4), chunk(0, 2, 3, 4)])
    assert chunk_decisions(probabilities, experts, 4).tolist() == [2, 1, 3, 2]
    pooled = torch.tensor([[0.4, 0.1, 0.4, 0.05, 0.05], [0.1, 0.1, 0.1, 0.35, 0.35]])
    assert pooled_decisions(pooled, experts).tolist() == [2, 3]


def test_a_bits_price_is_written_as_version_3_and_read_back_in_binary32(tmp_path):
    export = random_export(3, 2, 16, pooling="mean", seed=1)
    write_export(str(tmp_path / "plain.bin"), export)
    assert open(tmp_path / "plain.bin", "rb").read()[4] == 2 and read_export(str(tmp_path / "plain.bin")).bits_price == 0
    priced = dataclasses.replace(export, bits_price=0.1)
    write_export(str(tmp_path / "priced.bin"), priced)
    data = open(tmp_path / "priced.bin", "rb").read()
    assert data[4] == 3 and len(data) == os.path.getsize(tmp_path / "plain.bin")
    read = read_export(str(tmp_path / "priced.bin"))
    assert read.bits_price == struct.unpack("<f", struct.pack("<f", 0.1))[0] and read.pooling == "mean"
    assert all(torch.equal(a, b) for ours, theirs in zip(read.weights, export.weights) for a, b in zip(ours, theirs))
    body = bytearray(data[:-4])
    for offset, value, reason in ((24, struct.pack("<f", math.inf), "non-finite bits price"),
                                  (28, b"\x01", "reserved header bits are not zero")):
        damaged = body.copy()
        damaged[offset: offset + len(value)] = value
        (tmp_path / "damaged.bin").write_bytes(resealed(damaged))
        with pytest.raises(MoqaeError, match=reason):
            read_export(str(tmp_path / "damaged.bin"))


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("price", [-0.4, 0.15, 0.9])
def test_decisions_under_a_bits_price_equal_a_float64_brute_force(pooling, price):
    """Token logits z − price · bits_j (bits: the mean of key and value bits), pooled as the export says,
    then the tie rule: computed here in float64 from the weights, one chunk at a time."""
    export = dataclasses.replace(random_export(2, 3, 8, pooling=pooling, seed=2, scale=0.5), bits_price=price)
    bits = torch.tensor([(e.key_bits + e.value_bits) / 2 for e in export.experts], dtype=torch.float64)
    total = [e.key_bits + e.value_bits for e in export.experts]
    inputs = torch.randn(3, 6 * 32, 8, generator=torch.Generator().manual_seed(3))
    checked = 0
    for router in range(export.num_routers):
        w1, w2, w3 = (w.double() for w in export.weights[router])
        decided = route_chunks(export, router, inputs)
        for head in range(3):
            for chunk in range(6):
                x = inputs[head, chunk * 32:(chunk + 1) * 32].double()
                log_p = torch.log_softmax((torch.nn.functional.silu(x @ w1) * (x @ w2)) @ w3 - price * bits, -1)
                if pooling == "vote":
                    score = torch.bincount(log_p.argmax(-1), minlength=3).double()
                else:
                    score = log_p.mean(0) if pooling == "mean" else log_p.amax(0)
                best = max(range(3), key=lambda j: (score[j].item(), total[j], -j))
                if pooling == "max" and (score[best] - score).sort().values[1] < 1e-5:
                    continue   # two experts' maxima saturate within float32's resolution of log p = 0: a tie there
                assert decided[head, chunk].item() == best, (router, head, chunk)
                checked += 1
    assert checked >= 24


def test_calibrate_bits_lands_the_router_on_its_target(tiny_llama, small_corpus, tmp_path):
    router, out = tmp_path / "router.bin", tmp_path / "calibrated.bin"
    write_export(str(router), random_export(3, 2, 16, pooling="mean", seed=4, scale=0.5))
    common = ["--model", tiny_llama, "--text", small_corpus, "--tokenizer", "bytes", "--seq-len", "256", "--max-windows", "6"]
    result = run_moqae("calibrate-bits", *common, "--router", str(router), "--out", str(out), "--target-bits", "5")
    assert result.returncode == 0, result.stderr
    assert "payload bits on 6 windows" in result.stdout and "calibrate-bits: price" in result.stderr
    calibrated = read_export(str(out))
    assert calibrated.bits_price != 0 and open(out, "rb").read()[4] == 3
    report = json.loads(run_moqae("eval", *common, "--router", str(out), "--no-baselines", "--json").stdout)
    bits = report["results"][0]["payload_bits"]
    assert 5 - 0.005 <= bits <= 5 and f"{bits:.4f} payload bits" in result.stdout
    refused = [run_moqae("calibrate-bits", *common, "--router", str(router), "--out", str(out), "--target-bits", "5"),
               run_moqae("calibrate-bits", *common, "--router", str(router), "--out", str(tmp_path / "new.bin"), "--target-bits", "1")]
    assert [r.returncode for r in refused] == [1, 1]
    assert refused[0].stderr.strip() == f"error: {out}: exists; calibrate-bits writes a new export and does not overwrite"
    assert "target 1.0 payload bits is out of reach" in refused[1].stderr and not (tmp_path / "new.bin").exists()
