"""Evaluate: real perplexity and task accuracy of a model whose KV cache follows a plan (the router's, or
a baseline's at the same memory): plans, allocations, oracles, scoring, reports, and the `eval` command."""
