"""The `cacheopt` command: a small sweep end to end, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest

from cluster.cli import main


def test_sim_writes_a_report(tmp_path):
    """`cacheopt sim` writes raw results, a summary with ratios against vllm, and plots."""
    out = tmp_path / "report"
    code = main(["sim", "--policies", "vllm,cacheopt", "--rates", "6,9", "--limit", "300", "--kv-blocks", "1024",
                 "--jobs", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["policy"], r["rate_rps"]) for r in rows} == {(p, r) for p in ("vllm", "cacheopt") for r in (6.0, 9.0)}
    summary = (out / "summary.md").read_text()
    assert "Maximum sustainable rate" in summary and "cacheopt" in summary
    assert (out / "p95_ttft_vs_rate.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["sim", "--policies", "fifo"], "unknown policy 'fifo'"),
    (["sim", "--rates", "0"], "rates must be > 0"),
    (["sim", "--kv-blocks", "3"], "cannot hold one request"),
    (["sim", "--confidence", "1.5"], "confidence=1.5"),
    (["sim", "--cacheopt-option", "reserve_fraction"], "NAME=VALUE"),
    (["sim", "--cacheopt-option", "colour=blue"], "not a number"),
    (["sim", "--cacheopt-option", "colour=1"], "unknown CacheOptConfig option(s): colour"),
    (["sim", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens: Input should be greater than or equal to 1"),
    (["sim", "--max-num-batched-tokens", "128"], "max_num_seqs=256 must be <= max_num_batched_tokens=128"),
    (["sim", "--kv-blocks", "128", "--block-size", "32"], "cannot hold one request of max_model_len=8192"),
    (["sim", "--max-model-len", "8"], "--max-model-len: Input should be greater than or equal to 16"),
    (["sim", "--max-num-seqs", "0"], "--max-num-seqs: Input should be greater than or equal to 1"),
    # The real engine's settings are the cluster's EngineConfig: its checks, named by flag.
    (["bench", "--engine", "vllm", "--kv-blocks", "3"], "cannot hold one request"),
    (["bench", "--engine", "vllm", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["bench", "--engine", "vllm", "--model", "/nonexistent"], "no model at /nonexistent"),
])
def test_bad_input_is_one_line_not_a_traceback(argv, message, capsys):
    """Bad arguments exit 2 with a one-line error naming the problem."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sim_takes_a_real_engines_sizes(tmp_path):
    """--max-model-len and --max-num-seqs set what the latency model's defaults would (8192
    and 256), so the simulator can run a real engine's settings, here the serving study's
    (docs/serving-study.sh); the summary records them."""
    out = tmp_path / "report"
    code = main(["sim", "--latency-model", "tiny-llama-cpu", "--kv-blocks", "128", "--block-size", "32",
                 "--max-model-len", "2048", "--max-num-seqs", "64", "--max-num-batched-tokens", "512",
                 "--max-tokens", "256", "--length-divisor", "4", "--policies", "cacheopt", "--rates", "4",
                 "--limit", "100", "--replicas", "2", "--routers", "kv", "--no-progress", "--out", str(out)])
    assert code == 0
    assert "max_model_len 2048, max_num_seqs 64, max_num_batched_tokens 512" in (out / "summary.md").read_text()
    assert json.loads((out / "results.json").read_text())[0]["num_finished"] > 0


def test_sim_replays_a_users_trace_file(tmp_path):
    """`--trace FILE` takes a Mooncake/AIPerf JSONL trace (ms timestamps) with a length
    divisor; every policy of the headline runs on it."""
    trace = tmp_path / "mine.jsonl"
    lines = [json.dumps({"timestamp": 100 * i, "input_length": 200 + 37 * (i % 11), "output_length": 40 + 13 * (i % 7),
                         "hash_ids": [i, i + 1]}) for i in range(400)]
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    code = main(["sim", "--trace", str(trace), "--length-divisor", "2", "--policies", "vllm,edf,past-future,cacheopt",
                 "--rates", "20", "--kv-blocks", "1024", "--jobs", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["policy"] for r in rows} == {"vllm", "edf", "past-future", "cacheopt"}
    assert all(r["num_requests"] == 320 for r in rows)  # the test split: 80% of 400


def test_a_malformed_trace_file_is_one_line_with_its_place(tmp_path, capsys):
    """A broken line is reported with the file and line number, not a traceback."""
    trace = tmp_path / "broken.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n{"timestamp": 1, "input_length": 10}\n')
    assert main(["sim", "--trace", str(trace), "--rates", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{trace}:2" in err and "output_length" in err and "Traceback" not in err


def test_cacheopt_options_reach_the_policy(tmp_path):
    """--cacheopt-option and --confidence set CacheOptConfig fields; the summary records them."""
    out = tmp_path / "report"
    code = main(["sim", "--policies", "cacheopt", "--rates", "6", "--limit", "100", "--kv-blocks", "1024",
                 "--cacheopt-option", "reserve_fraction=0.01", "--cacheopt-option", "reuse=false",
                 "--confidence", "0.6", "--replay", "train", "--jobs", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    summary = (out / "summary.md").read_text()
    assert "reserve_fraction=0.01" in summary and "reuse=False" in summary and "confidence=0.6" in summary
    assert "train split" in summary


def test_malformed_rates_are_rejected_by_the_parser():
    """A non-numeric rate list is an argparse usage error (exit 2), not a crash."""
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "sim", "--rates", "fast"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "expected comma-separated numbers" in proc.stderr
    assert "Traceback" not in proc.stderr
