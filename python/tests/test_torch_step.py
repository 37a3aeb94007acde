"""The benchmark's PyTorch step computes the same loss and gradients as the golden float64 reference."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from moqae.harness.torch_step import TorchTrainer

GOLDEN = Path(__file__).resolve().parents[2] / "Tests/MoQAETrainingTests/Golden"


def test_torch_step_matches_golden():
    golden = load_file(str(GOLDEN / "golden.safetensors"))
    trainer = TorchTrainer(str(GOLDEN / "store"), group_size=3, calibration_fraction=1.0)
    assert len(trainer.sequences) == 3
    with torch.no_grad():
        for r, weights in enumerate(trainer.weights):
            for name, w in zip(["w1", "w2", "w3"], weights):
                w.copy_(golden[f"init.router.{r}.{name}"].float())
    trainer.optimizer.zero_grad()
    total = 0.0
    for sequence in trainer.sequences:
        loss, _ = trainer.sequence_loss(sequence)
        (loss / 3).backward()
        total += float(loss.detach()) / 3
    assert abs(total - float(golden["paper.loss"])) <= 1e-5 * float(golden["paper.loss"])
    for r, weights in enumerate(trainer.weights):
        for name, w in zip(["w1", "w2", "w3"], weights):
            expected = golden[f"paper.grad.router.{r}.{name}"]
            assert (w.grad.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
