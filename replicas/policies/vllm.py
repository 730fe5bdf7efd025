"""vLLM V1's own scheduler (every hook at its default, policies/base.py), and the same with
a 2,048-token step budget: Sarathi-Serve's cheap answer to decode stalls behind large
prefill chunks, which an operator gets from vLLM alone (`--max-num-batched-tokens 2048`)."""

from replicas.policies.base import Policy

SARATHI_BUDGET_TOKENS = 2048


class VllmPolicy(Policy):
    name = "vllm"


class Vllm2048Policy(VllmPolicy):
    name = "vllm-2048"

    def step_token_budget(self) -> int:
        return min(SARATHI_BUDGET_TOKENS, self.s.config.max_num_batched_tokens)
