"""Reports made of sections owned by different commands."""
from moqae_calib.report import write_section


def test_a_section_is_replaced_or_extended_and_the_others_are_kept(tmp_path):
    path = str(tmp_path / "PERFORMANCE.md")
    write_section(path, "Performance", "Training", "first run\n")
    write_section(path, "Performance", "Exact sensitivities", "| a | b |\n")
    write_section(path, "Performance", "Training", "second run\n")
    write_section(path, "Performance", "Training", "larger store\n", append=True)
    assert open(path).read() == ("# Performance\n\n## Training\n\nsecond run\n\nlarger store\n\n"
                                 "## Exact sensitivities\n\n| a | b |\n")
