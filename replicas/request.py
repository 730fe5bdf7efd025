"""A request as the replica policy sees it: progress counters, prediction, SLO.

A request is `num_computed_tokens` chasing `num_tokens` (prompt plus generated so far).
Prefill, chunked prefill and the re-prefill after a recompute preemption are all the same
thing: schedule `num_tokens - num_computed_tokens`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Slo:
    """A latency objective: time to first token and time between tokens, in seconds."""

    name: str
    ttft_s: float
    tbt_s: float


class Status(enum.Enum):
    WAITING = "waiting"  # never admitted
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after recompute (blocks freed) or swap (blocks on host)
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    slo: Slo
    # Known to the simulator only. Policies never read it; the oracle predictor does.
    true_output_tokens: int | None = None
    prompt_text: str | None = None  # for text-based predictors; None for token-count traces
    # (point, bound) predicted upstream and sent with the request (engine_settings.ForwardedPredictor).
    forwarded_prediction: tuple[int, int] | None = None
    # Simulator only: prefix-cache keys of the prompt's shareable blocks (replicas/kv_blocks.py).
    prefix_keys: tuple | None = None

    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    # Prefix caching: blocks of its table charged to other holders (replicas/kv_blocks.py).
    num_shared_blocks: int = 0
    # Asynchronous steps (ReplicaScheduler.async_steps): tokens being sampled by steps in
    # flight, already counted as computed, as vLLM's AsyncScheduler counts them.
    num_output_placeholders: int = 0
    # The engine's own output limit where it differs from the planning cap `max_tokens`
    # (the adapter: vLLM's max_tokens); async steps never schedule past it.
    stop_after_tokens: int | None = None

    # Prediction, refreshed by the policy: point estimate and padded bound U_p (tokens).
    predicted_output_tokens: int = 0
    bound_output_tokens: int = 0
    bound_at_admission_tokens: int = 0

    status: Status = Status.WAITING
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    shed_s: float | None = None  # when the policy gave up on it before its first token (an error, not an answer)
    token_gaps_s: list[float] = field(default_factory=list)

    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    num_swaps: int = 0
    # Blocks parked in host memory while swapped out (0 when not swapped).
    swapped_blocks: int = 0
    # Step index of the last resume, for anti-thrash protection.
    resumed_step: int = -1_000_000

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.request_id}: prompt_tokens={self.prompt_tokens} < 1")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_tokens={self.max_tokens} < 1")

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output_tokens
