"""Pass-key windows, their scoring and the accuracy the evaluator reports."""
import json
import math

import pytest
import torch

from conftest import VALID_TXT
from moqae.corpus import ByteTokenizer, read_texts, windows
from moqae.calibrate.dump import with_needles
from moqae.model import load_model
from moqae.evaluate.oracles import source_aware_plan
from moqae.capture import RouterInputs
from moqae.evaluate.plans import Layout, RouterPlan, UniformPlan
from moqae.evaluate.scoring import auc, evaluate_plan
from moqae.router import random_export
from moqae.experts import parse_expert
from moqae import MoqaeError
from moqae.tasks import answer_correct, passkey_windows, task_windows, wilson_interval

HAYSTACK = read_texts([VALID_TXT])[0][:50_000]


def test_windows_hold_the_needle_at_spread_depths_and_end_with_the_key():
    task = passkey_windows(HAYSTACK, ByteTokenizer(), 256, 10, seed=3)
    assert task.ids.shape == (10, 256) and task.answer_positions.shape == (10, 5)
    for row, key in enumerate(task.keys):
        text = bytes(task.ids[row].tolist())   # byte offsets are token positions
        assert text.endswith(f" What is the pass key? The pass key is {key}.".encode())
        start, end = task.key_spans[row].tolist()
        assert text[start - 17: end + 15] == f" The pass key is {key}. Remember it. ".encode()
        assert text[start:end] == key.encode()
        assert bytes(task.ids[row, task.answer_positions[row]].tolist()).decode() == key
        assert math.isclose(task.depths[row].item(), (start - 17) / (256 - 37 - 39 - 5 - 1))
    assert torch.allclose(task.depths, torch.linspace(0.05, 0.95, 10, dtype=torch.float64), atol=0.01)
    again = passkey_windows(HAYSTACK, ByteTokenizer(), 256, 10, seed=3)
    assert torch.equal(again.ids, task.ids) and not torch.equal(passkey_windows(HAYSTACK, ByteTokenizer(), 256, 10, 4).ids, task.ids)


def test_an_answer_is_correct_only_when_every_digit_is_predicted():
    task = passkey_windows(HAYSTACK, ByteTokenizer(), 128, 3, seed=0)
    logits = torch.zeros(3, 128, 256)
    for row in range(3):   # predict the true next byte everywhere, then spoil one digit of window 1
        logits[row, torch.arange(127), task.ids[row, 1:]] = 1.0
    digit = task.answer_positions[1][2]
    logits[1, digit - 1] = 0
    logits[1, digit - 1, (task.ids[1, digit] + 1) % 256] = 1.0
    assert answer_correct(logits, task.ids, task.answer_positions).tolist() == [True, False, True]


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(9, 10)
    assert math.isclose(low, 0.5958, abs_tol=1e-4) and math.isclose(high, 0.9821, abs_tol=1e-4)
    assert wilson_interval(0, 20)[0] == 0 and wilson_interval(20, 20)[1] == 1


def test_a_store_corpus_gets_needles_in_the_chosen_windows():
    corpus = windows([HAYSTACK], ByteTokenizer(), 512)
    mixed, weights, answer_slots = with_needles(corpus, HAYSTACK, ByteTokenizer(), 0.5, seed=1, answer_weight=40)
    needled = [row for row in range(len(corpus)) if not torch.equal(mixed[row], corpus[row])]
    assert 0.3 * len(corpus) < len(needled) < 0.7 * len(corpus)
    assert all(b" The pass key is " in bytes(mixed[row].tolist()) for row in needled)
    # The 5 answer digits weigh 40 each: the weight of predicting token i + 1 sits at i.
    for row in range(len(corpus)):
        heavy = (weights[row] == 40).nonzero().flatten() + 1
        expected = list(range(506, 511)) if row in needled else []
        assert heavy.tolist() == expected and (weights[row][weights[row] != 40] == 1).all()
        if row in needled:
            assert bytes(mixed[row, heavy].tolist()).isdigit()
            assert (answer_slots[row] + 1).tolist() == expected
    assert sorted(answer_slots) == needled


def test_the_evaluator_scores_answers_and_the_bits_that_held_the_key(tiny_llama):
    model = load_model(tiny_llama, "cpu", None, "float32")
    task = passkey_windows(HAYSTACK, ByteTokenizer(), 128, 6, seed=0)
    layout = Layout(128, 32, 1, 3, 2, 16, 16)
    for expert, bits in (("fp16", 16), ("int2", 2)):
        result = evaluate_plan(model, task.ids, UniformPlan(parse_expert(expert)), layout, 4, tiny_llama, False, task)
        with torch.no_grad():
            expected = answer_correct(model(task.ids).logits, task.ids, task.answer_positions) if expert == "fp16" else None
        if expected is not None:
            assert result.correct == expected.tolist()
        # A key inside chunk 0 stays at 16 bits (frozen); elsewhere it is held at the plan's bits.
        in_first_chunk = task.key_spans[:, 1] <= 32
        assert result.key_bits.tolist() == [16.0 if first else bits for first in in_first_chunk.tolist()]
        summary = result.summary(1)["task"]
        assert summary["windows"] == 6 and sum(g["windows"] for g in summary["by_depth_decile"]) == 6
        assert summary["key_at_2_bits_or_fewer"]["windows"] == (0 if bits == 16 else int((~in_first_chunk).sum()))


