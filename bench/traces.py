"""Workloads from the Azure LLM inference traces 2023 (arrival times and token counts).

Data: Azure/AzurePublicDataset, © Microsoft, CC-BY 4.0; cite Patel et al., "Splitwise:
Efficient generative LLM inference using phase splitting", ISCA 2024. See data/NOTICE.md.
Anything derived from these traces (rescaled rates, scaled tokens) carries the attribution.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.slo import DEFAULT_SLO_MIX, SLO_CLASSES, make_slo_assigner
from replicas.request import Slo

DATA_DIR = Path(__file__).parent / "data"
AZURE_TRACES: dict[str, str] = {
    "conv": "azure_llm_2023_conv.csv",
    "code": "azure_llm_2023_code.csv",
}
AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

# `2023-11-16 18:15:46.6805900`: Azure writes 7 fractional digits, one more than datetime
# parses, so the timestamp is split by hand and kept in integer nanoseconds (exact).
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class TraceRequest:
    request_id: str  # "<trace>-<row>", row = 0-based data row in the file, e.g. "conv-000123"
    arrival_s: float  # seconds since the first arrival of the trace
    prompt_tokens: int
    output_tokens: int  # the true generated length (>= 1)
    slo: Slo
    # The prompt itself, for predictors that read text (bench.alpaca_workload); the Azure
    # traces carry token counts only, so None there.
    prompt_text: str | None = None


def load_azure_trace(
    name: str = "conv",
    *,
    limit: int | None = None,
    slo_mix: Mapping[str, float] = DEFAULT_SLO_MIX,
    seed: int = 0,
    slo_classes: Mapping[str, Slo] = SLO_CLASSES,
) -> list[TraceRequest]:
    """The Azure trace `name` ("conv" or "code") from bench/data, first `limit` rows.

    Each request gets an SLO class drawn from `slo_mix` by `assign_slo(row, seed)`, so a
    request keeps its class whatever `limit` is.
    """
    try:
        file_name = AZURE_TRACES[name]
    except KeyError:
        raise ValueError(f"unknown Azure trace {name!r}; known: {sorted(AZURE_TRACES)}") from None
    return load_trace_file(
        DATA_DIR / file_name, prefix=name, limit=limit, slo_mix=slo_mix, seed=seed, slo_classes=slo_classes
    )


def load_trace_file(
    path: Path,
    *,
    prefix: str,
    limit: int | None = None,
    slo_mix: Mapping[str, float] = DEFAULT_SLO_MIX,
    seed: int = 0,
    slo_classes: Mapping[str, Slo] = SLO_CLASSES,
) -> list[TraceRequest]:
    """Parse a CSV in the Azure LLM trace schema (`TIMESTAMP,ContextTokens,GeneratedTokens`).

    Arrivals are made relative to the first row kept, and requests are sorted by arrival
    (stable; the Azure files are already sorted). Token counts of 0 are clamped to 1 (a
    request has at least one prompt token and generates at least one token). A malformed
    file raises ValueError naming the file and the 1-based line.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0")
    assign = make_slo_assigner(slo_mix, slo_classes)
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines or tuple(col.strip() for col in lines[0].split(",")) != AZURE_HEADER:
        got = lines[0] if lines else "<empty file>"
        raise ValueError(f"{path}:1: expected header {','.join(AZURE_HEADER)!r}, got {got!r}")

    day_ns: dict[str, int] = {}
    rows: list[tuple[int, int, int, int]] = []  # (arrival_ns, row, prompt, output)
    for line_no, line in enumerate(lines[1:], start=2):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 3:
            raise ValueError(f"{path}:{line_no}: expected 3 fields, got {len(fields)}: {line!r}")
        try:
            arrival_ns = _parse_timestamp_ns(fields[0].strip(), day_ns)
            prompt, output = int(fields[1]), int(fields[2])
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}: {line!r}") from None
        if prompt < 0 or output < 0:
            raise ValueError(f"{path}:{line_no}: negative token count: {line!r}")
        rows.append((arrival_ns, len(rows), max(1, prompt), max(1, output)))

    rows.sort(key=lambda r: (r[0], r[1]))
    t0_ns = rows[0][0] if rows else 0
    return [
        TraceRequest(
            request_id=f"{prefix}-{row:06d}",
            arrival_s=(arrival_ns - t0_ns) / _NS_PER_S,
            prompt_tokens=prompt,
            output_tokens=output,
            slo=assign(row, seed),
        )
        for arrival_ns, row, prompt, output in rows
    ]


