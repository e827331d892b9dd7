"""``moebalance compare --runs``: the global-batch auxiliary loss and DeepSeek-V3's pairing as
compare runs beside the paper's two (issue 21, item 2)."""

import json

import pytest

from moebalance.cli import main
from moebalance.lab import compare as compare_mod
from moebalance.lab.seeds import seed_summary
from moebalance.train.config import get_preset


def test_default_runs_are_the_papers_two():
    assert list(compare_mod.seed_configs(get_preset("smoke"), 1)) == ["loss_free", "aux_loss"]


def test_global_aux_loss_and_deepseek_v3_pairing_are_runs():
    cfgs = compare_mod.seed_configs(get_preset("smoke"), 2, runs=("loss_free", "global_aux_loss", "deepseek_v3"))
    assert list(cfgs) == [f"seed_{s}/{n}" for s in (1234, 1235) for n in ("loss_free", "global_aux_loss", "deepseek_v3")]
    g, d = cfgs["seed_1234/global_aux_loss"].balance, cfgs["seed_1234/deepseek_v3"].balance
    assert (g.strategy, g.aux_loss_coeff) == ("global_aux_loss", 1e-3)
    assert (d.strategy, d.seq_aux_coeff, d.bias_update) == ("deepseek_v3", 1e-4, "sign")


@pytest.mark.parametrize("runs,match", [([], "at least one"), (["loss_free", "magic"], "unknown run 'magic'"), (["aux_loss", "aux_loss"], "twice")])
def test_check_runs_refuses_bad_lists(runs, match):
    with pytest.raises(ValueError, match=match):
        compare_mod.check_runs(runs)


def test_cli_refuses_unknown_runs_and_replaced_overrides(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert main(["compare", "--preset", "smoke", "--out", out, "--runs", "loss_free,pid"]) == 2
    assert "unknown run 'pid'" in capsys.readouterr().err
    code = main(["compare", "--preset", "smoke", "--out", out, "--runs", "deepseek_v3", "balance.seq_aux_coeff=1e-3"])
    assert code == 2
    assert "run 'deepseek_v3' sets balance.seq_aux_coeff=1e-4" in capsys.readouterr().err
    # The default runs do not set it, so the same override passes their check.
    assert main(["compare", "--preset", "smoke", "--out", out, "balance.seq_aux_coeff=1e-3", "--print-config"]) == 0


def test_seed_summary_groups_by_run_name():
    rec = lambda run, strategy, seed, ppl: {  # noqa: E731
        "run": run, "balance": {"strategy": strategy}, "seed": seed, "val_ppl": ppl, "val_loss": 1.0,
        "maxvio_global": 0.1, "maxvio_batch_last": 0.2,
    }
    records = {f"seed_{s}/{r}": rec(r, "loss_free", s, 80.0 + s) for s in (1, 2) for r in ("loss_free", "quantile")}
    assert set(seed_summary(records)) == {"loss_free", "quantile"}


@pytest.mark.slow
def test_compare_trains_the_listed_runs(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "smoke", "--out", str(out), "--no-progress", "--seeds", "2",
            "--runs", "loss_free,global_aux_loss,deepseek_v3", "train.max_steps=2", "train.eval_every=2", "train.threads=1"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["seed_summary"]) == {"loss_free", "global_aux_loss", "deepseek_v3"}
    assert "ppl_noise" not in report  # no aux_loss run
    assert set(report["ppl_noise_vs"]) == {"global_aux_loss", "deepseek_v3"}
    assert report["runs"]["seed_1234/deepseek_v3"]["balance"]["seq_aux_coeff"] == 1e-4
    assert "global_aux_loss" in (out / "report.md").read_text()
