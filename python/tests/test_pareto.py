"""`pareto`'s run list and its table (the training and scoring themselves run in CI's `make pareto`)."""
import os

import pytest

from conftest import ROOT
from moqae import MoqaeError
from moqae.evaluate.oracles import PRESCIENT_NOTE
import json

from moqae.harness.pareto import chosen_layer_plans, markdown, plot, runs_of


DEFAULT = os.path.join(ROOT, "configs", "default.yaml")


def test_runs_are_the_lambdas_then_the_config_files():
    budget = os.path.join(ROOT, "configs", "budget-3.5.yaml")
    runs = runs_of(DEFAULT, [0.1, 0.9], [budget])
    assert [r.label for r in runs] == ["paper λ=0.1", "paper λ=0.9", "budget-3.5"]
    assert [r.directory for r in runs] == ["paper-lambda-0.1", "paper-lambda-0.9", "budget-3.5"]
    assert runs[0].overrides == ["loss.lambda=0.1"] and runs[2].config == budget and runs[2].overrides == []
    assert [r.label for r in runs_of(DEFAULT, [], [budget])] == ["budget-3.5"]


def test_a_missing_config_file_is_named():
    with pytest.raises(MoqaeError, match="--config-run nowhere.yaml: no such config file"):
        runs_of(DEFAULT, [0.5], ["nowhere.yaml"])


def test_config_runs_take_overrides_after_a_colon():
    budget = os.path.join(ROOT, "configs", "budget-3.5.yaml")
    runs = runs_of(DEFAULT, [], [budget, f"{budget}:router.pooling=max,router.hidden_width=16"])
    assert [r.label for r in runs] == ["budget-3.5", "budget-3.5 (router.pooling=max, router.hidden_width=16)"]
    assert runs[1].overrides == ["router.pooling=max", "router.hidden_width=16"] and runs[1].config == budget
    assert runs[1].directory == "budget-3.5--router.pooling-max--router.hidden_width-16-"
    with pytest.raises(MoqaeError, match="overrides after the colon must be KEY=VALUE"):
        runs_of(DEFAULT, [], [f"{budget}:router.pooling"])


def summary(name, bits, bpb):
    return {"name": name, "payload_bits": bits, "bits_with_constants": bits + 0.5, "bits_per_byte": bpb,
            "perplexity": 2 ** bpb}


def test_table_leads_with_router_against_static_and_labels_the_prescient_row():
    shared = [summary("uniform fp16", 16, 2.0), summary("uniform int4", 4.75, 2.01)]
    difference = {"mean": -0.03, "ci95": [-0.05, -0.01], "percent_of_fp16": -1.5, "ci95_percent_of_fp16": [-2.5, -0.5],
                  "verdict": "router is better"}
    row = {"label": "budget-3.5", "estimated": {"fp16": 1.0, "router": 1.1, "static": 1.05},
           "estimated_router_vs_static": {"percent_of_fp16": 3.2}, "router_vs_static": difference,
           "router": summary("router", 3.5, 2.05), "static": summary("static", 3.5, 2.08),
           "layer-wise": summary("layer-wise", 3.4, 2.08), "random": summary("random (router's mix)", 3.5, 2.1),
           "prescient": dict(summary("prescient (gradients of the evaluated text)", 3.5, 2.02), note=PRESCIENT_NOTE)}
    table = markdown([row], shared)
    assert table.index("Router against static") < table.index("| method |")
    assert ("| budget-3.5 | 3.500 | 2.0500 | 2.0800 | -0.0300 | -0.0500 to -0.0100 | -1.50% (-2.50% to -0.50%) "
            "| router is better | +3.20% |") in table
    assert "| router | budget-3.5 | 3.500 | 4.000 | 2.0500 | +2.50% |" in table
    assert "| uniform int4 |  | 4.750 | 5.250 | 2.0100 | +0.50% |" in table
    assert "+10.00% |" in table and "+5.00% |" in table   # router's and static's estimates against their fp16 estimate
    assert "| prescient (gradients of the evaluated text) | budget-3.5 |" in table and PRESCIENT_NOTE in table
    assert "regret" not in table.lower() and "oracle" not in table.lower()


