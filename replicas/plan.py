"""What one engine step does, and the block arithmetic every policy shares.

Its own module so that the scheduler and the policies both import it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replicas.request import Request

RECOMPUTE = "recompute"
SWAP = "swap"


@dataclass(slots=True)
class StepPlan:
    """What one engine step computes. `scheduled` maps request -> new tokens this step.

    `admitted` are the requests that left the waiting queue this step (new or resumed);
    `shed` those the policy gave up on before they started (a bounded wait ran out): they
    get an error, never a token. `refunded_tokens` is token budget given back by
    preemptions made inside a policy hook, for the scheduler to spend again this step."""

    step_index: int
    scheduled: dict[Request, int] = field(default_factory=dict)
    preempted: list[tuple[Request, str]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    shed: list[Request] = field(default_factory=list)
    swap_in_blocks: int = 0
    swap_out_blocks: int = 0
    refunded_tokens: int = 0
    # Asynchronous steps only: the requests this step samples a token for (the others
    # compute a prefill chunk).
    sampling: set[Request] = field(default_factory=set)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)
