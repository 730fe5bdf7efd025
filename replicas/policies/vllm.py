"""vLLM V1's own scheduler: every hook at its default (see policies/base.py)."""

from replicas.policies.base import Policy


class VllmPolicy(Policy):
    name = "vllm"
