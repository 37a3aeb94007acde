"""Reports made of sections owned by different commands, and what the benchmarks behind them select."""
import os

from conftest import VALID_TXT
from moqae.harness.length_benchmark import fraction_for
from moqae.harness.report import write_section
from moqae.selection import selected


def test_a_section_is_replaced_or_extended_and_the_others_are_kept(tmp_path):
    path = str(tmp_path / "PERFORMANCE.md")
    write_section(path, "Performance", "Training", "first run\n")
    write_section(path, "Performance", "Exact sensitivities", "| a | b |\n")
    write_section(path, "Performance", "Training", "second run\n")
    write_section(path, "Performance", "Training", "larger store\n", append=True)
    assert open(path).read() == ("# Performance\n\n## Training\n\nsecond run\n\nlarger store\n\n"
                                 "## Exact sensitivities\n\n| a | b |\n")


def test_the_length_benchmark_selects_exactly_the_windows_it_times():
    total = os.path.getsize(VALID_TXT) // 2048
    for count in (1, 4, total):
        fraction = fraction_for(count, VALID_TXT, 2048)
        assert sum(selected(i, 0, fraction) for i in range(total)) == count
