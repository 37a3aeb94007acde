"""`pareto`'s run list and its table (the training and scoring themselves run in CI's `make pareto`)."""
import argparse
import os

import pytest

from conftest import ROOT
from moqae_calib import CalibError
from moqae_calib.pareto import markdown, runs_of


def arguments(lambdas, config_runs=None):
    return argparse.Namespace(lambdas=lambdas, config=os.path.join(ROOT, "configs", "default.yaml"), config_run=config_runs)


def test_runs_are_the_lambdas_then_the_config_files():
    budget = os.path.join(ROOT, "configs", "budget-3.5.yaml")
    runs = runs_of(arguments("0.1,0.9", [budget]))
    assert [r.label for r in runs] == ["paper λ=0.1", "paper λ=0.9", "budget-3.5"]
    assert [r.directory for r in runs] == ["paper-lambda-0.1", "paper-lambda-0.9", "budget-3.5"]
    assert runs[0].overrides == ["loss.lambda=0.1"] and runs[2].config == budget and runs[2].overrides == []
    assert [r.label for r in runs_of(arguments("", [budget]))] == ["budget-3.5"]


def test_a_missing_config_file_is_named():
    with pytest.raises(CalibError, match="--config-run nowhere.yaml: no such config file"):
        runs_of(arguments("0.5", ["nowhere.yaml"]))


def summary(name, bits, bpb):
    return {"name": name, "payload_bits": bits, "bits_with_constants": bits + 0.5, "bits_per_byte": bpb,
            "perplexity": 2 ** bpb}


def test_table_gives_each_method_against_fp16_and_the_regret():
    shared = [summary("uniform fp16", 16, 2.0), summary("uniform int4", 4.75, 2.01)]
    row = {"label": "budget-3.5", "estimated_perplexity": 1.1, "estimated_fp16_perplexity": 1.0,
           "router": summary("router", 3.5, 2.05), "layer-wise": summary("layer-wise", 3.4, 2.08),
           "random": summary("random (router's mix)", 3.5, 2.1), "oracle": summary("oracle", 3.5, 2.02)}
    table = markdown([row], shared)
    assert "| router | budget-3.5 | 3.500 | 4.000 | 2.0500 | +2.50% |" in table
    assert "| uniform int4 |  | 4.750 | 5.250 | 2.0100 | +0.50% |" in table
    assert "| budget-3.5 | 3.500 | +0.0300 |" in table
    assert "+10.00% |" in table   # the router's estimate against its own fp16 estimate
