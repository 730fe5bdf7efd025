"""The speed benchmark's step timer runs every policy it reports on (no timing asserted)."""

import pytest

from bench.speed import step_microseconds


@pytest.mark.parametrize("policy", ["vllm", "cacheopt"])
def test_step_timer_admits_everyone_and_reports_a_time(policy):
    """All requests are admitted and decoding before the timed steps start; the result is a positive time."""
    assert step_microseconds(policy, 16, num_steps=5) > 0
