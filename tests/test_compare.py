import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = (
    "val_loss",
    "val_ppl",
    "maxvio_global",
    "maxvio_global_per_layer",
    "maxvio_batch_last",
    "tokens_per_s",
    "steps",
    "tokens",
)


@pytest.mark.slow
def test_smoke_compare_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "moebalance", "compare", "--preset", "smoke", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"loss_free", "aux_loss"}
    assert len(report["corpus_fingerprint"]) == 16
    assert report["config"]["model"]["num_experts"] == 8
    for run in report["runs"].values():
        for key in REQUIRED:
            assert key in run, key
        assert len(run["maxvio_global_per_layer"]) == report["config"]["model"]["n_layers"]
        assert run["steps"] == report["config"]["train"]["max_steps"]
        assert run["val_ppl"] > 1
    assert report["runs"]["loss_free"]["balance"]["strategy"] == "loss_free"
    assert report["runs"]["aux_loss"]["balance"]["aux_loss_coeff"] == 1e-3
    md = (out / "report.md").read_text()
    assert "| loss_free |" in md and "maxvio_batch.png" in md
    for png in ("maxvio_batch.png", "val_loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # both runs started from the same weights and saw the same data
    lf = [json.loads(line) for line in (out / "loss_free" / "metrics.jsonl").read_text().splitlines()]
    aux = [json.loads(line) for line in (out / "aux_loss" / "metrics.jsonl").read_text().splitlines()]
    assert lf[0]["loss"] == aux[0]["loss"]
    assert list((out / "loss_free" / "tb").iterdir())
    assert (out / "loss_free" / "checkpoint.pt").exists()


def test_cli_rejects_bad_key(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "moebalance", "train", "--preset", "smoke", "--out", str(tmp_path), "model.top_k=0"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "model.top_k must be in [1, num_experts=8]" in proc.stderr


def test_compare_validates_both_runs_before_training():
    from moebalance.lab.compare import compare_configs
    from moebalance.train.config import apply_overrides, get_preset

    base = apply_overrides(get_preset("smoke"), ["model.routing=expert_choice", "balance.strategy=none"])
    with pytest.raises(ValueError, match="balance.strategy"):
        compare_configs(base)
