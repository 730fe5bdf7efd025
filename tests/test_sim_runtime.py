"""The simulated engine behind a replica, in real time (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio

from cluster.config import load_config
from replicas.engines.sim import SimServingEngine


def runtime(**engine) -> SimServingEngine:
    config = load_config(engine={"kind": "sim", "kv_blocks": 128, **engine})
    return SimServingEngine(config.engine, config.engine_settings())


def test_streams_exactly_max_tokens_and_frees_everything():
    sim = runtime()

    async def main():
        async def one(i):
            chunks = [c async for c in sim.generate(f"r{i}", list(range(3, 3 + 40 * (i + 1))), 12,
                                                    {"cacheopt_slo": "chat"})]
            return sum(len(c) for c in chunks)
        counts = await asyncio.gather(*(one(i) for i in range(6)))
        await sim.shutdown()
        return counts

    assert asyncio.run(main()) == [12] * 6
    ledger = sim.core.ledger
    assert ledger.held_total == 0 and not ledger.shares and sim.snapshot().num_running == 0


def test_a_client_that_leaves_frees_its_blocks():
    sim = runtime()

    async def main():
        stream = sim.generate("gone", list(range(3, 300)), 500, {})
        await anext(stream)  # the first token arrived: it holds blocks now
        assert sim.core.ledger.shares["gone"].held > 0
        await stream.aclose()
        await sim.shutdown()

    asyncio.run(main())
    assert not sim.core.ledger.shares and sim.core.counters["abort"] == 1
