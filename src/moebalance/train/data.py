"""Training text: the built-in corpus, user text, pre-tokenized ``.bin`` files, and batching.

The built-in corpus is the Python standard library of the interpreter that runs the job (every
``*.py`` under the stdlib directory, without ``site-packages`` and test folders): real text that is
on every machine, so nothing is downloaded. Files are taken in sorted order.

Validation is held out in one of two ways (``data.val_split``, docs/data.md):

* ``"chunks"`` (default): a byte-level BPE (Hugging Face ``tokenizers``) is trained on all files,
  the files are encoded into one token stream (each followed by ``<|endoftext|>``), the stream is
  cut into chunks of ``data.val_chunk_tokens`` tokens and ``data.val_fraction`` of the chunks,
  drawn from ``data.split_seed`` and the corpus fingerprint, are the validation split. Validation
  is the training distribution, and no token position is in both splits (:func:`chunk_split`).
* ``"files"``: whole files are held out (a file's split depends only on a hash of its relative
  path; a corpus of one file is split by lines, its last lines held out) and the BPE is trained on
  the training files. Validation is then another distribution whenever files differ.

Both splits are stored as ``uint16`` token arrays read back as numpy memmaps, in a cache directory
keyed by the corpus fingerprint (hash of the file list, sizes and contents), the vocabulary size
and the split settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moebalance.parallel.process import DistContext, shard_rows
from moebalance.train.checkpoint import current_umask, folder_problem
from moebalance.train.config import DataConfig

log = logging.getLogger(__name__)

__all__ = [
    "TokenData",
    "batch_at",
    "check_data",
    "chunk_runs",
    "chunk_split",
    "eval_batches",
    "eval_window_offsets",
    "iter_rank_batches",
    "prepare_data",
    "sample_batch",
    "sample_local_batch",
]

EOT = "<|endoftext|>"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_CACHE_VERSION = 2


@dataclass
class TokenData:
    """Tokenized train and validation splits.

    Attributes:
        train, val: 1-D ``uint16`` arrays (numpy memmaps) of token ids.
        vocab_size: number of token ids the model must embed.
        fingerprint: hex digest of the source (file list, sizes and contents, or the ``.bin`` files).
        source: a human description of where the text came from.
        num_files: (train files, validation files) for text corpora (with ``val_split="chunks"`` both
            are every file: the chunks are drawn from all of them), ``None`` for ``.bin`` data.
        tokenizer_path: the BPE ``tokenizer.json`` (``None`` for ``.bin`` data).
        val_split: how validation was held out: ``"chunks"`` (same distribution), ``"files"``
            (whole files or the tail of one text/``.bin`` file: a distribution shift) or
            ``"given"`` (a ``train.bin``/``val.bin`` folder: the user's own split).
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    fingerprint: str
    source: str
    num_files: tuple[int, int] | None = None
    tokenizer_path: str | None = None
    val_split: str = "chunks"

    def describe(self) -> dict:
        return {
            "val_split": self.val_split,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "train_tokens": int(len(self.train)),
            "val_tokens": int(len(self.val)),
            "num_files": list(self.num_files) if self.num_files else None,
        }


def stdlib_dir() -> Path:
    """The standard-library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def builtin_corpus_files(max_files: int = 0) -> tuple[Path, list[str]]:
    """Sorted relative paths of the built-in corpus's files (first ``max_files`` if > 0)."""
    root = stdlib_dir()
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not (_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
    )
    return root, rels[:max_files] if max_files else rels


def text_corpus_files(path: Path, max_files: int = 0) -> tuple[Path, list[str]]:
    """A text file, or every regular file under a folder (sorted), as ``(root, relative paths)``."""
    if path.is_file():
        return path.parent, [path.name]
    if not path.is_dir():
        raise FileNotFoundError(f"data.path {str(path)!r} is neither a file nor a folder")
    rels = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not rels:
        raise ValueError(f"data.path {str(path)!r} holds no files")
    return path, rels[:max_files] if max_files else rels


def _is_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split_files(rels: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split by file: validation files are those whose path hash falls under ``val_fraction``.

    At least one file goes to each side when there are two or more files.
    """
    val = [r for r in rels if _is_val(r, val_fraction)]
    train = [r for r in rels if not _is_val(r, val_fraction)]
    if len(rels) >= 2 and not val:
        val, train = train[-1:], train[:-1]
    if len(rels) >= 2 and not train:
        train, val = val[:1], val[1:]
    return train, val


def split_lines(text: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """Split one text at the line boundary nearest ``1 - val_fraction`` of its characters.

    Returns ``([train_text], [val_text])``; each side keeps at least one line when the text has two.

    Raises:
        ValueError: the text has fewer than 2 non-empty lines (nothing to hold out).
    """
    lines = text.splitlines(keepends=True)
    if sum(1 for line in lines if line.strip()) < 2:
        raise ValueError("a single-file corpus needs at least 2 non-empty lines to split train/validation")
    ends = np.cumsum([len(line) for line in lines])
    cut = int(np.searchsorted(ends, (1 - val_fraction) * ends[-1])) + 1
    cut = min(max(cut, 1), len(lines) - 1)
    return ["".join(lines[:cut])], ["".join(lines[cut:])]


def chunk_split(num_tokens: int, chunk_tokens: int, val_fraction: float, seed: int, fingerprint: str) -> np.ndarray:
    """Which chunks of a stream of ``num_tokens`` tokens are validation (``data.val_split=chunks``).

    The stream is cut into ``n = ceil(num_tokens / chunk_tokens)`` chunks (the last may be short);
    ``max(1, round(val_fraction * n))`` of them (at most ``n - 1``), chosen by a permutation drawn
    from a generator seeded with SHA-256 of ``fingerprint`` and ``seed``, are held out. The choice
    depends on nothing else, so it is the same on every machine and for every ``train.seed``.

    Returns:
        ``[n]`` bool, ``True`` for a validation chunk.

    Raises:
        ValueError: fewer than 2 chunks (nothing left to train on, or nothing to hold out).
    """
    n_chunks = -(-num_tokens // chunk_tokens)
    if n_chunks < 2:
        raise ValueError(
            f"the corpus has {num_tokens} tokens, fewer than 2 chunks of data.val_chunk_tokens={chunk_tokens}; "
            "lower data.val_chunk_tokens or use data.val_split=files"
        )
    n_val = min(n_chunks - 1, max(1, round(val_fraction * n_chunks)))
    digest = hashlib.sha256(f"{fingerprint}\0{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    is_val = np.zeros(n_chunks, dtype=bool)
    is_val[rng.permutation(n_chunks)[:n_val]] = True
    return is_val


def chunk_runs(is_val: np.ndarray, chunk_tokens: int, num_tokens: int, val: bool) -> list[tuple[int, int]]:
    """Token ranges ``[start, stop)`` of the validation (``val=True``) or training chunks, merged
    where chunks are adjacent, in stream order. Train and validation runs are disjoint and together
    cover ``0..num_tokens``."""
    side = is_val if val else ~is_val
    edges = np.diff(np.concatenate([[0], side.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a) * chunk_tokens, min(int(b) * chunk_tokens, num_tokens)) for a, b in zip(starts, stops)]


def _write_runs(tokens: np.ndarray, runs: list[tuple[int, int]], path: Path) -> None:
    """Concatenate ``tokens[a:b]`` for each run into ``path`` (uint16), one run in memory at a time."""
    with open(path, "wb") as fh:
        for a, b in runs:
            np.asarray(tokens[a:b], dtype=np.uint16).tofile(fh)


def fingerprint_files(root: Path, rels: list[str]) -> str:
    """SHA-256 (first 16 hex digits) of the relative paths, byte sizes and contents of the files.

    The contents count too: two corpora with the same names and sizes (or a file edited in place)
    must not share a token cache or pass a resume's same-data check.
    """
    h = hashlib.sha256()
    for rel in rels:
        data = (root / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def cache_root(cfg: DataConfig) -> Path:
    """The token cache folder: ``data.cache_dir``, else ``$MOEBALANCE_CACHE``, else
    ``~/.cache/moebalance``.

    Raises:
        ValueError: the chosen path cannot be a folder (a file is in the way, ...); the message
            names where the path came from.
    """
    if cfg.cache_dir:
        root, source = Path(cfg.cache_dir), "data.cache_dir"
    elif os.environ.get("MOEBALANCE_CACHE"):
        root, source = Path(os.environ["MOEBALANCE_CACHE"]), "MOEBALANCE_CACHE"
    else:
        root, source = Path.home() / ".cache" / "moebalance", "the default cache folder"
    problem = folder_problem(root)
    if problem is not None:
        raise ValueError(f"{source} {str(root)!r} cannot hold the token cache: {problem}")
    return root


def _read_texts(root: Path, rels: list[str]) -> tuple[list[str], int]:
    texts, skipped = [], 0
    for rel in rels:
        try:
            texts.append((root / rel).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            skipped += 1
    return texts, skipped


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def _encode(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


def _split_texts(cfg: DataConfig, root: Path, rels: list[str], source: str) -> tuple[list[str], list[str], int]:
    """``data.val_split=files``: the training and validation texts, and how many files were skipped."""
    # Several files are split by file; a single file by lines (its last lines are the validation part).
    single = len(rels) == 1
    train_rels, val_rels = (rels, []) if single else split_files(rels, cfg.val_fraction)
    train_texts, skipped_train = _read_texts(root, train_rels)
    val_texts, skipped_val = _read_texts(root, val_rels)
    if not train_texts and not val_texts:
        raise ValueError(f"data.path {source!r} holds no text files: all {len(rels)} files are not UTF-8 text")
    if single:
        try:
            train_texts, val_texts = split_lines(train_texts[0], cfg.val_fraction)
        except ValueError as exc:
            raise ValueError(f"data.path {source!r}: {exc}") from None
    for name, texts, n_files in (("training", train_texts, len(train_rels)), ("validation", val_texts, len(val_rels))):
        if not texts:  # several files, and every file of this split is not UTF-8
            raise ValueError(f"data.path {source!r}: the {name} split holds no text: its {n_files} files are not UTF-8 text")
        if not any(t.strip() for t in texts):
            what = f"{len(texts)} UTF-8 file{'s' if len(texts) != 1 else ''}" if not single else "its lines"
            raise ValueError(f"data.path {source!r}: the {name} split ({what}) holds only whitespace, no text to train on")
    return train_texts, val_texts, skipped_train + skipped_val


def _build_text_cache(cfg: DataConfig, root: Path, rels: list[str], source: str, fp: str, tmp: Path) -> dict:
    """Train the BPE, encode both splits into ``tmp`` and return the cache's ``meta.json`` dict."""
    if cfg.val_split == "files":
        train_texts, val_texts, skipped = _split_texts(cfg, root, rels, source)
        log.info("training a %d-token BPE on %d files", cfg.vocab_size, len(train_texts))
        tok = _train_tokenizer(train_texts, cfg.vocab_size)
        train_ids, val_ids = _encode(tok, train_texts), _encode(tok, val_texts)
        num_files, val_chunks = [len(train_texts), len(val_texts)], None
    else:
        texts, skipped = _read_texts(root, rels)
        if not texts:
            raise ValueError(f"data.path {source!r} holds no text files: all {len(rels)} files are not UTF-8 text")
        if not any(t.strip() for t in texts):
            raise ValueError(
                f"data.path {source!r} holds no text to train on: only whitespace in its {len(texts)} UTF-8 "
                f"file{'s' if len(texts) != 1 else ''}"
            )
        log.info("training a %d-token BPE on %d files", cfg.vocab_size, len(texts))
        tok = _train_tokenizer(texts, cfg.vocab_size)
        ids = _encode(tok, texts)
        try:
            is_val = chunk_split(len(ids), cfg.val_chunk_tokens, cfg.val_fraction, cfg.split_seed, fp)
        except ValueError as exc:
            raise ValueError(f"data.path {source!r}: {exc}") from None
        train_ids = np.concatenate([ids[a:b] for a, b in chunk_runs(is_val, cfg.val_chunk_tokens, len(ids), False)])
        val_ids = np.concatenate([ids[a:b] for a, b in chunk_runs(is_val, cfg.val_chunk_tokens, len(ids), True)])
        num_files, val_chunks = [len(texts), len(texts)], int(is_val.sum())
    if skipped:
        log.warning("skipped %d non-UTF-8 files of %s", skipped, source)
    tok.save(str(tmp / "tokenizer.json"))
    train_ids.tofile(tmp / "train.bin")
    val_ids.tofile(tmp / "val.bin")
    return {
        "vocab_size": tok.get_vocab_size(),
        "fingerprint": fp,
        "num_files": num_files,
        "skipped_files": skipped,
        "val_split": cfg.val_split,
        "val_chunks": val_chunks,
    }


def _build_cache(cache: Path, build) -> None:
    """Fill the cache folder ``cache`` with ``build(tmp)`` unless it exists.

    Built in a temporary folder and renamed: a killed job never leaves a half-written cache, and
    when two processes race the loser's copy is dropped (the winner's is as good).
    """
    if cache.exists():
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0o700 would keep a shared cache private
        build(tmp)
        try:
            os.rename(tmp, cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _split_key(cfg: DataConfig) -> str:
    """The split settings in the cache key: two splits of one corpus never share a cache."""
    if cfg.val_split == "files":
        return f"val{cfg.val_fraction:g}-files"
    return f"val{cfg.val_fraction:g}-chunks{cfg.val_chunk_tokens}-seed{cfg.split_seed}"


def _prepare_text(cfg: DataConfig, root: Path, rels: list[str], source: str) -> TokenData:
    if sum((root / rel).stat().st_size for rel in rels) == 0:
        raise ValueError(f"data.path {source!r}: the corpus is empty ({len(rels)} files, 0 bytes)")
    fp = fingerprint_files(root, rels)
    key = f"{fp}-bpe{cfg.vocab_size}-{_split_key(cfg)}-v{_CACHE_VERSION}"
    cache = cache_root(cfg) / key
    meta_path = cache / "meta.json"

    def build(tmp: Path) -> None:
        (tmp / "meta.json").write_text(json.dumps(_build_text_cache(cfg, root, rels, source, fp, tmp)))

    _build_cache(cache, build)
    meta = json.loads(meta_path.read_text())
    return TokenData(
        train=np.memmap(cache / "train.bin", dtype=np.uint16, mode="r"),
        val=np.memmap(cache / "val.bin", dtype=np.uint16, mode="r"),
        vocab_size=int(meta["vocab_size"]),
        fingerprint=fp,
        source=source,
        num_files=tuple(meta["num_files"]),
        tokenizer_path=str(cache / "tokenizer.json"),
        val_split=cfg.val_split,
    )


def _load_bin(path: Path, vocab_size: int) -> np.ndarray:
    size = path.stat().st_size
    if size % 2:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of the uint16 token size (2)")
    if size == 0:
        raise ValueError(f"{path}: empty token file")
    arr = np.memmap(path, dtype=np.uint16, mode="r")
    top = int(arr.max())
    if top >= vocab_size:
        raise ValueError(f"{path}: token id {top} is beyond data.bin_vocab_size={vocab_size}")
    return arr


def _bin_chunks(cfg: DataConfig, path: Path, tokens: np.ndarray, fp: str) -> tuple[np.ndarray, np.ndarray]:
    """The chunk split of one ``.bin`` file, written once into the cache and read back as memmaps.

    The cache key holds the file's fingerprint, modification time and the split settings.
    """
    key = f"bin-{fp}-{path.stat().st_mtime_ns}-{_split_key(cfg)}-v{_CACHE_VERSION}"
    cache = cache_root(cfg) / key

    def build(tmp: Path) -> None:
        is_val = chunk_split(len(tokens), cfg.val_chunk_tokens, cfg.val_fraction, cfg.split_seed, fp)
        for name, val in (("train.bin", False), ("val.bin", True)):
            _write_runs(tokens, chunk_runs(is_val, cfg.val_chunk_tokens, len(tokens), val), tmp / name)

    _build_cache(cache, build)
    return tuple(np.memmap(cache / name, dtype=np.uint16, mode="r") for name in ("train.bin", "val.bin"))


def _prepare_bin(cfg: DataConfig, path: Path) -> TokenData:
    if cfg.bin_vocab_size <= 0:
        raise ValueError("data.bin_vocab_size must be set (> 0) for pre-tokenized .bin data")
    if path.is_dir():
        train_path, val_path = path / "train.bin", path / "val.bin"
        for p in (train_path, val_path):
            if not p.exists():
                raise FileNotFoundError(f"{path} needs train.bin and val.bin (nanoGPT layout); missing {p.name}")
        train = _load_bin(train_path, cfg.bin_vocab_size)
        val = _load_bin(val_path, cfg.bin_vocab_size)
        files, split = [train_path, val_path], "given"  # the user's own split; data.val_split does not apply
    else:
        tokens = _load_bin(path, cfg.bin_vocab_size)
        files, split = [path], cfg.val_split
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
    fp = h.hexdigest()[:16]
    if split == "chunks":  # the same held-out chunks as for text, drawn over the file's tokens
        train, val = _bin_chunks(cfg, path, tokens, fp)
    elif split == "files":  # one file has no files to hold out: its tail is the shifted split
        cut = int(len(tokens) * (1 - cfg.val_fraction))
        train, val = tokens[:cut], tokens[cut:]
    return TokenData(train, val, cfg.bin_vocab_size, fp, str(path), val_split=split)


def prepare_data(cfg: DataConfig) -> TokenData:
    """Load or build the token arrays named by ``cfg``.

    Raises:
        FileNotFoundError: ``cfg.path`` does not exist.
        ValueError: an empty corpus, no text files, a malformed ``.bin`` file (size not a multiple of
            2, token id beyond the vocabulary), or a missing ``bin_vocab_size``.
    """
    if cfg.path is None:
        root, rels = builtin_corpus_files(cfg.max_files)
        if not rels:
            raise ValueError(f"built-in corpus: no .py files under {root}")
        return _prepare_text(cfg, root, rels, f"python-stdlib:{root}")
    path = Path(cfg.path).expanduser()
    if path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").exists()):
        return _prepare_bin(cfg, path)
    root, rels = text_corpus_files(path, cfg.max_files)
    return _prepare_text(cfg, root, rels, str(path))


def check_data(data: TokenData, seq_len: int) -> None:
    """Check prepared tokens before training starts, so a bad corpus fails at once, not at step 1.

    Raises:
        ValueError: a split shorter than one training window (``seq_len + 2`` tokens for the
            training split, ``seq_len + 1`` for validation), or a token id ``>= data.vocab_size``
            (the embedding would index out of range or, worse, a wrong row).
    """
    if len(data.train) < seq_len + 2:
        raise ValueError(
            f"{data.source}: the training split has {len(data.train)} tokens, fewer than train.seq_len+2={seq_len + 2}"
        )
    if len(data.val) < seq_len + 1:
        raise ValueError(
            f"{data.source}: the validation split has {len(data.val)} tokens, fewer than train.seq_len+1={seq_len + 1}"
        )
    for name, split in (("training", data.train), ("validation", data.val)):
        top = int(split.max())
        if top >= data.vocab_size:
            raise ValueError(f"{data.source}: {name} split holds token id {top}, beyond the vocabulary of {data.vocab_size}")


def batch_at(data: np.ndarray, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``[B, S]`` int64 starting at ``offsets``."""
    rows = np.stack([np.asarray(data[o : o + seq_len + 1], dtype=np.int64) for o in offsets.tolist()])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def sample_batch(
    data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``seq_len + 1`` tokens (deterministic given ``generator``).

    Raises:
        ValueError: the split is shorter than one window.
    """
    high = len(data) - seq_len - 1
    if high < 1:
        raise ValueError(f"the training split has {len(data)} tokens, fewer than train.seq_len+2={seq_len + 2}")
    offsets = torch.randint(0, high, (batch_size,), generator=generator)
    return batch_at(data, offsets, seq_len)


def eval_window_offsets(data: np.ndarray, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """``[W]`` int64 start offsets of the windows :func:`eval_batches` reads, in its order.

    Raises:
        ValueError: the split is shorter than one window.
    """
    n_windows = (len(data) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the validation split has {len(data)} tokens, fewer than train.seq_len+1={seq_len + 1}")
    window_ids = torch.arange(n_windows)
    if max_tokens and max_tokens // seq_len < n_windows:
        keep = max(1, max_tokens // seq_len)
        window_ids = torch.linspace(0, n_windows - 1, keep).round().long().unique()
    return window_ids * seq_len


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, max_tokens: int = 0):
    """Non-overlapping windows over the validation split, in order.

    With ``max_tokens = 0`` the windows tile the whole split. Otherwise about ``max_tokens`` target
    tokens are taken as windows spread evenly over the split, so a partial evaluation still sees
    every part of it (the split is ordered by file; its first windows would be a few files only).

    Yields ``(inputs, targets)`` ``[b, S]`` int64 with ``b <= batch_size``.

    Raises:
        ValueError: the split is shorter than one window.
    """
    offsets = eval_window_offsets(data, seq_len, max_tokens)
    for start in range(0, len(offsets), batch_size):
        yield batch_at(data, offsets[start : start + batch_size], seq_len)


def sample_local_batch(
    data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator, ctx: DistContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch of ``batch_size * world_size`` random windows.

    Every rank draws the same global offsets from its (identically seeded) generator and keeps
    rows ``[rank * batch_size, (rank + 1) * batch_size)``, so the ranks see different data and a
    2-rank run sees exactly the batch a 1-process run with twice the batch size sees. With one
    process this is :func:`sample_batch`, draw for draw.

    Returns:
        inputs and targets ``[batch_size, seq_len]`` int64.

    Raises:
        ValueError: the split is shorter than one window.
    """
    high = len(data) - seq_len - 1
    if high < 1:
        raise ValueError(f"the training split has {len(data)} tokens, fewer than train.seq_len+2={seq_len + 2}")
    offsets = torch.randint(0, high, (batch_size * ctx.world_size,), generator=generator)
    return batch_at(data, offsets[ctx.rank * batch_size : (ctx.rank + 1) * batch_size], seq_len)


def iter_rank_batches(batches: Iterator, ctx: DistContext) -> Iterator:
    """Each rank's rows of each ``(inputs, targets)`` batch (see :func:`shard_rows`)."""
    for x, y in batches:
        yield shard_rows(x, ctx), shard_rows(y, ctx)
