"""Harnesses: studies and benchmarks built on the other parts and on moqae-train (pareto, benchmark,
soak, length-, sensitivity- and serve-benchmark, plot) and their Markdown reports."""
