import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from data import text
from data.bpe import PAT, SPECIALS, Tokenizer, merge, train_bpe
from mlm import MLM, Config, diffusion_mask, mask_tokens, unmask
from tests.conftest import ROOT, overfit

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare.txt"
TEXT = "the cat sat on the mat. the dog sat on the log! a cat, a dog, a hat; thee and thou. " * 20


def pydoc_text(n=30000):
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))[:n]


def naive_bpe(text, vocab_size):
    """The textbook loop: recount every pair of every word after each merge."""
    words = Counter(re.findall(PAT, text))
    seqs = {w: list(w.encode()) for w in words}
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        merges.append(best)
        seqs = {w: merge(seq, best, ranks[merged]) for w, seq in seqs.items()}
    return ranks, merges


def test_bpe_merges_match_the_naive_loop():
    fast_ranks, fast_merges = train_bpe(pydoc_text(), 400)
    slow_ranks, slow_merges = naive_bpe(pydoc_text(), 400)
    assert fast_merges == slow_merges and fast_ranks == slow_ranks
    assert len(fast_ranks) == 400 and all(bytes([i]) in fast_ranks for i in range(256))


def test_bpe_round_trips_seen_unseen_and_emoji_and_encodes_specials():
    tok = Tokenizer.train("bpe", pydoc_text(), 300)
    for s in (pydoc_text()[:300], "Zebras quietly juggle 42 xylophones", "emoji 😀🎉 and naïve café",
              ""):
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the statement is evaluated")) < 0.7 * len("the statement is evaluated")
    ids = tok.encode("a [MASK] b<|endoftext|>")
    assert tok.mask_id in ids and ids[-1] == tok.eot_id
    assert [tok.special[s] for s in SPECIALS] == list(range(295, 300)) and tok.vocab_size == 300


def test_tokenizers_save_and_reload(tmp_path):
    for kind in ("bpe", "char"):
        tok = Tokenizer.train(kind, pydoc_text(), 300)
        tok.save(tmp_path / "t.json")
        again = Tokenizer.load(tmp_path / "t.json")
        s = "the dog sat [MASK] the hat"
        assert again.encode(s) == tok.encode(s) and again.decode(again.encode(s)) == s
    char = Tokenizer.train("char", "abc ", 0)
    assert char.encode("ab[MASK]") == [1, 2, char.mask_id] and char.vocab_size == 4 + len(SPECIALS)


def test_gpt2_offline_fails_in_one_clear_line(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(Exception, match="--tokenizer=bpe"):
        Tokenizer.train("gpt2", "")


def test_mask_tokens_follows_bert():
    torch.manual_seed(0)
    V, mask_id, pad = 100, 101, 102
    ids = torch.randint(0, V, (200, 128))
    ids[:, -8:] = pad  # padding
    specials = torch.tensor([100, 101, 102])
    inputs, labels = mask_tokens(ids, mask_id, V, specials, 0.15)
    selected = labels != -100
    regular = ids != pad
    assert not selected[~regular].any() and torch.equal(inputs[~regular], ids[~regular])
    assert torch.equal(labels[selected], ids[selected])
    frac = selected.sum() / regular.sum()
    assert abs(frac - 0.15) < 0.01
    n = selected.sum().item()
    to_mask = (inputs == mask_id) & selected
    unchanged = (inputs == ids) & selected
    changed = selected & ~to_mask & ~unchanged
    assert abs(to_mask.sum() / n - 0.8) < 0.02
    # a random replacement equals the original 1/V of the time, so "stays" is 10% + 10%/V
    assert abs(unchanged.sum() / n - (0.1 + 0.1 / V)) < 0.015
    assert abs(changed.sum() / n - 0.1 * (1 - 1 / V)) < 0.015
    assert not (inputs[~selected] != ids[~selected]).any()  # nothing changes outside the selection


def test_diffusion_loss_weight_by_hand():
    torch.manual_seed(0)
    cfg = Config(objective="diffusion", block_size=4, n_layer=1, n_embd=16, n_head=2)
    tok = Tokenizer.train("char", "abcd", 0)
    model = MLM(cfg, tok)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, tok.eot_id]])
    torch.manual_seed(5)
    loss, _ = model(ids)
    torch.manual_seed(5)  # the same draw, by hand: sum over masked of CE, times 1/t, over regular tokens
    inputs, labels, weight, maskable = diffusion_mask(ids, tok.mask_id, model.special_ids)
    logp = torch.log_softmax(model.logits(inputs), -1)
    total = 0.0
    for b in range(2):
        t = 1 / weight[b].item()
        assert 1e-3 <= t <= 1
        for i in range(4):
            if labels[b, i] != -100:
                assert inputs[b, i] == tok.mask_id
                total += -logp[b, i, labels[b, i]].item() / t
    assert maskable.sum() == 7 and not maskable[1, 3]
    assert loss.item() == pytest.approx(total / 7, rel=1e-5)


