"""A workload with real prompts and real answer lengths on real arrival times.

Arrival times and SLO classes come from an Azure LLM trace (CC-BY 4.0, © Microsoft; cite
Patel et al., "Splitwise", ISCA 2024; see bench/data/NOTICE.md); prompts and answer
lengths from AlpacaEval (tatsu-lab/alpaca_eval, CC BY-NC 4.0: non-commercial use only,
attribution required; see predictor/data/README.md). The Azure trace has no text and
AlpacaEval no arrival times, so the join is synthetic: arrival i gets a record chosen by
a seeded permutation. Pass records the length model never saw (the test part of
`predictor.alpaca.split_by_prompt`), so the simulator replays unseen prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from bench.traces import TraceRequest, load_azure_trace
from predictor.alpaca import AlpacaRecord
from predictor.tokens import chat_prompt_tokens

# The simulator models Llama-3-8B, so its own answers give the realistic lengths.
DEFAULT_GENERATOR = "Meta-Llama-3-8B-Instruct"


def alpaca_trace(
    records: Sequence[AlpacaRecord],
    *,
    arrivals_from: str = "conv",
    limit: int | None = None,
    seed: int = 0,
    generator: str | None = DEFAULT_GENERATOR,
) -> list[TraceRequest]:
    """One request per arrival of the Azure trace `arrivals_from` (first `limit` rows).

    Request i keeps the trace's arrival time and SLO class (assigned with `seed`) and takes
    record perm[i % n], where perm is the records of `generator` (all records if None) in
    (prompt_id, generator) order shuffled by `random.Random(seed)`: every record is used
    once before any is used twice, whatever order `records` came in. A trace longer than
    the records repeats prompts, which a prefix cache would notice.

    prompt_tokens = chat_prompt_tokens(instruction) (the Llama-3 chat template around the
    instruction), output_tokens = the record's answer length, prompt_text = instruction,
    request_id = "alpaca-<i>" with i the 0-based arrival index, e.g. "alpaca-000123".
    """
    pool = sorted(
        (r for r in records if generator is None or r.generator == generator),
        key=lambda r: (r.prompt_id, r.generator),
    )
    if not pool:
        have = sorted({r.generator for r in records})
        raise ValueError(f"no records for generator {generator!r} among {len(records)} records; generators: {have}")
    random.Random(seed).shuffle(pool)
    arrivals = load_azure_trace(arrivals_from, limit=limit, seed=seed)
    prompt_tokens: dict[str, int] = {}  # instruction -> tokens; each prompt recurs many times
    trace = []
    for i, arrival in enumerate(arrivals):
        record = pool[i % len(pool)]
        tokens = prompt_tokens.get(record.instruction)
        if tokens is None:
            tokens = prompt_tokens[record.instruction] = chat_prompt_tokens(record.instruction)
        trace.append(
            TraceRequest(
                request_id=f"alpaca-{i:06d}",
                arrival_s=arrival.arrival_s,
                prompt_tokens=tokens,
                output_tokens=record.output_tokens,
                slo=arrival.slo,
                prompt_text=record.instruction,
            )
        )
    return trace