def _parse_timestamp_ns(text: str, day_ns: dict[str, int]) -> int:
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        raise ValueError(f"bad TIMESTAMP {text!r} (want YYYY-MM-DD HH:MM:SS[.fffffff])")
    day, hh, mm, ss, frac = m.groups()
    base = day_ns.get(day)
    if base is None:
        base = date.fromisoformat(day).toordinal() * 86_400 * _NS_PER_S  # raises on 2023-13-40
        day_ns[day] = base
    h, mi, s = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or s > 60:
        raise ValueError(f"bad time of day in TIMESTAMP {text!r}")
    frac_ns = int(frac.ljust(9, "0")) if frac else 0
    return base + (h * 3600 + mi * 60 + s) * _NS_PER_S + frac_ns


def mean_rate_rps(requests: Sequence[TraceRequest]) -> float:
    """(n - 1) / (last arrival - first arrival), the data README's definition."""
    if len(requests) < 2:
        raise ValueError(f"a rate needs at least 2 requests, got {len(requests)}")
    duration_s = requests[-1].arrival_s - requests[0].arrival_s
    if duration_s <= 0:
        raise ValueError(f"all {len(requests)} requests arrive at t={requests[0].arrival_s}; no rate")
    return (len(requests) - 1) / duration_s


def scale_to_rate(requests: Sequence[TraceRequest], rate_rps: float) -> list[TraceRequest]:
    """Stretch or compress every inter-arrival gap by one factor so the mean rate is
    `rate_rps`; the first arrival stays put. Order, tokens and the burstiness (CV of the
    gaps) are unchanged. Fewer than 2 requests are returned unchanged."""
    if not rate_rps > 0 or math.isinf(rate_rps):
        raise ValueError(f"rate_rps={rate_rps} must be a positive finite number")
    if len(requests) < 2:
        return list(requests)
    _check_sorted(requests)
    factor = mean_rate_rps(requests) / rate_rps
    t0 = requests[0].arrival_s
    return [dataclasses.replace(r, arrival_s=t0 + (r.arrival_s - t0) * factor) for r in requests]


def scale_tokens(
    requests: Sequence[TraceRequest], divisor: float, *, max_context: int | None = None
) -> list[TraceRequest]:
    """Divide prompt and output lengths by `divisor` (rounded half up, at least 1), for small
    models. With `max_context`, a request that no longer fits is cut the way a client cuts
    a long conversation: the prompt is left-truncated to `max_context - output`; only when
    the output alone leaves no room for one prompt token is it cut to `max_context - 1`."""
    if not divisor > 0 or math.isinf(divisor):
        raise ValueError(f"divisor={divisor} must be a positive finite number")
    if max_context is not None and max_context < 2:
        raise ValueError(f"max_context={max_context} must be >= 2 (one prompt and one output token)")
    scaled = []
    for r in requests:
        prompt = max(1, math.floor(r.prompt_tokens / divisor + 0.5))
        output = max(1, math.floor(r.output_tokens / divisor + 0.5))
        if max_context is not None and prompt + output > max_context:
            output = min(output, max_context - 1)
            prompt = max_context - output
        scaled.append(dataclasses.replace(r, prompt_tokens=prompt, output_tokens=output))
    return scaled


def split_train_test(
    requests: Sequence[TraceRequest], train_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """A deterministic random split: round(n * train_fraction) requests for fitting the
    length predictor, the rest for the benchmark. Both parts keep the input order and the
    original arrival times (rebase or `scale_to_rate` the test part as needed)."""
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction={train_fraction} must be in [0, 1]")
    num_train = round(len(requests) * train_fraction)
    train_idx = set(random.Random(seed).sample(range(len(requests)), num_train))
    train = [r for i, r in enumerate(requests) if i in train_idx]
    test = [r for i, r in enumerate(requests) if i not in train_idx]
    return train, test


def _check_sorted(requests: Sequence[TraceRequest]) -> None:
    for prev, cur in zip(requests, requests[1:]):
        if cur.arrival_s < prev.arrival_s:
            raise ValueError(
                f"requests not sorted by arrival: {cur.request_id} at {cur.arrival_s} "
                f"after {prev.request_id} at {prev.arrival_s}"
            )
