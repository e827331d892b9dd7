"""``moebalance compare``: several seeds with their spread, resuming after an interruption, and
never overwriting a finished run or a folder of another config (moebalance.lab.compare / runs / seeds)."""

import json
import math
from pathlib import Path

import pytest

from moebalance import cli
from moebalance.lab import compare as compare_mod
from moebalance.lab.runs import RunFolderError, run_state
from moebalance.lab.seeds import ppl_noise_verdict, seed_summary
from moebalance.train import loop
from moebalance.train.config import apply_overrides, get_preset

TINY = [
    "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "data.max_files=20", "train.max_steps=8",
    "train.warmup_steps=1", "train.batch_size=4", "train.seq_len=32", "train.eval_tokens=512",
    "train.eval_every=4", "train.tensorboard=false", "train.threads=1",
]


def _records(ppl):
    """Records of loss_free and aux_loss over seeds 0.. from {strategy: [ppl per seed]}."""
    return {
        f"seed_{i}/{s}": {"balance": {"strategy": s}, "seed": i, "val_ppl": p, "maxvio_global": 0.1, "maxvio_batch_last": 0.5}
        for s, values in ppl.items()
        for i, p in enumerate(values)
    }


def test_noise_rule():
    within = seed_summary(_records({"loss_free": [89.18, 89.67, 92.32], "aux_loss": [91.31, 89.59, 93.51]}))
    v = ppl_noise_verdict(within)
    assert within["loss_free"]["val_ppl"]["std"] == pytest.approx(1.689, abs=1e-3)
    assert v["significant"] is False and "not established" in v["text"] and v["a_lower"] == 2
    assert v["paired_diffs"] == pytest.approx([-2.13, 0.08, -1.19])
    clear = seed_summary(_records({"loss_free": [80.0, 80.5, 81.0], "aux_loss": [90.0, 90.4, 91.0]}))
    assert ppl_noise_verdict(clear)["significant"] is True
    one = ppl_noise_verdict(seed_summary(_records({"loss_free": [80.0], "aux_loss": [90.0]})))
    assert one["significant"] is None and "One seed" in one["text"]


def test_the_noise_statement_is_a_paired_t_test_as_the_readme_says():
    # Issue 22: the report said "larger than the noise" (2 x pooled std) where the README said
    # "not established (paired t-test p = 0.10)". Reference values: scipy.stats.ttest_1samp.
    from moebalance.lab.seeds import paired_t_test

    assert paired_t_test([1.33, 0.61, 2.33]) == pytest.approx((2.854033, 0.103971), abs=1e-6)
    assert paired_t_test([1, 2, 3, 4, 5.5]) == pytest.approx((3.969143, 0.016551), abs=1e-6)
    assert paired_t_test([2.0, 2.0]) == (math.inf, 0.0)
    demo = json.loads((Path(__file__).parents[1] / "docs" / "results" / "demo" / "report.json").read_text())
    v = ppl_noise_verdict(demo["seed_summary"])
    assert f"p = {v['p']:.2f}" == "p = 0.10" and not v["significant"]
    assert "paired t-test" in v["text"] and "t = 2.86, p = 0.10" in v["text"]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "paired t-test" in readme and "t = 2.86,\n  p = 0.10" in readme
    assert v["text"] in (Path(__file__).parents[1] / "docs" / "results" / "demo" / "report.md").read_text()


def test_seed_configs_share_a_seed_within_and_differ_across():
    runs = compare_mod.seed_configs(get_preset("smoke"), 3)
    assert list(runs) == [f"seed_{1234 + i}/{s}" for i in range(3) for s in ("loss_free", "aux_loss")]
    assert runs["seed_1235/loss_free"].train.seed == runs["seed_1235/aux_loss"].train.seed == 1235
    assert list(compare_mod.seed_configs(get_preset("smoke"), 1)) == ["loss_free", "aux_loss"]
    with pytest.raises(ValueError, match=r"--seeds must be an integer in \[1, 1000\]"):
        compare_mod.seed_configs(get_preset("smoke"), 0)
    assert compare_mod.resumable(get_preset("default")).train.checkpoint_every == 60


