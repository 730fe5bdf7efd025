"""The per-replica CacheOPT KV manager and scheduler (pure Python), its baselines, and the
simulated engine."""