def test_pass_key_tables_show_the_router_evidence_of_content():
    def with_task(s, content=None):
        task = {"name": "passkey", "accuracy": 0.5, "wilson95": [0.4, 0.6]}
        return dict(s, task=dict(task, content_by_layer=content or []))
    content = [{"key_units": 40, "key_above_2_bits": 0.95, "other_units": 2000, "other_above_2_bits": 0.05, "keep_auc": 0.991},
               {"key_units": 40, "key_above_2_bits": None, "other_units": 0, "other_above_2_bits": None, "keep_auc": None}]
    shared = [with_task(summary("uniform fp16", 16, 2.0))]
    difference = {"mean": 0.0, "ci95": [-0.01, 0.01], "percent_of_fp16": 0.0, "ci95_percent_of_fp16": [-0.5, 0.5],
                  "verdict": "no clear difference"}
    row = {"label": "needle", "estimated": {"fp16": 1.0, "router": 1.1}, "estimated_router_vs_static": {"percent_of_fp16": 0.0},
           "router_vs_static": difference, "router": with_task(summary("router", 2.4, 2.05), content),
           "static": with_task(summary("static", 2.4, 2.06))}
    table = markdown([row], shared)
    assert "| needle | 0 | 95.0% of 40 | 5.0% of 2000 | 0.991 |" in table
    assert "| needle | 1 | - of 40 | - of 0 | - |" in table


def test_the_layer_plans_scored_are_the_search_frontier_and_a_damaged_search_is_named(tmp_path):
    def plan(names, bits, correct, bpb):
        return {"plan": names.split(","), "payload_bits": bits, "correct": correct, "bits_per_byte": bpb}
    rows = [plan("int2,int2", 2.2, 10, 2.1), plan("int4,int2", 2.7, 30, 2.0), plan("int2,int4", 2.7, 20, 2.0),
            plan("int4,int4", 3.2, 30, 2.05)]
    search = tmp_path / "layer-plans.json"
    search.write_text(json.dumps({"text": "models/wikitext-2/valid.txt", "rows": rows}))
    assert chosen_layer_plans(str(search)) == ([["int2", "int2"], ["int4", "int2"]], "models/wikitext-2/valid.txt")
    search.write_text(json.dumps({"rows": rows}))
    with pytest.raises(MoqaeError, match=f"--layer-plans {search}: not a layer-plans.json"):
        chosen_layer_plans(str(search))
    with pytest.raises(MoqaeError, match="--layer-plans nowhere.json: not a layer-plans.json"):
        chosen_layer_plans("nowhere.json")


def test_frontier_plans_are_listed_with_the_text_they_were_chosen_on(tmp_path):
    shared = [summary("uniform fp16", 16, 2.0),
              dict(summary("layer plan (int4, int2)", 2.7, 2.01), chosen_on="models/wikitext-2/valid.txt")]
    difference = {"mean": 0.0, "ci95": [-0.01, 0.01], "percent_of_fp16": 0.0, "ci95_percent_of_fp16": [-0.5, 0.5],
                  "verdict": "no clear difference"}
    row = {"label": "needle", "estimated": {"fp16": 1.0, "router": 1.1}, "estimated_router_vs_static": {"percent_of_fp16": 0.0},
           "router_vs_static": difference, "router": summary("router", 2.4, 2.05), "static": summary("static", 2.4, 2.06)}
    assert "| layer plan (int4, int2) | frontier, chosen on valid.txt | 2.700 |" in markdown([row], shared)
    plot([row], shared, str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_lambdas_are_read_as_numbers_on_the_command_line():
    from moqae.__main__ import parser
    required = ["pareto", "--moqae-train", "BIN", "--store", "STORE", "--model", "DIR", "--text", "FILE", "--out", "OUT"]
    assert parser().parse_args(required).lambdas == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert parser().parse_args([*required, "--lambdas="]).lambdas == []
    assert parser().parse_args([*required, "--lambdas", "0.2,0.8"]).lambdas == [0.2, 0.8]
    with pytest.raises(SystemExit):
        parser().parse_args([*required, "--lambdas", "0.2,high"])