def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_mod, "compare", interrupted)
    assert cli.main(["compare", "--preset", "smoke", "--out", str(tmp_path / "c")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the same command again to continue" in err[0]


@pytest.mark.slow
def test_compare_resumes_after_an_interruption_and_never_overwrites(tmp_path, monkeypatch):
    base = apply_overrides(get_preset("smoke"), TINY + ["train.checkpoint_every=2"])
    out = tmp_path / "cmp"
    save = loop.CheckpointDir.save

    def save_then_interrupt(self, step, state):  # Ctrl-C right after aux_loss's step-4 checkpoint
        path = save(self, step, state)
        if self.folder.parent.name == "aux_loss" and step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop.CheckpointDir, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        compare_mod.compare(base, out, progress=False, command="test")
    monkeypatch.setattr(loop.CheckpointDir, "save", save)
    finished = (out / "loss_free" / "summary.json").read_bytes()
    assert not (out / "aux_loss" / "summary.json").exists()
    cfgs = compare_mod.seed_configs(compare_mod.prepare_base(base)[1], 1)
    assert run_state(out / "aux_loss", cfgs["aux_loss"]) == "resume"

    report = compare_mod.compare(base, out, progress=False, command="test")
    assert report["runs"]["loss_free"]["state"] == "finished" and report["runs"]["aux_loss"]["state"] == "resume"
    assert (out / "loss_free" / "summary.json").read_bytes() == finished  # read back, not retrained
    steps = [r["step"] for r in map(json.loads, (out / "aux_loss" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # steps 1-4 from the first attempt, 5-8 resumed, none twice
    assert report["runs"]["aux_loss"]["steps"] == 8

    # Another config in the same folders: refused before anything trains; --overwrite replaces.
    with pytest.raises(RunFolderError, match=r"holds a run of a different config.*differs in balance\.aux_loss_coeff"):
        compare_mod.compare(apply_overrides(base, ["balance.aux_loss_coeff=1e-2"]), out, progress=False)
    assert (out / "loss_free" / "summary.json").read_bytes() == finished
    # A finished run is not read back under a config that would have recorded it differently
    # (the report would show its curves under the wrong settings); a thread count is harmless.
    with pytest.raises(RunFolderError, match=r"differs in train\.eval_every"):
        compare_mod.compare(apply_overrides(base, ["train.eval_every=3"]), out, progress=False)
    assert compare_mod.compare(apply_overrides(base, ["train.threads=2"]), out, progress=False)["runs"]["loss_free"]["state"] == "finished"
    rc = cli.main(["compare", "--preset", "smoke", "--out", str(out), "--no-progress", *TINY, "train.seed=5"])
    assert rc == 2  # a path that cannot serve: the one-line refusal, before anything trains
    assert (out / "loss_free" / "summary.json").read_bytes() == finished


@pytest.mark.slow
def test_compare_with_seeds_reports_mean_and_spread(tmp_path):
    base = apply_overrides(get_preset("smoke"), TINY)
    report = compare_mod.compare(base, tmp_path, progress=False, command="test", seeds=2)
    assert report["seeds"] == [1234, 1235]
    assert set(report["runs"]) == {f"seed_{x}/{s}" for s in ("loss_free", "aux_loss") for x in (1234, 1235)}
    for strategy in ("loss_free", "aux_loss"):
        stats = report["seed_summary"][strategy]
        assert stats["seeds"] == [1234, 1235]
        for metric in ("val_ppl", "maxvio_global", "maxvio_batch_last"):
            assert len(stats[metric]["values"]) == 2 and stats[metric]["std"] is not None
    assert isinstance(report["ppl_noise"]["significant"], bool)
    md = (tmp_path / "report.md").read_text()
    assert "Over 2 seeds (mean ± sample std)" in md and "Rule: paired t-test on the per-seed differences" in md
    for seed in (1234, 1235):  # the same batches for both strategies within a seed
        first = [json.loads((tmp_path / f"seed_{seed}" / s / "metrics.jsonl").read_text().splitlines()[0]) for s in ("loss_free", "aux_loss")]
        assert first[0]["loss"] == first[1]["loss"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["ppl_noise"]["rule"] == report["ppl_noise"]["rule"]


def test_overwrite_never_clears_a_run_folder_whose_config_json_is_not_a_run(tmp_path, capsys):
    """``compare --overwrite`` where a run's folder holds another tool's ``config.json``: exit 2
    before anything trains, and the folder is left as it is."""
    folder = tmp_path / "cmp" / "loss_free"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('["not", "a", "run"]')
    (folder / "metrics.jsonl").write_text("theirs")
    base = apply_overrides(get_preset("smoke"), TINY)
    plan = {name: (cfg, tmp_path / "cmp" / name) for name, cfg in compare_mod.seed_configs(base, 1).items()}
    with pytest.raises(RunFolderError, match="is not a moebalance run config.*not cleared even with --overwrite"):
        compare_mod.check_run_folders(plan, overwrite=True)
    rc = cli.main(["compare", "--preset", "smoke", "--out", str(tmp_path / "cmp"), "--no-progress", "--overwrite", *TINY])
    assert rc == 2 and "not cleared even with --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.jsonl"]
    assert (folder / "metrics.jsonl").read_text() == "theirs"


@pytest.mark.slow
def test_more_seeds_after_one_reuse_the_first_seeds_runs(tmp_path, monkeypatch):
    # Issue 22: `make demo ARGS="--seeds 3"` after a plain `make demo` retrained seed 1234 (about
    # 9 minutes) although its two runs were there with the same config.
    base = apply_overrides(get_preset("smoke"), TINY)
    trained = []
    train = loop.train

    def counting(cfg, out_dir, **kw):
        trained.append(Path(out_dir).relative_to(tmp_path).as_posix())
        return train(cfg, out_dir, **kw)

    monkeypatch.setattr(loop, "train", counting)
    compare_mod.compare(base, tmp_path / "a", progress=False, command="test")
    assert trained == ["a/loss_free", "a/aux_loss"]
    report = compare_mod.compare(base, tmp_path / "a", progress=False, command="test", seeds=2)
    assert trained[2:] == ["a/seed_1235/loss_free", "a/seed_1235/aux_loss"]
    first = report["runs"]["seed_1234/loss_free"]
    assert first["state"] == "finished" and first["run_dir"] == "loss_free"
    # 8 steps at u = 1e-3: the report says the bias could not travel, beside the numbers.
    assert "Too short for Loss-Free to balance" in (tmp_path / "a" / "report.md").read_text()
    assert not (tmp_path / "a" / "seed_1234").exists()
    # And the other way round: one seed after several reads seed 1234 where --seeds put it.
    compare_mod.compare(base, tmp_path / "b", progress=False, command="test", seeds=2)
    del trained[:]
    report = compare_mod.compare(base, tmp_path / "b", progress=False, command="test")
    assert trained == [] and report["runs"]["aux_loss"]["run_dir"] == "seed_1234/aux_loss"


def test_a_run_with_its_final_checkpoint_but_no_summary_resumes(tmp_path):
    # The final state is in checkpoint.pt only (no periodic copy of it): a run killed between that
    # write and summary.json resumes from it (writing the summary), not retrained from step 0.
    cfg = compare_mod.resumable(apply_overrides(get_preset("smoke"), TINY))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert run_state(run, cfg) == "restart"
    (run / "checkpoint.pt").write_bytes(b"the final state")
    assert run_state(run, cfg) == "resume"
