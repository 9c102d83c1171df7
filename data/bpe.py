"""Tokenizers that work offline: a byte-level BPE trained here, characters, or GPT-2's when online.

Byte-level BPE (Sennrich et al. 2016; GPT-2): start from the 256 single bytes, then repeatedly
merge the most frequent adjacent pair into a new token. The merges become the ranks of a real
`tiktoken.Encoding`, so encoding runs at tiktoken's speed; only training is Python. Text is first
split into words by a regex, and pair counts are kept up to date incrementally (only the words
that hold the merged pair are recounted), which is what makes a 512-token vocabulary on 1 MB of
text a matter of seconds.

Every tokenizer carries the same special tokens: [PAD], [MASK], <|endoftext|>, and the image
placeholder and prompt/answer separator the vision-language model uses.
"""
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import tiktoken

from lib.common import UserError

# GPT-2's split, spelled with ASCII classes so Python's `re` (training) and tiktoken agree
PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
SPECIALS = ("[PAD]", "[MASK]", "<|endoftext|>", "<image>", "[SEP]")


def merge(seq, pair, new):
    """Replace every non-overlapping occurrence of `pair` in `seq` (left to right) by `new`."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def train_bpe(text, vocab_size):
    """-> (ranks {token bytes: rank}, merges [(a, b)]): 256 bytes, then the most frequent pair each
    round (ties: the smallest ids). A merge that spells a token already known reuses it."""
    if vocab_size < 256:
        raise UserError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256")
    words = Counter(re.findall(PAT, text))
    seqs = [list(w.encode("utf-8")) for w in words]
    counts = list(words.values())
    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}
    pair_counts, where = Counter(), defaultdict(set)  # pair -> count, pair -> words holding it
    for w, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    merges = []
    while len(vocab) < vocab_size and pair_counts:
        best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new = ranks[merged]
        merges.append(best)
        for w in where.pop(best):
            seq = seqs[w]
            for pair in zip(seq, seq[1:]):
                pair_counts[pair] -= counts[w]
            seqs[w] = seq = merge(seq, best, new)
            for pair in zip(seq, seq[1:]):
                pair_counts[pair] += counts[w]
                where[pair].add(w)
        pair_counts = +pair_counts  # drop pairs whose count fell to zero
    return ranks, merges


class Tokenizer:
    """One face for three kinds: 'bpe' (trained here), 'char' (one token per character), 'gpt2'."""

    def __init__(self, kind, ranks=None, chars=None):
        self.kind = kind
        if kind == "char":
            self.chars = chars
            self.stoi = {c: i for i, c in enumerate(chars)}
            base = len(chars)
        else:
            if kind == "gpt2":
                try:
                    gpt2 = tiktoken.get_encoding("gpt2")
                except Exception:
                    raise UserError("--tokenizer=gpt2 downloads its files and this machine is offline; use "
                                    "--tokenizer=bpe (trained here, offline) or --tokenizer=char") from None
                ranks, pat = gpt2._mergeable_ranks, gpt2._pat_str
            else:
                pat = PAT
            base = len(ranks)
            self.ranks = ranks
        self.special = {s: base + i for i, s in enumerate(SPECIALS)}
        if kind != "char":
            self.enc = tiktoken.Encoding(name=f"mlm-{kind}-{base}", pat_str=pat, mergeable_ranks=ranks,
                                         special_tokens=self.special)
        self.vocab_size = base + len(SPECIALS)
        self.pad_id, self.mask_id, self.eot_id = (self.special[s] for s in SPECIALS[:3])
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    @classmethod
    def train(cls, kind, text, vocab_size=512):
        if kind == "char":
            return cls("char", chars="".join(sorted(set(text))))
        if kind == "bpe":
            return cls("bpe", ranks=train_bpe(text, vocab_size - len(SPECIALS))[0])
        if kind == "gpt2":
            return cls("gpt2")
        raise UserError(f"tokenizer={kind!r}; choose bpe, char or gpt2")

    def encode(self, text):
        """Text -> ids; the special tokens' text ("[MASK]", ...) becomes their ids."""
        if self.kind != "char":
            return self.enc.encode(text, allowed_special="all")
        ids = []
        for piece in self._split.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
                continue
            for c in piece:
                if c not in self.stoi:
                    raise UserError(f"character {c!r} is not in this character-level vocabulary")
                ids.append(self.stoi[c])
        return ids

    def decode(self, ids):
        if self.kind != "char":
            return self.enc.decode(list(ids))
        names = {i: s for s, i in self.special.items()}
        return "".join(self.chars[i] if i < len(self.chars) else names[i] for i in ids)

    def token_str(self, i):
        """One token as readable text (bytes that are not whole UTF-8 shown as escapes)."""
        if self.kind == "char" or i >= self.vocab_size - len(SPECIALS):
            return self.decode([i])
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")

    def state(self):
        """What rebuilds this tokenizer, in plain types (a checkpoint carries it: a few KB)."""
        state = {"kind": self.kind}
        if self.kind == "char":
            state["chars"] = self.chars
        elif self.kind == "bpe":
            state["ranks"] = [b.hex() for b, _ in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        return state

    @classmethod
    def from_state(cls, state):
        if state["kind"] == "bpe":
            return cls("bpe", ranks={bytes.fromhex(h): i for i, h in enumerate(state["ranks"])})
        return cls(state["kind"], chars=state.get("chars"))

    def save(self, path):
        Path(path).write_text(json.dumps(self.state()))

    @classmethod
    def load(cls, path):
        return cls.from_state(json.loads(Path(path).read_text()))
