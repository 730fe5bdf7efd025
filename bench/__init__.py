"""Workloads, SLO classes, metrics and reports for benchmarking CacheOPT against baselines."""
