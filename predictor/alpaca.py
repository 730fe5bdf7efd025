"""AlpacaEval instructions with five models' real answers, as (prompt, output length) records.

Data: tatsu-lab/alpaca_eval, CC BY-NC 4.0 (non-commercial; attribution required), see
predictor/data/README.md. All five files hold the same 805 instructions in the same order,
so the position in the file is the prompt id shared by the five generators' answers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from predictor.tokens import count_tokens

DATA_DIR = Path(__file__).parent / "data"
ALPACA_FILES: tuple[str, ...] = (
    "Meta-Llama-3-8B-Instruct.json",
    "Mistral-7B-Instruct-v0.2.json",
    "Qwen1.5-7B-Chat.json",
    "gpt4_1106_preview.json",
    "llama-2-7b-chat-hf.json",
)
_FIELDS = ("dataset", "instruction", "output", "generator")


@dataclass(frozen=True, slots=True)
class AlpacaRecord:
    prompt_id: int  # 0-based position of the instruction in every AlpacaEval file
    dataset: str  # AlpacaEval subset (selfinstruct, oasst, ...); unknown at serving time
    instruction: str
    generator: str  # the model that wrote the answer
    output_tokens: int  # Llama-3 tokens of the answer (>= 1)


def load_alpaca(data_dir: Path | str = DATA_DIR, files: Sequence[str] = ALPACA_FILES) -> list[AlpacaRecord]:
    """All records of `files` under `data_dir`, file by file, in file order.

    A missing or malformed file, or files whose instructions differ at some position (so
    the position would not be a shared prompt id), raise ValueError naming the file.
    Token counts are cached per file (keyed by its path, size and mtime), so a second load
    in one process skips the tokenizer.
    """
    data_dir = Path(data_dir)
    records: list[AlpacaRecord] = []
    first_instructions: list[str] | None = None
    for name in files:
        path = data_dir / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ValueError(f"{path}: AlpacaEval file not found (see predictor/data/README.md)") from None
        rows = _read_counted_rows(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        instructions = [row[1] for row in rows]
        if first_instructions is None:
            first_instructions = instructions
        elif instructions != first_instructions:
            raise ValueError(
                f"{data_dir / name}: its {len(instructions)} instructions differ from those of "
                f"{data_dir / files[0]} ({len(first_instructions)}); prompt ids would not match"
            )
        records.extend(
            AlpacaRecord(prompt_id=i, dataset=dataset, instruction=instruction, generator=generator,
                         output_tokens=output_tokens)
            for i, (dataset, instruction, generator, output_tokens) in enumerate(rows)
        )
    return records


@functools.lru_cache(maxsize=16)
def _read_counted_rows(path: str, size_bytes: int, mtime_ns: int) -> tuple[tuple[str, str, str, int], ...]:
    """(dataset, instruction, generator, output tokens) per record; size and mtime are only
    cache keys, so an edited file is read again."""
    return tuple(
        (row["dataset"], row["instruction"], row["generator"], max(1, count_tokens(row["output"])))
        for row in _read_rows(Path(path))
    )


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: AlpacaEval file not found (see predictor/data/README.md)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON array of records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _FIELDS):
            raise ValueError(f"{path}: record {i} is not an object with string fields {_FIELDS}: {row!r:.200}")
    return rows


def data_file_digests(data_dir: Path | str = DATA_DIR, files: Sequence[str] = ALPACA_FILES) -> dict[str, str]:
    """sha256 (hex) of each data file, for an artifact's record of what it was trained on."""
    data_dir = Path(data_dir)
    return {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in files}


def split_by_prompt(
    records: Iterable[AlpacaRecord], fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[list[AlpacaRecord], list[AlpacaRecord], list[AlpacaRecord]]:
    """(train, calibration, test), split by prompt id, never by record: every generator's
    answer to one prompt lands in the same part, so no part sees another's instructions.

    The sorted distinct prompt ids are shuffled with `random.Random(seed)`; the first
    round(n * f_train) go to train, the next round(n * f_cal) to calibration, the rest to
    test. Each part keeps the input order of its records.
    """
    if len(fractions) != 3 or any(not (0.0 <= f <= 1.0) for f in fractions) or not math.isclose(
        sum(fractions), 1.0, abs_tol=1e-9
    ):
        raise ValueError(f"fractions={tuple(fractions)} must be three numbers in [0, 1] that sum to 1")
    records = list(records)
    prompt_ids = sorted({r.prompt_id for r in records})
    random.Random(seed).shuffle(prompt_ids)
    num_train = round(len(prompt_ids) * fractions[0])
    num_cal = min(round(len(prompt_ids) * fractions[1]), len(prompt_ids) - num_train)
    part_of = {pid: 0 for pid in prompt_ids[:num_train]}
    part_of.update({pid: 1 for pid in prompt_ids[num_train : num_train + num_cal]})
    parts: tuple[list[AlpacaRecord], ...] = ([], [], [])
    for r in records:
        parts[part_of.get(r.prompt_id, 2)].append(r)
    return parts[0], parts[1], parts[2]
