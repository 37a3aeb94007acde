"""`plot`: a run directory's logs as a PNG, and bad logs refused with one line."""
import json

from conftest import run_moqae


def write_log(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_a_run_directory_becomes_one_picture(tmp_path):
    write_log(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1 / s, "avg_bits": 4 - s / 10, "lambda": 0.5,
                                           "vectors_per_second": 1e6 + s, "step_seconds": 0.01} for s in range(1, 21)])
    write_log(tmp_path / "eval.jsonl", [{"step": 10, "router": {"payload_bits": 3.0}}, {"step": 20, "router": {"payload_bits": 2.5}}])
    result = run_moqae("plot", str(tmp_path))
    assert result.returncode == 0, result.stderr
    image = (tmp_path / "run.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 10_000
    assert int.from_bytes(image[16:20], "big") == 1100 and int.from_bytes(image[20:24], "big") == 700   # 11 × 7 in at 100 dpi
    assert not list(tmp_path.glob("*.tmp-*"))


def test_bad_logs_are_refused_with_one_line(tmp_path):
    missing = run_moqae("plot", str(tmp_path))
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path}/metrics.jsonl: cannot read (No such file or directory)"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "avg_bits": 3, "lambda": 0.5, "vectors_per_second": 1}\n{"step": 2, "loss": nan\n')
    broken = run_moqae("plot", str(tmp_path))
    assert broken.returncode == 1 and broken.stderr.strip().startswith(f"error: {tmp_path}/metrics.jsonl:2: not valid JSON")
    assert not (tmp_path / "run.png").exists()
