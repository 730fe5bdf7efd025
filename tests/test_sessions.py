"""The shared-prefix workload (bench/sessions.py) and what the traces keep of sessions."""

import json

import pytest

from bench.sessions import HASH_BLOCK_TOKENS, SessionWorkload, prefix_share, session_trace
from bench.traces import load_trace, load_trace_path, scale_tokens, split_train_test


@pytest.fixture(scope="module")
def trace():
    return session_trace(SessionWorkload(num_sessions=200), seed=3)


def test_sessions_share_system_prompts_and_their_own_history(trace):
    by_session = {}
    for r in trace:
        by_session.setdefault(r.session, []).append(r)
    assert len(by_session) == 200
    for turns in by_session.values():
        turns.sort(key=lambda r: int(r.request_id.rsplit("-", 1)[1]))
        for before, after in zip(turns, turns[1:]):
            assert after.arrival_s > before.arrival_s
            assert after.prompt_tokens >= before.prompt_tokens + before.output_tokens  # history + a new message
            full = before.prompt_tokens // HASH_BLOCK_TOKENS
            assert after.hash_ids[:full] == before.hash_ids[:full]  # the previous prompt is a prefix
            if before.prompt_tokens % HASH_BLOCK_TOKENS:
                assert after.hash_ids[full] != before.hash_ids[full]  # its partial last block is not
        assert all(r.slo == turns[0].slo for r in turns)  # a client keeps its class
    firsts = [turns[0] for turns in by_session.values()]
    system_blocks = {r.hash_ids[0] for r in firsts}
    assert 1 < len(system_blocks) <= 8  # a few system prompts behind every session
    assert 0.5 < prefix_share(trace) < 0.95
    assert all(500 <= r.prompt_tokens for r in firsts)


def test_sessions_are_deterministic_and_seeded(trace):
    assert session_trace(SessionWorkload(num_sessions=200), seed=3) == trace
    assert session_trace(SessionWorkload(num_sessions=200), seed=4) != trace
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace) and trace[0].arrival_s == 0.0


def test_the_split_keeps_sessions_whole(trace):
    train, test = split_train_test(trace, 0.2, seed=0)
    assert len(train) + len(test) == len(trace)
    assert not {r.session for r in train} & {r.session for r in test}
    assert len({r.session for r in train}) == 40


def test_load_trace_knows_the_sessions_by_name():
    requests = load_trace("sessions", length_divisor=4.0)
    assert requests[0].hash_block_tokens == HASH_BLOCK_TOKENS // 4
    assert requests == scale_tokens(session_trace(), 4.0)


def test_jsonl_keeps_session_and_hash_block_size(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"timestamp": 0, "input_length": 40, "output_length": 3, "hash_ids": [1, 2], "hash_block_tokens": 32,
              "session_id": 17},
             {"timestamp": 5, "input_length": 40, "output_length": 3, "session_id": "chat-a"}]
    path.write_text("\n".join(json.dumps(obj) for obj in lines))
    a, b = load_trace_path(path)
    assert (a.session, a.hash_block_tokens, a.hash_ids) == ("17", 32, (1, 2))
    assert (b.session, b.hash_block_tokens, b.hash_ids) == ("chat-a", 512, None)
    path.write_text(json.dumps(lines[0] | {"hash_block_tokens": 0}))
    with pytest.raises(ValueError, match=r"t.jsonl:1: hash_block_tokens must be a positive integer"):
        load_trace_path(path)
    path.write_text(json.dumps(lines[0] | {"session_id": [1]}))
    with pytest.raises(ValueError, match=r"t.jsonl:1: session_id must be a string or an integer"):
        load_trace_path(path)


def test_shared_prefixes_hit_in_the_simulator_and_cut_time_to_first_token():
    from bench.simulate import SimSetup, simulate
    from bench.traces import scale_to_rate
    from replicas.engines.config import LLAMA3_8B_H100

    requests = scale_to_rate(session_trace(SessionWorkload(num_sessions=60), seed=0), 2.0)
    ttft = {}
    for caching in (True, False):
        result = simulate(requests, "vllm", SimSetup(engine=LLAMA3_8B_H100.with_(prefix_caching=caching, kv_blocks=4096)), predictor=None)
        outs = [o for o in result.outcomes if o.first_token_s is not None]
        ttft[caching] = sum(o.first_token_s - o.arrival_s for o in outs) / len(outs)
        if caching:
            c = result.stats.counters
            assert c["prefix_hit_tokens"] / c["prefix_query_tokens"] > 0.5
    assert ttft[True] < 0.7 * ttft[False]
