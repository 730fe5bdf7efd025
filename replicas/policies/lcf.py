"""vLLM with least-computed-first victims: preempt whoever loses the least work."""

from __future__ import annotations

from replicas.policies.base import Policy
from replicas.request import Request


class LcfPolicy(Policy):
    name = "lcf"

    def choose_victim(self, requester: Request) -> Request:
        return min(self.s.running, key=lambda r: r.num_computed_tokens)
