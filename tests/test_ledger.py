"""The KV ledger balances its books whatever sequence of operations it sees."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.ledger import KVLedger


def test_reserve_hold_release_round_trip():
    """Blocks promised then released come back to the free pool; books balance throughout."""
    ledger = KVLedger(100)
    assert ledger.try_reserve("a", 30) == 0
    assert ledger.try_hold("a", 10)
    ledger.check_invariants()
    assert ledger.free == 70 and ledger.shares["a"].idle == 20
    ledger.release("a")
    ledger.check_invariants()
    assert ledger.free == 100 and ledger.held_total == 0


def test_refused_reservation_changes_nothing():
    """A reservation that does not fit returns None and leaves every count as it was."""
    ledger = KVLedger(10, reserve_blocks=2)
    assert ledger.try_reserve("a", 9) is None
    assert "a" not in ledger.shares and ledger.free == 8 and ledger.reserve_free == 2


def test_reserve_only_when_allowed_and_refilled_first():
    """The reserve is drawn only with use_reserve; released blocks refill it before the free pool."""
    ledger = KVLedger(10, reserve_blocks=3)
    assert ledger.try_reserve("a", 9) is None
    assert ledger.try_reserve("a", 9, use_reserve=True) == 2
    assert ledger.free == 0 and ledger.reserve_free == 1
    ledger.release("a")
    assert ledger.reserve_free == 3 and ledger.free == 7
    ledger.check_invariants()


def test_guest_lives_in_host_idle_and_returns_there():
    """An embedded guest borrows the host's idle blocks and gives them back when it ends."""
    ledger = KVLedger(100)
    ledger.try_reserve("host", 50)
    ledger.try_hold("host", 10)
    assert ledger.try_embed("guest", "host", 30)
    assert not ledger.try_embed("guest2", "host", 11)  # only 10 idle left
    assert ledger.try_hold("guest", 30) and not ledger.try_hold("host", 21)
    ledger.check_invariants()
    ledger.release("guest")
    assert ledger.shares["host"].idle == 40 and ledger.free == 50
    ledger.check_invariants()


def test_host_release_hands_guest_its_blocks():
    """When a host ends, its guest keeps its reservation as its own."""
    ledger = KVLedger(100)
    ledger.try_reserve("host", 50)
    ledger.try_embed("guest", "host", 20)
    ledger.try_hold("guest", 5)
    assert ledger.release("host") == ["guest"]
    share = ledger.shares["guest"]
    assert share.host is None and share.reserved == 20 and ledger.free == 80
    ledger.check_invariants()


def test_guest_top_up_detaches_it():
    """A guest that outgrows its reservation takes it over and adds free blocks."""
    ledger = KVLedger(100)
    ledger.try_reserve("host", 50)
    ledger.try_embed("guest", "host", 20)
    assert ledger.try_top_up("guest", 5, use_reserve=False) == 0
    assert ledger.shares["guest"].reserved == 25 and ledger.shares["guest"].host is None
    assert ledger.shares["host"].reserved == 30 and ledger.shares["host"].lent == 0
    ledger.check_invariants()


def test_bad_construction_is_a_clear_error():
    """Impossible sizes raise ValueError naming the numbers."""
    with pytest.raises(ValueError, match="total_blocks=0"):
        KVLedger(0)
    with pytest.raises(ValueError, match="reserve_blocks=10"):
        KVLedger(10, reserve_blocks=10)


def test_reserve_target_moves_blocks_both_ways():
    """Growing the reserve lease takes free blocks; shrinking it gives them back."""
    ledger = KVLedger(100, reserve_blocks=10)
    ledger.set_reserve_target(30)
    assert (ledger.free, ledger.reserve_free) == (70, 30)
    ledger.set_reserve_target(5)
    assert (ledger.free, ledger.reserve_free) == (95, 5)
    ledger.check_invariants()


ops = st.lists(st.tuples(st.sampled_from(["reserve", "embed", "hold", "topup", "release", "lease"]),
                         st.integers(0, 7), st.integers(0, 7), st.integers(0, 40)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operation_sequences_keep_invariants(sequence):
    """free + reserve + owned == total and every share is consistent after every operation."""
    ledger = KVLedger(120, reserve_blocks=12)
    for op, a, b, n in sequence:
        rid, other = f"r{a}", f"r{b}"
        if op == "reserve" and rid not in ledger.shares:
            ledger.try_reserve(rid, n, use_reserve=bool(n % 2))
        elif op == "embed" and rid not in ledger.shares and other in ledger.shares \
                and ledger.shares[other].host is None:
            ledger.try_embed(rid, other, n)
        elif op == "hold" and rid in ledger.shares:
            ledger.try_hold(rid, n)
        elif op == "topup" and rid in ledger.shares:
            ledger.try_top_up(rid, n, use_reserve=bool(n % 2))
        elif op == "release" and rid in ledger.shares:
            ledger.release(rid)
        elif op == "lease":
            ledger.set_reserve_target(n)
        ledger.check_invariants()
