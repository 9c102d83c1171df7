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
from pathlib import Path

import numpy as np

from data import UserError
from data.bpe import Tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_DIR = Path(__file__).parent / "cache"
BPE_TRAIN_CHARS = 1_000_000  # the tokenizer learns its merges from the first 1 MB


def scene_text(world, split, index):
    """One shapes-world document: its caption, then its questions and answers."""
    from data.shapes import caption, questions, sample_scene
    objs = sample_scene(world, split, index)
    return caption(objs) + ". " + " ".join(f"{q} {a}." for _, q, a in questions(world, split, index, objs))


def read_text(source):
    if os.path.isfile(source):
        return Path(source).read_text(encoding="utf-8")
    try:
        print(f"downloading {source} ...", flush=True)
        with urllib.request.urlopen(source, timeout=30) as r:
            return r.read().decode("utf-8")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {source} ({e}); offline, pass a local copy with --data_path=FILE") from None


def documents(corpus, data_path="", n_scenes=20000):
    """-> {'train': [str], 'val': [str]}"""
    if corpus == "shapes":
        from data.shapes import World
        world = World()
        return {split: [scene_text(world, split, i) for i in range(n)]
                for split, n in (("train", n_scenes), ("val", max(1, n_scenes // 10)))}
    if corpus == "pydoc":
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif corpus == "shakespeare":
        text = read_text(data_path or SHAKESPEARE_URL)
    elif corpus.endswith(".txt") or os.path.exists(corpus):
        if not os.path.isfile(corpus):
            raise UserError(f"text file not found: {corpus}")
        text = Path(corpus).read_text(encoding="utf-8")
    else:
        raise UserError(f"corpus={corpus!r}; choose shapes, pydoc, shakespeare, or a path to a .txt file")
    cut = int(len(text) * 0.9)
    return {"train": [text[:cut]], "val": [text[cut:]]}


def prepare(corpus, tokenizer="bpe", vocab_size=512, data_path="", cache_dir=CACHE_DIR, verbose=True):
    """Tokenize a corpus once; -> the folder holding train.bin, val.bin, tokenizer.json, meta.json."""
    key = json.dumps([corpus, tokenizer, vocab_size if tokenizer == "bpe" else 0, data_path, 1])
    name = Path(corpus).stem if corpus.endswith(".txt") else corpus
    out = Path(cache_dir) / f"text_{name}_{tokenizer}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / "meta.json").exists():
        return out
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
        tmp = out / f"{split}.tmp"
        np.array(ids, dtype=np.uint16).tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[f"{split}_tokens"] = len(ids)
    tok.save(out / "tokenizer.json")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the folder done
    if verbose:
        print(f"prepared {out}: {meta}", flush=True)
    return out


def load(folder):
    """-> (Tokenizer, {'train': uint16 memmap, 'val': uint16 memmap})"""
    folder = Path(folder)
    tok = Tokenizer.load(folder / "tokenizer.json")
    return tok, {s: np.memmap(folder / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}
