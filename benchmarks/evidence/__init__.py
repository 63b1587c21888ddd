"""The evidence report (benchmarks/report.py), split by concern: presets, harness, experiments, plots, markdown."""
