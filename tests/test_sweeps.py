"""moebalance sweep: the built-in grids, resuming, the report files, and the CLI."""

import json

import pytest

from moebalance import cli
from moebalance.balancing import STRATEGIES
from moebalance.lab import sweeps
from moebalance.lab.runs import RunFolderError
from moebalance.train.config import apply_overrides, get_preset


@pytest.mark.parametrize("preset", ["smoke", "default"])
@pytest.mark.parametrize("grid", [g for g in sweeps.GRIDS if g != "batch-size"])  # its own: tests/test_batch_size.py
def test_every_grid_run_is_a_valid_config(grid, preset):
    base = get_preset(preset)
    for name, overrides in sweeps.grid_runs(grid, base).items():
        cfg = apply_overrides(base, overrides)
        assert cfg.train == base.train and cfg.data == base.data, name  # one seed, one data order


def test_grids_hold_the_paper_runs():
    base = get_preset("smoke")
    alpha = sweeps.grid_runs("alpha", base)
    coeffs = sorted(apply_overrides(base, o).balance.aux_loss_coeff for n, o in alpha.items() if n.startswith("aux"))
    assert coeffs == [0.0, 1e-4, 1e-3, 1e-2] and "loss_free_u_1e-3" in alpha
    rates = [apply_overrides(base, o).balance.bias_update_rate for o in sweeps.grid_runs("update-rate", base).values()]
    assert rates == [1e-4, 1e-3, 1e-2]
    strategies = {apply_overrides(base, o).balance.strategy for o in sweeps.grid_runs("strategies", base).values()}
    assert strategies == set(STRATEGIES)
    with pytest.raises(ValueError, match="grid"):
        sweeps.grid_runs("everything", base)


TINY = [
    "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "data.max_files=20", "train.max_steps=2",
    "train.warmup_steps=1", "train.batch_size=4", "train.seq_len=32", "train.eval_tokens=512", "train.tensorboard=false",
]


@pytest.mark.slow
def test_sweep_writes_reports_and_resumes(tmp_path, monkeypatch):
    two_runs = {"aux_alpha_1e-3": ["balance.strategy=aux_loss"], "loss_free": ["balance.strategy=loss_free"]}
    monkeypatch.setattr(sweeps, "grid_runs", lambda grid, base, *study: two_runs)
    base = apply_overrides(get_preset("smoke"), TINY)
    first = sweeps.sweep("alpha", base, tmp_path, progress=False, command="test")
    for name in ("sweep.json", "sweep.md", "tradeoff.png", "maxvio_batch.png", "val_loss.png", "expert_load.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert list(saved["runs"]) == list(two_runs) and not any(r["resumed"] for r in saved["runs"].values())
    assert {"val_ppl", "maxvio_global", "maxvio_batch_last", "balance"} <= set(saved["runs"]["loss_free"])
    # The expert-parallel replay of each run's recorded loads (moebalance.lab.replay).
    assert set(saved["ep_replay"]["runs"]) == set(two_runs)
    assert "Expert-parallel cost: a replay of the measured loads" in (tmp_path / "sweep.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("moebalance.train.loop.train", no_training)
    second = sweeps.sweep("alpha", base, tmp_path, progress=False, command="test")
    assert all(r["resumed"] for r in second["runs"].values())
    assert second["runs"]["loss_free"]["val_ppl"] == first["runs"]["loss_free"]["val_ppl"]
    # A changed config in the same folder is neither read back nor silently overwritten.
    changed = apply_overrides(base, ["train.seed=7"])
    with pytest.raises(RunFolderError, match="holds a run of a different config.*--overwrite"):
        sweeps.sweep("alpha", changed, tmp_path, progress=False, command="test")
    with pytest.raises(AssertionError, match="trained again"):  # --overwrite: trained again
        sweeps.sweep("alpha", changed, tmp_path, progress=False, command="test", overwrite=True)


def test_cli_takes_overrides_after_the_grid(capsys):
    assert cli.main(["sweep", "alpha", "--preset", "smoke", "--print-config", "train.max_steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 7
    with pytest.raises(SystemExit):
        cli.main(["sweep", "everything", "--preset", "smoke"])
    assert cli.main(["sweep", "alpha", "--preset", "smoke", "--bogus"]) == 2
