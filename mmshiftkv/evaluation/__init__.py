"""Evaluation of KV-cache compression on the paper's benchmarks (metrics, task definitions)."""
