"""A shared-prefix workload: multi-turn chat sessions behind a few system prompts.

No shipped trace carries prompts with their shared prefixes, so this one is synthetic, from
a seed and the documented parameters of `SessionWorkload`:

- `num_system_prompts` system prompts of 500-2,000 tokens (uniform); a session picks one
  with Zipf popularity (exponent 1), as a few assistants serve most of the traffic.
- Sessions start as a Poisson process; each has a geometric number of turns (mean
  `mean_turns`, at most `max_turns`). A follow-up turn arrives a think time (exponential,
  mean `mean_think_s`) after its predecessor's answer would have streamed at `answer_tbt_s`
  per token: the replay is open-loop, like every trace here.
- Turn k's prompt is the system prompt, every earlier user message and answer, and its own
  user message. User messages are log-normal in length with ShareGPT's first-turn medians
  (about 70 tokens, 90th percentile about 420; ../shared/data/README.md section 3); answers
  take the Azure conv trace's output lengths (CC-BY 4.0, Microsoft), so the shipped length
  predictor fits them.

Block ids (`TraceRequest.hash_ids`, one per `HASH_BLOCK_TOKENS`) name the content: a block
wholly inside a system prompt is named by that prompt and position, every other block by
its session and position, and the last, partial block of a prompt by the request alone. So
requests behind one system prompt share it, and a follow-up shares its conversation so far
up to the previous prompt. The previous *answer* in a follow-up prompt is synthetic text of
the answer's length, not what the engine generated, so a follow-up does not hit the blocks
its predecessor decoded; in a real chat it would, so the hit rates here are a lower bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from bench.slo import DEFAULT_SLO_MIX, make_slo_assigner
from bench.traces import SESSIONS_TRACE, TraceRequest, load_azure_trace
from replicas.request import Slo
from replicas.slo import SLO_CLASSES

HASH_BLOCK_TOKENS = 16
USER_TOKENS_MEDIAN = 70
USER_TOKENS_SIGMA = math.log(420 / 70) / 1.2816  # the 90th percentile at ~420 tokens


@dataclass(frozen=True)
class SessionWorkload:
    num_sessions: int = 800
    num_system_prompts: int = 8
    system_tokens: tuple[int, int] = (500, 2000)
    mean_turns: float = 3.0
    max_turns: int = 8
    session_rate_rps: float = 1.0  # session starts per second (scale_to_rate rescales the whole trace)
    mean_think_s: float = 10.0
    answer_tbt_s: float = 0.02
    user_tokens: tuple[int, int] = (8, 1000)  # clip of the log-normal

    def __post_init__(self) -> None:
        if self.num_sessions < 1 or self.num_system_prompts < 1 or self.max_turns < 1:
            raise ValueError("num_sessions, num_system_prompts and max_turns must be >= 1")
        if not 1 <= self.system_tokens[0] <= self.system_tokens[1]:
            raise ValueError(f"system_tokens={self.system_tokens} must be 1 <= low <= high")
        if not self.mean_turns >= 1:
            raise ValueError(f"mean_turns={self.mean_turns} must be >= 1")


def session_trace(workload: SessionWorkload = SessionWorkload(), *, seed: int = 0,
                  slo_mix: Mapping[str, float] = DEFAULT_SLO_MIX,
                  slo_classes: Mapping[str, Slo] = SLO_CLASSES) -> list[TraceRequest]:
    """The requests of every session, by arrival. Request ids are
    `sessions-<session>-<turn>`; `session` groups a session's turns (split_train_test keeps
    them together). The SLO class is drawn per session (a client keeps its class)."""
    rng = random.Random(seed)
    outputs = [r.output_tokens for r in load_azure_trace("conv")]
    assign = make_slo_assigner(slo_mix, slo_classes)
    ids: dict[tuple, int] = {}

    def block_id(name: tuple) -> int:
        return ids.setdefault(name, len(ids))

    systems = [rng.randint(*workload.system_tokens) for _ in range(workload.num_system_prompts)]
    popularity = list(itertools.accumulate(1 / (k + 1) for k in range(len(systems))))
    continue_p = 1 - 1 / workload.mean_turns
    requests: list[TraceRequest] = []
    start = 0.0
    for session in range(workload.num_sessions):
        start += rng.expovariate(workload.session_rate_rps)
        system = rng.choices(range(len(systems)), cum_weights=popularity)[0]
        slo = assign(session, seed)
        context = systems[system]  # tokens of the conversation so far
        arrival = start
        for turn in range(workload.max_turns):
            user = int(min(max(rng.lognormvariate(math.log(USER_TOKENS_MEDIAN), USER_TOKENS_SIGMA),
                               workload.user_tokens[0]), workload.user_tokens[1]))
            prompt = context + user
            output = rng.choice(outputs)
            rid = f"{SESSIONS_TRACE}-{session:05d}-{turn}"
            hash_ids = []
            for j in range(-(-prompt // HASH_BLOCK_TOKENS)):
                end = (j + 1) * HASH_BLOCK_TOKENS
                if end <= systems[system]:
                    hash_ids.append(block_id(("system", system, j)))
                elif end <= prompt:
                    hash_ids.append(block_id(("session", session, j)))
                else:
                    hash_ids.append(block_id(("request", rid)))
            requests.append(TraceRequest(rid, arrival, prompt, output, slo, hash_ids=tuple(hash_ids),
                                         hash_block_tokens=HASH_BLOCK_TOKENS, session=f"{SESSIONS_TRACE}-{session:05d}"))
            if rng.random() >= continue_p:
                break
            context = prompt + output
            arrival += output * workload.answer_tbt_s + rng.expovariate(1 / workload.mean_think_s)
    requests.sort(key=lambda r: (r.arrival_s, r.request_id))
    t0 = requests[0].arrival_s
    return [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in requests]


def prefix_share(requests: list[TraceRequest]) -> float:
    """The share of prompt tokens in blocks some earlier request already had: the hit rate
    an unbounded prefix cache would reach (whole hashed blocks only)."""
    seen: set[int] = set()
    shared = total = 0
    for r in requests:
        total += r.prompt_tokens
        for j, h in enumerate(r.hash_ids or ()):
            if h in seen:
                shared += min(r.hash_block_tokens, r.prompt_tokens - j * r.hash_block_tokens)
            seen.add(h)
    return shared / total if total else 0.0