def test_records_are_cut_to_the_window_and_their_answer_is_located(tmp_path):
    path = tmp_path / "task.jsonl"
    filler = "x" * 200
    path.write_text(json.dumps({"context": filler + " the code is 4711. " + "y" * 50, "question": " Code?", "answer": " 4711"})
                    + "\n\n" + json.dumps({"context": filler, "question": " Q?", "answer": " none"}) + "\n")
    task = task_windows(str(path), None, ByteTokenizer(), 128, None, 0)
    assert task.ids.shape == (2, 128) and task.name == "task.jsonl"
    first = bytes(task.ids[0].tolist())
    assert first.endswith(b" Code? 4711") and bytes(task.ids[0, task.answer_positions[0]].tolist()) == b" 4711"
    assert first[slice(*task.key_spans[0].tolist())] == b" 4711" and 0 < task.depths[0] < 1
    assert task.key_spans[1].tolist() == [-1, -1] and math.isnan(task.depths[1])
    for bad, reason in (('{"context": "a"}', "expected an object"), ("{", "not valid JSON"),
                        (json.dumps({"context": "short", "question": "?", "answer": "a"}), "needed to fill --seq-len 128")):
        path.write_text(bad + "\n")
        with pytest.raises(MoqaeError, match=f"{path}:1: .*{reason}"):
            task_windows(str(path), None, ByteTokenizer(), 128, None, 0)


def test_the_source_aware_plan_keeps_the_key_and_question_chunks_high():
    task = passkey_windows(HAYSTACK, ByteTokenizer(), 256, 4, seed=0)
    layout = Layout(256, 32, 1, 2, 2, 16, 16)
    plan = source_aware_plan(task, layout)
    assert [e.name for e in plan.experts] == ["int4", "int2"] and "not a target" in plan.note
    for window in range(4):
        first, end = task.key_spans[window].tolist()
        high = {c - 1 for c in range(first // 32, (end - 1) // 32 + 1) if c >= 1} | {6, 5}   # routed chunks 1..7
        decisions = plan.decisions[window]
        assert decisions.shape == (2, 2, 7)
        for routed in range(7):
            assert (decisions[..., routed] == (0 if routed in high else 1)).all(), (window, routed)


def test_reports_show_per_layer_how_key_and_other_units_are_kept(tiny_llama):
    """The source-aware plan keeps every key unit and only the question's above 2 bits; the AUC is a
    brute-force count of ordered pairs."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    task = passkey_windows(HAYSTACK, ByteTokenizer(), 256, 4, seed=0)
    layout = Layout(256, 32, 1, 3, 2, 16, 16)
    result = evaluate_plan(model, task.ids, source_aware_plan(task, layout), layout, 4, tiny_llama, False, task)
    key_units = sum(2 * len({c for c in range(a // 32, (b - 1) // 32 + 1) if c >= 1}) for a, b in task.key_spans.tolist())
    for layer in result.summary(1)["task"]["content_by_layer"]:
        assert layer["key_units"] == key_units and layer["key_above_2_bits"] == 1.0
        assert layer["other_units"] == 4 * 2 * 7 - key_units
        assert layer["other_above_2_bits"] == (4 * 2 * 2) / layer["other_units"]   # the two question chunks
        assert layer["keep_auc"] is None                                           # a plan without scores
    positive, negative = [0.9, 0.5, 0.5], [0.1, 0.5, 0.7, 0.2]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative)
    assert math.isclose(auc(positive, negative), pairs / 12)
    export = random_export(3, 2, 16, pooling="max", seed=3)
    routed = evaluate_plan(model, task.ids, RouterPlan(export, RouterInputs("key", model, tiny_llama, 32, 16)), layout, 4,
                           tiny_llama, False, task)
    for layer in routed.summary(1)["task"]["content_by_layer"]:
        assert 0 <= layer["keep_auc"] <= 1


def test_the_layer_plan_frontier_keeps_exactly_the_plans_nothing_beats():
    from moqae.harness.layer_plan_search import frontier
    generator = torch.Generator().manual_seed(8)
    rows = [{"plan": [str(i)], "payload_bits": float(b), "correct": int(c), "bits_per_byte": float(p)}
            for i, (b, c, p) in enumerate(zip(torch.randint(2, 6, (40,), generator=generator).tolist(),
                                              torch.randint(0, 10, (40,), generator=generator).tolist(),
                                              torch.rand(40, generator=generator).tolist()))]
    kept = frontier(rows)
    for row in rows:
        beaten = any(o["payload_bits"] <= row["payload_bits"] and
                     (o["correct"], -o["bits_per_byte"]) > (row["correct"], -row["bits_per_byte"]) for o in rows)
        assert (row in kept) == (not beaten)
    assert [r["payload_bits"] for r in kept] == sorted(r["payload_bits"] for r in kept)
