import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebalance.cli import main
from moebalance.lab.compare import render_compare_markdown
from moebalance.lab.replay import rank_loads, replay_loads, replay_markdown, replay_runs
from moebalance.metrics import max_violation


def test_rank_loads_are_contiguous_sums():
    loads = np.arange(8.0).reshape(1, 1, 8)
    np.testing.assert_array_equal(rank_loads(loads, 2), [[[0 + 1 + 2 + 3, 4 + 5 + 6 + 7]]])
    np.testing.assert_array_equal(rank_loads(loads, 4), [[[1, 5, 9, 13]]])


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_balanced_loads_cost_nothing_and_one_hot_loads_cost_r(num_ranks):
    balanced = np.full((3, 2, 8), 5.0)
    res = replay_loads(balanced, num_ranks)
    assert res.step_time_factor == pytest.approx(1.0) and res.waiting_fraction == pytest.approx(0.0)
    collapsed = np.zeros((3, 2, 8))
    collapsed[..., 0] = 40.0  # every token to expert 0: its rank works, R-1 ranks wait
    res = replay_loads(collapsed, num_ranks)
    assert res.step_time_factor == pytest.approx(num_ranks)
    assert res.waiting_fraction == pytest.approx(1 - 1 / num_ranks)


def test_one_expert_per_rank_is_one_plus_maxvio():
    loads = np.array([[[10.0, 30.0, 20.0, 20.0]]])
    res = replay_loads(loads, 4)
    assert res.step_time_factor == pytest.approx(1 + max_violation(torch.tensor(loads[0, 0])).item())


def test_factor_weights_steps_by_their_time_and_reports_last_half():
    # step 1 balanced, step 2: one rank has 3x the mean load of the other
    loads = np.array([[[10.0, 10.0]], [[30.0, 10.0]]])
    res = replay_loads(loads, 2)
    assert res.step_time_factor == pytest.approx((10 + 30) / (10 + 20))
    assert res.step_time_factor_last_half == pytest.approx(30 / 20)
    assert res.worst_step_factor == pytest.approx(1.5)
    assert res.steps == 2


@pytest.mark.parametrize("bad", [3, 16, 0])
def test_rank_counts_that_do_not_divide_the_experts_are_refused(bad):
    with pytest.raises(ValueError, match="num_ranks"):
        replay_loads(np.ones((1, 1, 8)), bad)


def test_malformed_loads_are_refused():
    with pytest.raises(ValueError, match="steps"):
        replay_loads(np.ones((1, 8)), 2)
    with pytest.raises(ValueError, match=">= 0"):
        replay_loads(-np.ones((1, 1, 8)), 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=16, max_size=16), st.integers(1, 3))
def test_finer_sharding_never_costs_less(row, steps):
    # Splitting every rank's experts in two can only raise max/mean: refinements are monotone.
    loads = np.tile(np.asarray(row, dtype=np.float64), (steps, 1, 1))
    if loads.sum() == 0:
        return
    factors = [replay_loads(loads, r).step_time_factor for r in (1, 2, 4, 8, 16)]
    assert factors[0] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(factors, factors[1:]))


def _fake_run(folder, loads_per_step):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for i, loads in enumerate(loads_per_step):
            f.write(json.dumps({"kind": "train", "step": i + 1, "loads": loads}) + "\n")
        f.write(json.dumps({"kind": "eval", "step": len(loads_per_step), "loads": loads_per_step[-1]}) + "\n")


def test_replay_runs_table_and_cli(tmp_path, capsys):
    _fake_run(tmp_path / "balanced", [[[4] * 16, [4] * 16]] * 3)
    _fake_run(tmp_path / "collapsed", [[[64] + [0] * 15, [4] * 16]] * 3)
    replay = replay_runs({"balanced": tmp_path / "balanced", "collapsed": tmp_path / "collapsed"}, (8, 64))
    res = replay["runs"]["collapsed"]
    assert [r["num_ranks"] for r in res["results"]] == [8] and res["not_replayable"] == [64]
    # layer 0: busiest rank 64 vs mean 8; layer 1: 8 vs 8 -> (64 + 8) / (8 + 8)
    assert res["results"][0]["step_time_factor"] == pytest.approx(72 / 16)
    text = "\n".join(replay_markdown(replay))
    assert "| collapsed | 8 | 2 | 4.500 |" in text and "Not replayable with 16 experts: 64 EP ranks" in text
    assert main(["replay", str(tmp_path / "balanced"), "--ranks", "2,64"]) == 0
    out = capsys.readouterr().out
    assert "| balanced | 2 | 8 | 1.000 |" in out
    assert main(["replay", str(tmp_path / "nothing-here")]) == 2


@pytest.mark.parametrize(
    "loads_per_step",
    [
        [[[4] * 16], [[4] * 8]],  # the expert count changes between steps
        [[[4] * 16, [4] * 15]],  # ragged layers
        [[4] * 16],  # a step's loads are not [layers][experts]
        [[["x"] * 16]],
    ],
)
def test_recorded_loads_of_the_wrong_shape_are_named(tmp_path, loads_per_step):
    _fake_run(tmp_path / "run", loads_per_step)
    with pytest.raises(ValueError, match=r"metrics.jsonl' line \d+ holds 'loads' (of shape|that are not a \[layers\]\[experts\])"):
        replay_runs({"run": tmp_path / "run"}, (2,))


def test_compare_report_includes_the_replay_table(tmp_path):
    _fake_run(tmp_path / "loss_free", [[[4] * 16]] * 2)
    run = {
        "val_loss": 1.0,
        "val_ppl": 2.7,
        "maxvio_global": 0.1,
        "maxvio_batch_last": 0.2,
        "tokens_per_s": 100.0,
        "maxvio_global_per_layer": [0.1],
        "run_dir": "loss_free",
    }
    report = {
        "command": "moebalance compare",
        "config": {
            "model": {"n_layers": 1, "d_model": 8, "num_experts": 16, "top_k": 2, "score_func": "sigmoid", "d_expert": 8},
            "train": {"max_steps": 2, "batch_size": 1, "grad_accum": 1, "seq_len": 4, "seed": 0},
        },
        "data": {"source": "x", "train_tokens": 1, "val_tokens": 1},
        "corpus_fingerprint": "f",
        "runs": {"loss_free": run},
        "ep_replay": replay_runs({"loss_free": tmp_path / "loss_free"}, (8,)),
    }
    md = render_compare_markdown(report)
    assert "Expert-parallel cost: a replay of the measured loads" in md
    assert "| loss_free | 8 | 2 | 1.000 | 0.0% |" in md


def test_the_note_on_left_out_rank_counts_says_why_for_each():
    # Issue 22: "Not replayable with 16 experts: 64, 256 EP ranks" appeared with no reason that fit.
    from moebalance.lab.replay import not_replayable_note

    note = not_replayable_note(16, [3, 64, 256])
    assert "64 and 256 ranks exceed the 16 experts (each rank holds at least one whole expert)" in note
    assert "16 experts do not split evenly over 3 ranks" in note
    stored = (Path(__file__).parents[1] / "docs" / "results" / "demo" / "report.md").read_text()
    assert not_replayable_note(16, [64, 256]) in stored
