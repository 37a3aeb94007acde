"""Taylor and Fisher delta_nll against exact delta_nll on the reference model."""
import torch

from conftest import REFERENCE_MODEL, VALID_TXT
from moqae_calib.corpus import ByteTokenizer, read_texts, windows
from moqae_calib.dump import load_model
from moqae_calib.experts import parse_experts
from moqae_calib.sensitivity import exact_delta, forward_with_kv_gradients, taylor_delta


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
        taylor = taylor_delta(keys, values, grad_keys, grad_values, experts, 32, 64, 512)
        fisher = taylor_delta(keys, values, grad_keys, grad_values, experts, 32, 64, 512, rule="fisher")
        base, exact_keys, exact_values, exact = exact_delta(model, ids, experts, 32, 64, REFERENCE_MODEL, batch_size=32)
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
