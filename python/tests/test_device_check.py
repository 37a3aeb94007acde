"""The prepared GPU check (`device-check`), as a smoke test at the tiny shape on the CPU: both steps run through
the real dump and evaluator, and the report's section is written."""
from conftest import VALID_TXT
from moqae.harness.device_check import device_check


def test_device_check_runs_at_the_tiny_shape_on_the_cpu(tmp_path):
    report = tmp_path / "PERFORMANCE.md"
    rows = device_check(VALID_TXT, shape="tiny", windows=2, seq_len=256, device="cpu", out=str(report))
    assert [row["step"] for row in rows] == ["dump (Taylor)", "eval (router plan)"]
    assert all(row["seconds"] > 0 and row["peak_gib"] is None for row in rows)
    text = report.read_text()
    assert "## On a GPU\n" in text and "A random tiny Llama" in text and "| dump (Taylor) |" in text
