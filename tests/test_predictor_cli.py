"""`cacheopt predictor train` and `eval`, and the learned predictor inside the simulator."""

import json

import pytest

from bench.simulate import SimSetup
from bench.sweep import SweepSpec, run_one
from cluster.cli import main
from replicas.engines.config import LLAMA3_8B_H100


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "text-length"
    assert main(["predictor", "train", "--out", str(path)]) == 0
    return path


def test_eval_reports_coverage_for_both_bounds(artifact, tmp_path):
    """eval writes coverage at p = 0.8..0.99 for conformal and hoeffding, plus the two references."""
    assert main(["predictor", "eval", "--artifact", str(artifact), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    methods = {(row["method"], row["confidence"]) for row in result["coverage"]}
    for method in ("conformal", "hoeffding"):
        assert {(method, p) for p in (0.8, 0.9, 0.95, 0.99)} <= methods
    assert ("max_tokens", None) in methods and ("no padding (S3)", None) in methods
    reserve_all = next(r for r in result["coverage"] if r["method"] == "max_tokens")
    assert reserve_all["coverage"] == 1.0
    assert result["mae_tokens"] < result["baseline_mae_tokens"]
    assert (tmp_path / "coverage.png").stat().st_size > 0


def test_eval_of_a_missing_artifact_is_a_clear_error(tmp_path, capsys):
    """A missing artifact exits 2 and says how to make one."""
    assert main(["predictor", "eval", "--artifact", str(tmp_path / "nothing")]) == 2
    assert "cacheopt predictor train" in capsys.readouterr().err


def test_learned_predictor_runs_in_the_simulator(artifact):
    """CacheOPT with the learned predictor replays AlpacaEval prompts it never saw: every
    request finishes or is shed after its bounded wait (1,024 blocks are contended)."""
    spec = SweepSpec(trace="alpaca", predictor="learned", artifact=artifact, policies=("cacheopt",), rates=(20.0,),
                     limit=300, setup=SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024), max_tokens=2048))
    row = run_one(spec, "cacheopt", 20.0, 0).row
    assert row["num_requests"] == 300
    assert row["num_finished"] + row["shed_share"] * 300 == 300 and row["num_finished"] > 200
    assert 0.0 < row["predictor_coverage"] < 1.0


def test_learned_predictor_needs_text():
    """The Azure traces carry no prompt text: asking for the learned predictor there is refused."""
    with pytest.raises(ValueError, match="prompt text"):
        SweepSpec(trace="conv", predictor="learned")
