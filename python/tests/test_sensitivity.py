"""Exact delta_nll: the resumed path against full forwards; Taylor and Fisher against exact on the reference model."""
import torch

from conftest import REFERENCE_MODEL, VALID_TXT
from moqae.corpus import ByteTokenizer, read_texts, windows
from moqae.model import load_model
from moqae.experts import parse_experts
import pytest

from moqae.calibrate.sensitivity import (exact_delta, exact_delta_full, forward_with_kv_gradients, resumable_decoder, taylor_delta,
                                     weighted_taylor_delta)


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm())).item()


def test_taylor_and_fisher_rank_units_like_exact():
    model = load_model(REFERENCE_MODEL, "cpu", None, "float32")
    corpus = windows(read_texts([VALID_TXT]), ByteTokenizer(), 512)
    experts = parse_experts("fp16,int4,int2")
    report = []
    for seq_id in (10, 20, 30):
        ids = corpus[seq_id]
        nll, keys, values, grad_keys, grad_values = forward_with_kv_gradients(model, ids, REFERENCE_MODEL)
        taylor = taylor_delta(keys, values, grad_keys, grad_values, experts, 32, 64, 511)
        fisher = taylor_delta(keys, values, grad_keys, grad_values, experts, 32, 64, 511, rule="fisher")
        base, exact_keys, exact_values, exact = exact_delta(model, ids, experts, 32, 64, REFERENCE_MODEL)
        assert abs(base - nll) < 1e-5
        assert torch.equal(exact_keys[0], keys[0]) and torch.equal(exact_values[-1], values[-1])
        assert (taylor[..., 0] == 0).all() and (exact[..., 0] == 0).all()
        quantized = slice(1, None)
        row = {"sequence": seq_id,
               "taylor": spearman(taylor[..., quantized].flatten(), exact[..., quantized].flatten()),
               "fisher": spearman(fisher[..., quantized].flatten(), exact[..., quantized].flatten())}
        for m in (1, 2):
            row[f"taylor {experts[m].name}"] = spearman(taylor[..., m].flatten(), exact[..., m].flatten())
            row[f"fisher {experts[m].name}"] = spearman(fisher[..., m].flatten(), exact[..., m].flatten())
        report.append(row)
    for row in report:
        print("Spearman vs exact over units:", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    assert all(row["taylor"] >= 0.5 for row in report)
    assert all(row[f"taylor {name}"] >= 0.5 for row in report for name in ("int4", "int2"))


def check_resumed_equals_full(model, model_dir, ids, experts, chunk, value_group):
    assert resumable_decoder(model, ids.numel()) is not None
    base, keys, values, resumed = exact_delta(model, ids, experts, chunk, value_group, model_dir)
    full_base, full_keys, full_values, full = exact_delta_full(model, ids, experts, chunk, value_group, model_dir)
    largest = full.abs().max().item()
    assert largest > 0
    assert (resumed - full).abs().max().item() <= 1e-5 * largest
    assert abs(base - full_base) <= 1e-7
    assert all(torch.equal(a, b) for a, b in zip(keys + values, full_keys + full_values))


def test_exact_resumed_equals_full_forwards_on_the_reference_model():
    model = load_model(REFERENCE_MODEL, "cpu", None, "float32")
    ids = windows(read_texts([VALID_TXT]), ByteTokenizer(), 512)[7][:160]   # 5 chunks: quick enough for every run
    check_resumed_equals_full(model, REFERENCE_MODEL, ids, parse_experts("fp16,int4,int2,k4v2"), 32, 64)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_exact_resumed_equals_full_forwards_on_tiny_models(family, request):
    model_dir = request.getfixturevalue(family)
    model = load_model(model_dir, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1))
    check_resumed_equals_full(model, model_dir, ids, parse_experts("fp16,int2"), 16, 8)


def test_exact_falls_back_to_full_forwards_where_a_sliding_window_cuts_the_sequence(tiny_qwen2):
    model = load_model(tiny_qwen2, "cpu", None, "float32")
    model.config.use_sliding_window, model.config.sliding_window = True, 64
    assert resumable_decoder(model, 64) is not None
    assert resumable_decoder(model, 96) is None


def test_weighted_exact_resumed_equals_full_forwards(tiny_llama):
    model = load_model(tiny_llama, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(2))
    weights = torch.ones(95, dtype=torch.float64)
    weights[80:85] = 30.0   # an answer of 5 tokens weighing 30 each
    experts = parse_experts("fp16,int2")
    base, _, _, resumed = exact_delta(model, ids, experts, 16, 8, tiny_llama, weights)
    full_base, _, _, full = exact_delta_full(model, ids, experts, 16, 8, tiny_llama, weights)
    assert (resumed - full).abs().max().item() <= 1e-5 * full.abs().max().item()
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].double()
    token = -torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).squeeze(-1)
    assert abs(base - (token * weights).sum().item() / weights.sum().item()) < 1e-6
    assert abs(full_base - base) < 1e-7
    _, _, _, plain = exact_delta(model, ids, experts, 16, 8, tiny_llama)
    assert not torch.allclose(plain, resumed)


def test_weighted_taylor_is_linear_in_the_weights(tiny_llama):
    """All-one weights give the plain Taylor deltas; the weighted deltas are the weight classes' own
    Taylor deltas (each from its tokens' gradient alone), weighted; and scaling every weight leaves the
    loss and the deltas unchanged."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(3))
    experts = parse_experts("fp16,int4,int2")
    nll, keys, values, gk, gv = forward_with_kv_gradients(model, ids, tiny_llama)
    plain = taylor_delta(keys, values, gk, gv, experts, 16, 8, 95)
    ones_nll, _, _, ones = weighted_taylor_delta(model, ids, experts, 16, 8, tiny_llama, torch.ones(95, dtype=torch.float64))
    assert abs(nll - ones_nll) < 1e-6 and torch.allclose(plain, ones, rtol=1e-5, atol=1e-9)
    answer = torch.zeros(95, dtype=torch.float64)
    answer[80:85] = 1
    weights = 1 + 29 * answer                                    # 5 answer tokens of weight 30
    classes = []
    for mask in (1 - answer, answer):
        _, keys, values, gk, gv = forward_with_kv_gradients(model, ids, tiny_llama, mask)
        classes.append(taylor_delta(keys, values, gk, gv, experts, 16, 8, 1.0).double())
    expected = (classes[0] + 30 * classes[1]) / weights.sum()
    loss, _, _, weighted = weighted_taylor_delta(model, ids, experts, 16, 8, tiny_llama, weights)
    assert torch.allclose(weighted.double(), expected, rtol=1e-5, atol=1e-9)
    loss2, _, _, weighted2 = weighted_taylor_delta(model, ids, experts, 16, 8, tiny_llama, 3 * weights)
    assert abs(loss - loss2) < 1e-6 and torch.allclose(weighted, weighted2, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(plain, weighted, rtol=1e-3, atol=0)
