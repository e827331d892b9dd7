"""moebalance.lab.floor: bias-only updates on frozen weights, and the validation split's own floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moebalance.balancing import LossFreeBalancer
from moebalance.lab import floor
from moebalance.train.config import preset_config
from moebalance.train.loop import evaluate, train


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(preset_config("smoke", ["train.max_steps=6", "train.eval_every=6", "train.tensorboard=false"]), out, progress=False)
    return floor.load_frozen(out)


def test_only_the_bias_moves(frozen):
    model, cfg, data = frozen
    weights = {k: v.clone() for k, v in model.state_dict().items() if "bias" not in k}
    before = torch.stack([r.expert_bias.clone() for r in model.routers])
    curve = floor.bias_only_updates(model, data, cfg, LossFreeBalancer(1e-2, "sign"), 2, 4, {0, 2, 4}, eval_tokens=1024)
    assert [r["step"] for r in curve] == [0, 2, 4]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert not torch.equal(before, torch.stack([r.expert_bias for r in model.routers]))


def test_the_sampling_floor_reads_the_same_loads_as_evaluate(frozen):
    model, cfg, data = frozen
    res = floor.sampling_floor(model, data, cfg, eval_tokens=2048, draws=50)
    assert res["measured"] == pytest.approx(evaluate(model, data, cfg, max_tokens=2048)["maxvio_global"], abs=1e-5)
    loads, offsets = floor.window_loads(model, data, cfg, 2048)
    assert res["chunks"] == len(np.unique(offsets // cfg.data.val_chunk_tokens)) and res["tokens"] == len(offsets) * cfg.train.seq_len
    assert loads.shape[0] == len(offsets) and (loads.sum(-1) == cfg.train.seq_len * cfg.model.top_k).all()
    assert 0 < res["floor"] and res["std"] >= 0
    # fewer chunks, a higher floor: the estimate scatters more
    assert floor.sampling_floor(model, data, cfg, eval_tokens=512, draws=50)["floor"] > res["floor"]
    assert floor.sampling_floor(model, data, cfg, eval_tokens=2048, draws=50) == floor.sampling_floor(model, data, cfg, eval_tokens=2048, draws=50)
