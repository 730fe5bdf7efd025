"""Workloads from the Azure LLM inference traces 2023 (arrival times and token counts).

Data: Azure/AzurePublicDataset, © Microsoft, CC-BY 4.0; cite Patel et al., "Splitwise:
Efficient generative LLM inference using phase splitting", ISCA 2024. See data/NOTICE.md.
Anything derived from these traces (rescaled rates, scaled tokens) carries the attribution.

Users replay their own traffic through `load_trace_path`: a CSV in the same Azure schema, or
JSONL in the Mooncake / AIPerf trace format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.slo import DEFAULT_SLO_MIX, make_slo_assigner
from replicas.request import Slo
from replicas.slo import SLO_CLASSES

DATA_DIR = Path(__file__).parent / "data"
AZURE_TRACES: dict[str, str] = {
    "conv": "azure_llm_2023_conv.csv",
    "code": "azure_llm_2023_code.csv",
}
AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
SESSIONS_TRACE = "sessions"  # the generated shared-prefix workload (bench/sessions.py)
NAMED_TRACES = (*AZURE_TRACES, SESSIONS_TRACE)  # what load_trace knows by name
MOONCAKE_HASH_BLOCK_TOKENS = 512  # Mooncake's traces hash the prompt in blocks of 512 tokens

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
    # One id per `hash_block_tokens` of the prompt (Mooncake / AIPerf traces, the session
    # workload): equal ids at a position mean equal prompts up to the end of that block
    # (an id names its whole prefix, as a chained hash does). The simulator turns them
    # into prefix-cache keys (prefix_keys), the engine bench into token ids. None when the
    # trace has no block ids. Last, so positional construction elsewhere keeps working.
    hash_ids: tuple[int, ...] | None = None
    hash_block_tokens: int = MOONCAKE_HASH_BLOCK_TOKENS
    # The conversation it belongs to (a JSONL `session_id`, the session workload): a train /
    # test split keeps a session's turns together.
    session: str | None = None

    def prefix_keys(self, block_size: int) -> tuple[tuple[int, int], ...] | None:
        """Prefix-cache keys of the prompt's blocks of `block_size` tokens that lie inside
        its hashed part: block i is named by the id of the hashed block holding its last
        token and that token's offset in it, which names the prefix up to there."""
        if not self.hash_ids:
            return None
        hashed = min(self.prompt_tokens, len(self.hash_ids) * self.hash_block_tokens)
        keys = []
        for i in range(hashed // block_size):
            last = (i + 1) * block_size - 1
            j = last // self.hash_block_tokens
            keys.append((self.hash_ids[j], last - j * self.hash_block_tokens))
        return tuple(keys)


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


def load_trace_path(
    path: Path,
    *,
    prefix: str | None = None,
    limit: int | None = None,
    slo_mix: Mapping[str, float] = DEFAULT_SLO_MIX,
    seed: int = 0,
    slo_classes: Mapping[str, Slo] = SLO_CLASSES,
) -> list[TraceRequest]:
    """A user's own trace: a CSV in the Azure schema (read by `load_trace_file`) or JSONL in
    the Mooncake / AIPerf format (`timestamp` in ms, `input_length`, `output_length`,
    optional `hash_ids`, `hash_block_tokens` (tokens per hash id, default 512 as in Mooncake)
    and `session_id`; other keys ignored).

    `.csv` is CSV and `.jsonl` / `.json` is JSONL; any other name is sniffed from its first
    non-empty line (`{` means JSONL), so a trace saved as `.txt` or `.log` still loads. Both
    formats mean the same: arrivals in seconds since the first arrival kept, a stable sort by
    arrival, ids `<prefix>-<row:06d>` (prefix defaults to the file stem), zero token counts
    clamped to 1, the SLO class drawn from the 0-based data row, `limit` keeping the first
    rows of the file. Every problem with the file, a missing one included, is a ValueError
    naming it (and the 1-based line where there is one), so a CLI can print it as is.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0")
    lines = _read_lines(path)
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path}:1: no requests (empty file)")
    prefix = path.stem if prefix is None else prefix

    if not _is_jsonl(path, lines):
        requests = load_trace_file(
            path, prefix=prefix, limit=limit, slo_mix=slo_mix, seed=seed, slo_classes=slo_classes
        )
        # Checked on the lines, not on `requests`, so that limit=0 still returns [].
        if not any(line.strip() for line in lines[1:]):
            raise ValueError(f"{path}:2: no requests after the header")
        return requests

    assign = make_slo_assigner(slo_mix, slo_classes)
    rows: list[tuple[int | float, int, int, int, dict]] = []
    for line_no, line in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            arrival_ms, prompt, output, extra = _parse_jsonl_request(line)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}: {_excerpt(line)}") from None
        rows.append((arrival_ms, len(rows), max(1, prompt), max(1, output), extra))

    rows.sort(key=lambda r: (r[0], r[1]))
    t0_ms = rows[0][0] if rows else 0
    return [
        TraceRequest(
            request_id=f"{prefix}-{row:06d}",
            arrival_s=(arrival_ms - t0_ms) / 1000,  # exact for integer ms up to 2**53
            prompt_tokens=prompt,
            output_tokens=output,
            slo=assign(row, seed),
            **extra,
        )
        for arrival_ms, row, prompt, output, extra in rows
    ]


def _read_lines(path: Path) -> list[str]:
    # Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON
    # allows raw inside strings, and line numbers would then disagree with the editor's.
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read trace: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
    return text.split("\n")


def _is_jsonl(path: Path, lines: Sequence[str]) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return False
    if suffix in (".jsonl", ".json"):
        return True
    first = next(line for line in lines if line.strip())
    return first.lstrip().startswith("{")


def _parse_jsonl_request(line: str) -> tuple[int | float, int, int, dict]:
    """(timestamp ms, input_length, output_length, the optional TraceRequest fields) of
    one JSONL line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("bad JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(obj)}")

    arrival_ms = _field(obj, "timestamp")
    if not isinstance(arrival_ms, (int, float)) or isinstance(arrival_ms, bool):
        raise ValueError(f"timestamp must be a number of milliseconds, got {_json_type(arrival_ms)}")
    # json.loads takes NaN and Infinity; an int past 2**53 ms (285,000 years) would lose
    # precision as a float, so it is as wrong as infinity here.
    finite = math.isfinite(arrival_ms) if isinstance(arrival_ms, float) else abs(arrival_ms) <= 2**53
    if not finite:
        raise ValueError(f"timestamp={arrival_ms} must be a finite number of milliseconds")
    if arrival_ms < 0:
        raise ValueError(f"timestamp={arrival_ms} must be >= 0")
    prompt = _token_count(obj, "input_length")
    output = _token_count(obj, "output_length")

    hash_ids = obj.get("hash_ids")
    if hash_ids is not None:  # null is the JSON spelling of "no block ids"
        if not isinstance(hash_ids, list):
            raise ValueError(f"hash_ids must be a list of integers, got {_json_type(hash_ids)}")
        for i, h in enumerate(hash_ids):
            if not isinstance(h, int) or isinstance(h, bool):
                raise ValueError(f"hash_ids[{i}] must be an integer, got {_json_type(h)}")
        hash_ids = tuple(hash_ids)
    extra: dict = {"hash_ids": hash_ids}
    hash_block = obj.get("hash_block_tokens")
    if hash_block is not None:
        if not isinstance(hash_block, int) or isinstance(hash_block, bool) or hash_block < 1:
            raise ValueError(f"hash_block_tokens must be a positive integer, got {hash_block!r}")
        extra["hash_block_tokens"] = hash_block
    session = obj.get("session_id")
    if session is not None:
        if not isinstance(session, (str, int)) or isinstance(session, bool):
            raise ValueError(f"session_id must be a string or an integer, got {_json_type(session)}")
        extra["session"] = str(session)
    return arrival_ms, prompt, output, extra


def _field(obj: dict, key: str):
    try:
        return obj[key]
    except KeyError:
        raise ValueError(f"missing field {key!r}") from None


def _token_count(obj: dict, key: str) -> int:
    value = _field(obj, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer token count, got {_json_type(value)} {value!r}")
    if value < 0:
        raise ValueError(f"{key}={value} must be >= 0")
    return value


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages a trace's author will read."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names = {dict: "object", list: "array", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _excerpt(line: str, width: int = 80) -> str:
    # A Mooncake line carries one hash id per block: thousands of numbers for a long prompt.
    line = line.strip()
    return repr(line if len(line) <= width else line[: width - 3] + "...")


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
        hash_ids = r.hash_ids
        if max_context is not None and prompt + output > max_context:
            output = min(output, max_context - 1)
            prompt = max_context - output
            hash_ids = None  # left-truncated: its start, and so every prefix it shared, is gone
        # Hashed blocks shrink with the prompt (at least one token each), so shared prefixes stay shared.
        hash_block = max(1, math.floor(r.hash_block_tokens / divisor + 0.5))
        scaled.append(dataclasses.replace(r, prompt_tokens=prompt, output_tokens=output, hash_ids=hash_ids,
                                          hash_block_tokens=hash_block))
    return scaled


def split_train_test(
    requests: Sequence[TraceRequest], train_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """A deterministic random split: round(n * train_fraction) requests for fitting the
    length predictor, the rest for the benchmark; where requests belong to sessions, whole
    sessions (round(sessions * train_fraction) of them). Both parts keep the input order
    and the original arrival times (rebase or `scale_to_rate` the test part as needed)."""
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction={train_fraction} must be in [0, 1]")
    if any(r.session is not None for r in requests):
        groups = sorted({r.session or r.request_id for r in requests})
        train_groups = set(random.Random(seed).sample(groups, round(len(groups) * train_fraction)))
        train = [r for r in requests if (r.session or r.request_id) in train_groups]
        test = [r for r in requests if (r.session or r.request_id) not in train_groups]
        return train, test
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


def load_trace(name_or_path: str | Path, *, seed: int = 0, slo_classes: Mapping[str, Slo] = SLO_CLASSES,
               length_divisor: float = 1.0, max_context: int | None = None) -> list[TraceRequest]:
    """A shipped Azure trace by name (`conv`, `code`), the generated shared-prefix workload
    (`sessions`, bench/sessions.py) or any trace file (`load_trace_path`: Azure CSV or
    Mooncake/AIPerf JSONL), its token counts divided by `length_divisor`."""
    if str(name_or_path) in AZURE_TRACES:
        requests = load_azure_trace(str(name_or_path), seed=seed, slo_classes=slo_classes)
    elif str(name_or_path) == SESSIONS_TRACE:
        from bench.sessions import session_trace  # it imports this module

        requests = session_trace(seed=seed, slo_classes=slo_classes)
    else:
        requests = load_trace_path(Path(name_or_path), seed=seed, slo_classes=slo_classes)
    if length_divisor != 1.0 or max_context is not None:
        requests = scale_tokens(requests, length_divisor, max_context=max_context)
    return requests