def test_tiny_mlm_overfits_a_batch():
    torch.manual_seed(0)
    tok = Tokenizer.train("char", TEXT, 0)
    cfg = Config(block_size=32, n_layer=2, n_embd=64, n_head=4, mask_prob=0.3)
    model = MLM(cfg, tok)
    ids = torch.tensor([tok.encode(TEXT[i:i + 32]) for i in range(0, 256, 32)])
    overfit(model, ids, 300)
    model.cfg.mask_prob = 0.15
    torch.manual_seed(1)
    loss, metrics = model(ids)
    assert loss.item() < 1.0 and metrics["acc"] > 0.7  # chance is 1/27


@pytest.mark.parametrize("method", ["maskgit", "mdlm"])
def test_sampler_keeps_given_tokens_and_fills_every_mask(method):
    torch.manual_seed(0)
    tok = Tokenizer.train("char", TEXT, 0)
    model = MLM(Config(block_size=24, n_layer=1, n_embd=32, n_head=2), tok).eval()
    ids = torch.tensor([tok.encode("the [MASK]at sat[MASK][MASK]on the[MASK]" + "[MASK]" * 4)] * 3)
    steps_seen = []
    out = unmask(model, ids, steps=6, method=method, callback=lambda k, x: steps_seen.append(x.clone()))
    fixed = ids != tok.mask_id
    assert torch.equal(out[fixed], ids[fixed]) and not (out == tok.mask_id).any()
    assert not torch.isin(out, model.special_ids).any()
    for x in steps_seen:  # blanks only ever get fewer, and a revealed token stays
        assert torch.equal(x[fixed], ids[fixed])
    counts = [(x == tok.mask_id).sum().item() for x in steps_seen]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0
    if method == "maskgit":  # the cosine schedule: floor(N cos(pi/2 k/T)) blanks left after step k
        N = fixed.logical_not().sum().item() // 3
        assert counts == [3 * math.floor(N * math.cos(math.pi / 2 * k / 6)) for k in range(1, 7)]


def test_text_pipeline_on_a_text_file(tmp_path):
    """tiny Shakespeare from ../shared where it is; elsewhere the repo's own code as the text file."""
    path = SHAKESPEARE
    if not path.exists():
        path = tmp_path / "corpus.txt"
        code = "".join(p.read_text() for p in sorted(ROOT.glob("*.py")))
        for special in SPECIALS:  # the code names the special tokens; a corpus must not hold them
            code = code.replace(special, "")
        path.write_text("".join(c for c in code if c.isascii()))
    folder = text.prepare("shakespeare", "char", data_path=path.as_uri(), cache_dir=tmp_path, verbose=False)
    tok, tokens = text.load(folder)
    raw = path.read_text()
    assert tok.vocab_size == len(set(raw)) + len(SPECIALS)
    assert len(tokens["train"]) + len(tokens["val"]) == len(raw) + 2  # + one <|endoftext|> a split
    assert tok.decode(tokens["val"][:-1].tolist()) == raw[int(len(raw) * 0.9):]
    folder = text.prepare("shakespeare", "bpe", 512, data_path=str(path), cache_dir=tmp_path, verbose=False)
    tok, tokens = text.load(folder)
    decoded = tok.decode(tokens["train"][:200].tolist())
    assert tok.vocab_size == 512 and decoded == raw[:len(decoded)]


def test_shapes_corpus_is_the_worlds_text(tmp_path):
    from data.shapes import World, caption, sample_scene
    docs = text.documents("shapes", n_scenes=30)
    assert len(docs["train"]) == 30 and len(docs["val"]) == 3
    assert docs["train"][4].startswith(caption(sample_scene(World(), "train", 4)) + ". ")
