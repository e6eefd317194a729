"""Benchmarks of the D2LLM claims: ranking cost, labelling and training throughput, quality.

Each module runs as ``python -m benchmarks.<name>`` from the project root, prints a table,
and writes ``reports/benchmarks/<name>.json`` (plus a PNG where a picture reads better).
See docs/benchmarks.md.
"""
