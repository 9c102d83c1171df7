"""Text corpora, stored nanoGPT-style: train.bin / val.bin (uint16 token ids) + tokenizer + meta.

Corpora (all offline except Shakespeare's first download):
    shapes       the shapes world's captions and question/answer pairs (train scenes / val scenes)
    pydoc        Python's own documentation topics (pydoc_data), real English every Python install has
    shakespeare  Tiny Shakespeare, downloaded once, or read from a local path / file:// URL
    PATH.txt     any local text file
The last 10% of a text (by documents for the shapes world: its val scenes) is held out.
"""
import hashlib
import json
import os
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np

from data import checked_cache, file_digest, write_manifest
from data.bpe import Tokenizer
from lib.common import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_DIR = Path(__file__).parent / "cache"
BPE_TRAIN_CHARS = 1_000_000  # the tokenizer learns its merges from the first 1 MB


def scene_text(world, split, index):
    """One shapes-world document: its caption, then its questions and answers."""
    from data.shapes import caption, questions, sample_scene
    objs = sample_scene(world, split, index)
    return caption(objs) + ". " + " ".join(f"{q} {a}." for _, q, a in questions(world, split, index, objs))


def read_file(path):
    """A local text file -> str, or a one-line error for a missing, binary or non-UTF-8 file."""
    if not os.path.isfile(path):
        raise UserError(f"text file not found: {path}")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); give a text file as corpus") from None
    if "\x00" in text:
        raise UserError(f"{path} holds NUL bytes: a binary file, not a text corpus")
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def read_text(source):
    if os.path.isfile(source):
        return read_file(source)
    try:
        print(f"downloading {source} ...", flush=True)
        with urllib.request.urlopen(source, timeout=30) as r:
            return r.read().decode("utf-8")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {source} ({e}); offline, pass a local copy "
                        f"with --data_path=FILE") from None


def documents(corpus, data_path="", n_scenes=20000):
    """-> {'train': [str], 'val': [str]}"""
    if corpus == "shapes":
        from data.shapes import World
        world = World()
        n_val = max(1, n_scenes // 10)
        return {"train": [scene_text(world, "train", i) for i in range(n_scenes)],
                "val": [scene_text(world, "val", i) for i in range(n_val)]}
    if corpus == "pydoc":
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif corpus == "shakespeare":
        text = read_text(data_path or SHAKESPEARE_URL)
    elif corpus.endswith(".txt") or os.path.exists(corpus):
        text = read_file(corpus)
    else:
        raise UserError(f"corpus={corpus!r}; choose shapes, pydoc, shakespeare, or a path to a .txt file")
    cut = int(len(text) * 0.9)
    return {"train": [text[:cut]], "val": [text[cut:]]}


def source_key(corpus, data_path):
    """What identifies a corpus: a user's file by its content (an edited file is re-read), others by name."""
    for f in (corpus, data_path):
        if f and os.path.isfile(f):
            return file_digest(f)
    return [corpus, data_path]


def prepare(corpus, tokenizer="bpe", vocab_size=512, data_path="", cache_dir=CACHE_DIR, verbose=True):
    """Tokenize a corpus once; -> the folder holding train.bin, val.bin, tokenizer.json, meta.json."""
    key = json.dumps([source_key(corpus, data_path), tokenizer, vocab_size if tokenizer == "bpe" else 0, 1])
    name = Path(corpus).stem if corpus.endswith(".txt") else corpus
    out = Path(cache_dir) / f"text_{name}_{tokenizer}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    build = partial(_build, out, corpus, tokenizer, vocab_size, data_path, verbose)
    checked_cache(out / "manifest.json", build, f"text {out.name}", verbose)
    return out


def _build(out, corpus, tokenizer, vocab_size, data_path, verbose):
    docs = documents(corpus, data_path)
    train_text = "\n".join(docs["train"])
    # characters: every one in the corpus, so held-out text never meets an unknown one
    fit = train_text[:BPE_TRAIN_CHARS] if tokenizer != "char" else train_text + "".join(docs["val"])
    tok = Tokenizer.train(tokenizer, fit, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"corpus": corpus, "tokenizer": tokenizer, "vocab_size": tok.vocab_size}
    for split, ds in docs.items():
        ids = []
        for d in ds:  # documents end with <|endoftext|>
            ids += tok.encode(d) + [tok.eot_id]
        tmp = out / f"{split}.{os.getpid()}.tmp"
        np.array(ids, dtype=np.uint16).tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[f"{split}_tokens"] = len(ids)
    tok.save(out / "tokenizer.json")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    files = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
    write_manifest(out / "manifest.json", [out / f for f in files])
    if verbose:
        print(f"prepared {out}: {meta}", flush=True)


def load(folder):
    """-> (Tokenizer, {'train': uint16 memmap, 'val': uint16 memmap})"""
    folder = Path(folder)
    tok = Tokenizer.load(folder / "tokenizer.json")
    return tok, {s: np.memmap(folder / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}
