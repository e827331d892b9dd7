import numpy as np
import pytest
import torch

from moebalance.train.config import DataConfig
from moebalance.train.data import builtin_corpus_files, eval_batches, prepare_data, sample_batch, split_files


def test_builtin_corpus_is_the_stdlib_without_tests():
    root, rels = builtin_corpus_files()
    assert len(rels) > 100
    assert rels == sorted(rels)
    assert (root / "os.py").exists() and "os.py" in rels
    assert not any(part in ("test", "tests", "site-packages") for r in rels for part in r.split("/")[:-1])


def test_split_is_by_file_and_deterministic():
    rels = [f"pkg/mod{i}.py" for i in range(200)]
    train, val = split_files(rels, 0.1)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(rels)
    assert 5 <= len(val) <= 40
    assert split_files(list(reversed(rels)), 0.1)[1] == list(reversed(val))


def test_text_folder_is_tokenized_and_cached(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + 1\n" * 40)
    (corpus / "bad.bin").write_bytes(b"\xff\xfe\x00\x80" * 10)  # not UTF-8: skipped
    cfg = DataConfig(path=str(corpus), vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg)
    assert data.train.dtype == np.uint16 and len(data.train) > 100 and len(data.val) > 0
    assert int(data.train.max()) < data.vocab_size <= 300
    again = prepare_data(cfg)
    assert again.fingerprint == data.fingerprint
    assert np.array_equal(np.asarray(again.train), np.asarray(data.train))
    (corpus / "f0.txt").write_text("changed")
    assert prepare_data(cfg).fingerprint != data.fingerprint


def test_bin_files(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 50
    tokens.tofile(tmp_path / "train.bin")
    tokens[:300].tofile(tmp_path / "val.bin")
    data = prepare_data(DataConfig(path=str(tmp_path), bin_vocab_size=50))
    assert len(data.train) == 1000 and len(data.val) == 300 and data.vocab_size == 50
    with pytest.raises(ValueError, match="bin_vocab_size=40"):
        prepare_data(DataConfig(path=str(tmp_path), bin_vocab_size=40))
    with pytest.raises(ValueError, match="bin_vocab_size must be set"):
        prepare_data(DataConfig(path=str(tmp_path / "train.bin")))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="multiple of the uint16"):
        prepare_data(DataConfig(path=str(tmp_path / "odd.bin"), bin_vocab_size=50))


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="data.path"):
        prepare_data(DataConfig(path="/nonexistent/corpus"))


def test_batches():
    data = np.arange(1000, dtype=np.uint16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = sample_batch(data, 4, 16, g1)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, sample_batch(data, 4, 16, g2)[0])
    windows = list(eval_batches(data, 8, 10))
    assert sum(b[0].shape[0] for b in windows) == 99
    part = list(eval_batches(data, 8, 10, max_tokens=50))
    starts = torch.cat([b[0][:, 0] for b in part])
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == 980  # spread over the split


def test_fingerprint_sees_contents(tmp_path):
    from moebalance.train.data import fingerprint_files

    (tmp_path / "a.txt").write_text("alpha")
    before = fingerprint_files(tmp_path, ["a.txt"])
    (tmp_path / "a.txt").write_text("omega")  # same name, same size
    assert fingerprint_files(tmp_path, ["a.txt"]) != before
