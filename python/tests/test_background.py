"""Sensitivities around a background plan: the resumed exact answer part against brute-force full
forwards, Taylor's zero at each unit's background expert and its first order against finite steps."""
import pytest
import torch

from moqae import MoqaeError
from moqae.calibrate.background import (AT_RISK_NATS, Background, background_delta, background_forward,
                                        background_taylor_delta, exact_answer_delta)
from moqae.calibrate.sensitivity import token_nll
from moqae.capture import KVHook
from moqae.experts import parse_experts
from moqae.model import load_model

EXPERTS = parse_experts("fp16,int4,int2")
CHUNK, GROUP = 16, 8


def brute_force_answer_delta(model, ids, background, slots):
    """(L, C, M): one full forward per (layer, chunk, expert), every head of the chunk at the expert."""
    L, T = model.config.num_hidden_layers, ids.numel()
    C = T // CHUNK

    def answer_nll(raised=None):
        def transform(layer, key, value):
            k, v = background.attended(layer, key, value)
            if raised and raised[0] == layer:
                span = slice(raised[1] * CHUNK, (raised[1] + 1) * CHUNK)
                k[:, :, span] = background.quantized(key[:, :, span], raised[2], True)
                v[:, :, span] = background.quantized(value[:, :, span], raised[2], False)
            return k, v
        with torch.no_grad(), KVHook(transform=transform).active():
            logits = model(ids[None]).logits[0]
        return token_nll(logits[slots], ids[slots + 1]).double().sum()

    base = answer_nll()
    delta = torch.zeros(L, C, len(EXPERTS), dtype=torch.float64)
    for layer in range(L):
        for c in range(background.frozen, C):
            for m in range(len(EXPERTS)):
                if m != background.per_layer[layer]:
                    delta[layer, c, m] = answer_nll((layer, c, m)) - base
    return delta


def test_exact_answer_delta_equals_full_forwards(tiny_llama):
    model = load_model(tiny_llama, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([88, 89, 90])
    background = Background("int4,int2,int2", EXPERTS, 3, CHUNK, GROUP)
    resumed = exact_answer_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background, slots)
    full = brute_force_answer_delta(model, ids, background, slots)
    assert full.abs().max() > 1e-3
    assert (resumed - full).abs().max() <= 5e-6   # float32 rounding of answer NLLs of a few nats
    assert (resumed[0, :, 1] == 0).all() and (resumed[1:, :, 2] == 0).all() and (resumed[:, 0] == 0).all()


def test_taylor_around_the_background_is_zero_at_the_background_and_first_order_in_small_steps(tiny_llama):
    model = load_model(tiny_llama, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(5))
    background = Background("int2", EXPERTS, 3, CHUNK, GROUP)
    loss, keys, values, delta = background_taylor_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background)
    nll = background_forward(model, ids, tiny_llama, background)[0]
    assert abs(loss - nll.mean().item()) < 1e-6
    assert (delta[:, :, 1:, 2] == 0).all() and (delta[:, :, 0, 0] == 0).all()
    assert (delta[:, :, 1:, 0] != 0).any()
    # The gradient it expands with, against the derivative of the loss along a move of the last layer's
    # attended keys towards int4, taken through a scalar step instead of the straight-through tensors.
    token_nlls, _, _, seen_keys, _ = background_forward(model, ids, tiny_llama, background, with_graph=True)
    gradient = torch.autograd.grad(token_nlls.sum(), seen_keys[2])[0]
    direction = background.quantized(keys[2][None], 1, True) - seen_keys[2].detach()
    step = torch.zeros((), requires_grad=True)

    def moved(layer, key, value):
        k, v = background.attended(layer, key, value)
        return (k + step * direction, v) if layer == 2 else (k, v)
    with KVHook(transform=moved).active():
        logits = model(ids[None]).logits[0, :-1]
    along = torch.autograd.grad(token_nll(logits, ids[1:]).sum(), step)[0]
    assert abs(along) > 0 and abs(along - (gradient * direction).sum()) <= 1e-4 * abs(along)


def test_background_delta_is_exact_on_answers_at_risk_only(tiny_llama):
    model = load_model(tiny_llama, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(6))
    slots = torch.tensor([88, 89, 90])
    weights = torch.ones(95, dtype=torch.float64)
    weights[slots] = 50.0
    background = Background("int2", EXPERTS, 3, CHUNK, GROUP)
    loss, _, _, delta, exact = background_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background, weights,
                                                slots)
    assert exact   # a random model's answers are far from certain
    plain = torch.where(weights == 1, weights, torch.zeros_like(weights))
    answer_part = exact_answer_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background, slots)
    _, _, _, taylor_plain = background_taylor_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background, plain)
    expected = (taylor_plain.double() * plain.sum() + 50.0 * answer_part[:, None].expand(-1, 2, -1, -1) / 2) / weights.sum()
    assert torch.allclose(delta[:, :, 1:].double(), expected[:, :, 1:], rtol=1e-4, atol=1e-8)
    with pytest.raises(MoqaeError, match="share one weight"):
        background_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background, weights, torch.tensor([88, 91]))


def test_an_answer_the_background_already_gets_right_costs_no_extra_forwards(tiny_llama, monkeypatch):
    import moqae.calibrate.background as module
    model = load_model(tiny_llama, "cpu", None, "float32")
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(7))
    background = Background("int2", EXPERTS, 3, CHUNK, GROUP)
    monkeypatch.setattr(module, "AT_RISK_NATS", 1e9)
    assert exact_answer_delta(model, ids, EXPERTS, CHUNK, GROUP, tiny_llama, background, torch.tensor([88])) is None
    assert AT_RISK_NATS < 1


def test_a_background_names_the_store_experts_once_per_layer():
    with pytest.raises(MoqaeError, match="2 experts for 3 layers"):
        Background("int4,int2", EXPERTS, 3, CHUNK, GROUP)
    with pytest.raises(MoqaeError, match="not one of the store's"):
        Background("int8", EXPERTS, 3, CHUNK, GROUP)
    assert Background("int2", EXPERTS, 3, CHUNK, GROUP).manifest_field == {"experts": ["int2"] * 3, "frozen_chunks": 1}
