"""The speed benchmark's step timer runs every policy it reports on (no timing asserted)."""

import pytest

from bench.speed import step_microseconds


@pytest.mark.parametrize("policy", ["vllm", "cacheopt", "cacheopt-locked", "edf", "past-future"])
@pytest.mark.parametrize("waiting", [0, 8])
def test_step_timer_admits_everyone_and_reports_a_time(policy, waiting):
    """All requests are admitted and decoding before the timed steps start (the waiting
    ones never fit); the result is a positive time."""
    assert step_microseconds(policy, 16, num_steps=5, num_waiting=waiting) > 0
