"""The validation split (``data.val_split``): held-out chunks of the training distribution that
share no token position with training, deterministic from the split seed and the data fingerprint."""

import json

import numpy as np
import pytest

from moebalance.lab.compare import render_compare_markdown
from moebalance.train.config import DataConfig
from moebalance.train.data import _encode, _read_texts, chunk_runs, chunk_split, prepare_data, text_corpus_files


def _positions(runs):
    return np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, np.int64)


@pytest.mark.parametrize("num_tokens,chunk", [(10_000, 512), (10_240, 512), (1_025, 16), (40, 20)])
def test_chunk_split_shares_no_position_and_covers_the_stream(num_tokens, chunk):
    is_val = chunk_split(num_tokens, chunk, 0.05, seed=0, fingerprint="abc")
    train = _positions(chunk_runs(is_val, chunk, num_tokens, val=False))
    val = _positions(chunk_runs(is_val, chunk, num_tokens, val=True))
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(num_tokens))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # stream order kept
    assert 1 <= is_val.sum() < len(is_val)


def test_chunk_split_is_deterministic_and_spread_over_the_corpus():
    a = chunk_split(1_000_000, 512, 0.05, seed=0, fingerprint="f1")
    assert np.array_equal(a, chunk_split(1_000_000, 512, 0.05, seed=0, fingerprint="f1"))
    assert not np.array_equal(a, chunk_split(1_000_000, 512, 0.05, seed=1, fingerprint="f1"))
    assert not np.array_equal(a, chunk_split(1_000_000, 512, 0.05, seed=0, fingerprint="f2"))
    assert a.sum() == round(0.05 * len(a))
    # Drawn across the whole stream: every tenth of it holds some validation chunks.
    assert all(part.sum() > 0 for part in np.array_split(a, 10))


def test_too_few_chunks_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than 2 chunks of data.val_chunk_tokens=512"):
        chunk_split(300, 512, 0.05, 0, "f")


def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"f{i}.txt").write_text("".join(f"def fn_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)))
    return corpus


def test_prepared_chunks_are_exactly_the_held_out_positions(tmp_path):
    from tokenizers import Tokenizer

    corpus = _corpus(tmp_path)
    cfg = DataConfig(path=str(corpus), vocab_size=300, val_chunk_tokens=64, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg)
    assert data.val_split == "chunks" and data.describe()["val_split"] == "chunks"
    # Rebuild the whole token stream with the cached tokenizer: the splits are its disjoint parts.
    root, rels = text_corpus_files(corpus)
    stream = _encode(Tokenizer.from_file(data.tokenizer_path), _read_texts(root, rels)[0])
    is_val = chunk_split(len(stream), 64, 0.1, 0, data.fingerprint)
    train_pos = _positions(chunk_runs(is_val, 64, len(stream), val=False))
    val_pos = _positions(chunk_runs(is_val, 64, len(stream), val=True))
    assert np.intersect1d(train_pos, val_pos).size == 0
    assert np.array_equal(np.asarray(data.train), stream[train_pos])
    assert np.array_equal(np.asarray(data.val), stream[val_pos])
    assert len(data.train) + len(data.val) == len(stream)


def test_split_settings_are_in_the_cache_key(tmp_path):
    corpus = _corpus(tmp_path)
    base = dict(path=str(corpus), vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    chunks = prepare_data(DataConfig(**base, val_chunk_tokens=64))
    other_seed = prepare_data(DataConfig(**base, val_chunk_tokens=64, split_seed=7))
    other_len = prepare_data(DataConfig(**base, val_chunk_tokens=32))
    files = prepare_data(DataConfig(**base, val_split="files"))
    assert files.val_split == "files"
    caches = {d.tokenizer_path for d in (chunks, other_seed, other_len, files)}
    assert len(caches) == 4
    assert not np.array_equal(np.asarray(chunks.val), np.asarray(other_seed.val))


def test_single_bin_file_is_split_into_chunks(tmp_path):
    tokens = (np.arange(20_000) * 7919 % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "all.bin")
    cfg = DataConfig(path=str(tmp_path / "all.bin"), bin_vocab_size=1000, val_chunk_tokens=100, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg)
    is_val = chunk_split(len(tokens), 100, 0.05, 0, data.fingerprint)
    assert np.array_equal(np.asarray(data.val), tokens[_positions(chunk_runs(is_val, 100, len(tokens), True))])
    assert np.array_equal(np.asarray(data.train), tokens[_positions(chunk_runs(is_val, 100, len(tokens), False))])
    tail = prepare_data(DataConfig(path=str(tmp_path / "all.bin"), bin_vocab_size=1000, val_split="files"))
    assert tail.val_split == "files" and np.array_equal(np.asarray(tail.val), tokens[19_000:])


def test_file_split_is_reported_as_distribution_shift():
    run = {"val_loss": 4.0, "val_ppl": 54.6, "maxvio_global": 1.2, "maxvio_global_per_layer": [1.2],
           "maxvio_batch_last": 0.7, "tokens_per_s": 1000.0, "run_dir": "loss_free"}
    report = {
        "command": "moebalance compare data.val_split=files",
        "config": json.loads(json.dumps({"model": {"n_layers": 1, "d_model": 8, "num_experts": 4, "top_k": 1,
                                                   "score_func": "sigmoid", "d_expert": 8},
                                         "train": {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 8, "seed": 0}})),
        "data": {"source": "x", "train_tokens": 10, "val_tokens": 10, "val_split": "files"},
        "corpus_fingerprint": "fp",
        "runs": {"loss_free": run, "aux_loss": dict(run, run_dir="aux_loss")},
    }
    md = render_compare_markdown(report)
    assert "MaxVio_global under distribution shift" in md and "not the paper's metric" in md
    report["data"]["val_split"] = "chunks"
    assert "distribution shift" not in render_compare_markdown(report)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["chunks", "files"])
def test_training_summary_names_the_split(tmp_path, split):
    from moebalance.train.config import apply_overrides, get_preset
    from moebalance.train.loop import train

    cfg = apply_overrides(get_preset("smoke"), ["train.max_steps=2", "train.warmup_steps=1", "train.threads=1", "train.tensorboard=false", f"data.val_split={split}"])
    train(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_split"] == split
    assert ("maxvio_global_shift" in summary) == (split == "files")
