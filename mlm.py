"""Masked language modeling: fill in the blanks, then write by unmasking.

BERT (Devlin et al. 2019): a bidirectional Transformer sees a text in which 15% of the tokens were
selected (of those, 80% replaced by [MASK], 10% by a random token, 10% left alone) and predicts
the original tokens at the selected places. The block is the same one mae.py uses for patches.

Trained as a masked diffusion model instead (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024), the
same network generates: a whole sequence is masked with probability t ~ U(0, 1), the loss on the
masked tokens is weighted by 1/t, and sampling starts from all-[MASK] and reveals tokens step by
step (MDLM's ancestral sampler), or fills every blank and keeps the most confident (MaskGIT,
Chang et al. 2022). On the shapes world's text a masked colour cannot be known from the words, but
the world's co-occurrence bias can: what the model guesses is the language prior that later makes
a vision-language model hallucinate.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.common import UserError, at_least, divisible, one_of
from mae import Block, get_1d_sincos_pos_embed, init_weights


@dataclass
class Config:
    corpus: str = "shapes"        # shapes | pydoc | shakespeare | path/to/file.txt
    data_path: str = ""           # shakespeare: a local copy or URL instead of the download
    tokenizer: str = "bpe"        # bpe (trained here, offline) | char | gpt2 (needs the network once)
    vocab_size: int = 512         # bpe only
    block_size: int = 64          # tokens per sequence
    n_layer: int = 4              # Transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # model width
    mlp_ratio: float = 4.0        # MLP width / model width
    objective: str = "bert"       # bert | diffusion
    mask_prob: float = 0.15       # bert; ModernBERT uses 0.30

    def __post_init__(self):
        at_least(self, 1, "n_layer", "n_head", "n_embd")
        at_least(self, 2, "block_size")
        if not 256 + 5 <= self.vocab_size <= 65535:
            raise UserError(f"vocab_size={self.vocab_size} must be in [261, 65535]")
        if self.mlp_ratio <= 0:
            raise UserError(f"mlp_ratio={self.mlp_ratio} must be positive")
        one_of(self, "objective", ("bert", "diffusion"))
        one_of(self, "tokenizer", ("bpe", "char", "gpt2"))
        if not 0 < self.mask_prob < 1:
            raise UserError(f"mask_prob={self.mask_prob} must be in (0, 1)")
        divisible(self, "n_embd", "n_head")


# ~4 minutes on 2 CPU cores
train_defaults = dict(batch_size=64, lr=2e-3, min_lr=1e-4, max_iters=1000, warmup_iters=100,
                      weight_decay=0.1, eval_interval=250, eval_iters=20)


def mask_tokens(ids, mask_id, n_regular, special_ids, mask_prob=0.15):
    """BERT's masking. ids: (B, T). -> inputs (B, T), labels (B, T) with -100 where not selected.

    Each regular token is selected with probability mask_prob (special tokens and padding never);
    a selected token becomes [MASK] 80% of the time, a random regular token 10%, stays 10%.
    """
    maskable = ~torch.isin(ids, special_ids)
    selected = (torch.rand(ids.shape, device=ids.device) < mask_prob) & maskable
    labels = torch.where(selected, ids, -100)
    r = torch.rand(ids.shape, device=ids.device)
    inputs = torch.where(selected & (r < 0.8), mask_id, ids)
    random_tokens = torch.randint(0, n_regular, ids.shape, device=ids.device)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_tokens, inputs)
    return inputs, labels


def diffusion_mask(ids, mask_id, special_ids, eps=1e-3):
    """MDLM/MD4 forward process, linear schedule: t ~ U(eps, 1) per sequence, each regular token
    masked with probability t. -> inputs, labels (-100 where visible), weight 1/t (B,), maskable."""
    B, T = ids.shape
    t = eps + (1 - eps) * torch.rand(B, 1, device=ids.device)  # (B, 1)
    maskable = ~torch.isin(ids, special_ids)
    masked = (torch.rand(B, T, device=ids.device) < t) & maskable
    return torch.where(masked, mask_id, ids), torch.where(masked, ids, -100), 1 / t.squeeze(1), maskable


def masked_loss(logits, labels):
    """Cross-entropy and accuracy over the positions with a label (-100 elsewhere) ->
    (per-position cross-entropy (B, T), 0 where no label; mean loss; accuracy)."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                         reduction="none").view(labels.shape)  # (B, T)
    selected = labels != -100
    n = selected.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == labels) & selected).sum() / n
    return ce, ce.sum() / n, acc.detach()


def word_mask(tok, words, device="cpu"):
    """-> bool (V,): which tokens of the vocabulary are one of `words` (leading space aside)."""
    return torch.tensor([tok.token_str(i).strip() in words for i in range(tok.vocab_size)], device=device)


def gumbel_noise(like, generator=None):
    """Standard Gumbel noise shaped like `like`: argmax(logits + noise) samples from softmax(logits)."""
    u = torch.rand(like.shape, generator=generator, device=generator.device if generator else like.device)
    return -torch.log(-torch.log(u.to(like.device).clamp(1e-10, 1)))


class MLM(nn.Module):
    def __init__(self, cfg, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tok = tokenizer or load_data(cfg, verbose=False)[0]
        V, D = self.tok.vocab_size, cfg.n_embd
        self.n_regular = V - len(self.tok.special)  # specials are the last ids
        self.mask_id = self.tok.mask_id
        self.register_buffer("special_ids", torch.tensor(sorted(self.tok.special.values())), persistent=False)
        self.wte = nn.Embedding(V, D)
        # fixed sin-cos positions: every position is told apart from step 0, no plateau to escape
        self.register_buffer("wpe", get_1d_sincos_pos_embed(D, torch.arange(cfg.block_size)).float(),
                             persistent=False)  # (T, D)
        self.blocks = nn.ModuleList(Block(D, cfg.n_head, cfg.mlp_ratio) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head_bias = nn.Parameter(torch.zeros(V))
        self.apply(init_weights)
        # as in "Attention Is All You Need": embeddings ~ D^-0.5, scaled by sqrt(D) on the way in, so
        # tokens and the unit-sized sinusoids start on equal terms and the tied head's logits near 1
        nn.init.normal_(self.wte.weight, std=D ** -0.5)

    def logits(self, idx):
        """(B, T) ids -> (B, T, V); specials are never predicted (no [MASK] out of a blank)."""
        x = self.wte(idx) * self.cfg.n_embd ** 0.5 + self.wpe[:idx.shape[1]]  # (B, T, D)
        for blk in self.blocks:
            x = blk(x)  # bidirectional: no causal mask
        logits = self.ln_f(x) @ self.wte.weight.T + self.head_bias  # (B, T, V), tied to the embedding
        return logits.float().index_fill(-1, self.special_ids, float("-inf"))

    def forward(self, ids):
        if self.cfg.objective == "bert":
            inputs, labels = mask_tokens(ids, self.mask_id, self.n_regular, self.special_ids,
                                         self.cfg.mask_prob)
        else:
            inputs, labels, weight, maskable = diffusion_mask(ids, self.mask_id, self.special_ids)
        ce, loss, acc = masked_loss(self.logits(inputs), labels)  # (B, T), 0 where not selected
        if self.cfg.objective == "diffusion":  # the 1/t-weighted masked cross-entropy, averaged per
            loss = (ce.sum(1) * weight).sum() / maskable.sum().clamp(min=1)  # token: a bound on -log p
        return loss, {"acc": acc}


Model = MLM


# ---------------------------------------------------------------------------------------------
# Generation by unmasking

def filter_logits(logits, temperature=1.0, top_k=0):
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def most_confident(conf, masked, n_keep_masked):
    """MaskGIT's rule: of the masked positions, reveal all but the n_keep_masked least confident ->
    (B, T) bool. conf (B, T); masked (B, T) bool; n_keep_masked (B, 1)."""
    conf = conf.masked_fill(~masked, float("inf"))  # fixed tokens are never re-masked
    rank = conf.argsort(1).argsort(1)  # (B, T): 0 = least confident
    return masked & (rank >= n_keep_masked)


@torch.no_grad()
def unmask(model, ids, steps=12, method="maskgit", temperature=1.0, top_k=0, callback=None):
    """Fill every [MASK] in ids (B, T); tokens that are not [MASK] are never changed.

    maskgit: each step samples every blank, keeps the most confident, re-masks the least confident
             floor(N * cos(pi/2 * k/steps)) (confidence: log p of the sample + annealed Gumbel noise).
    mdlm:    ancestral: going from t to s = t - 1/steps, each blank is revealed with probability
             (t - s)/t, by a sample from the model.
    callback(step, ids) sees every intermediate sequence.
    """
    ids = ids.clone()
    n_masked = (ids == model.mask_id).sum(1, keepdim=True)  # (B, 1)
    for k in range(1, steps + 1):
        masked = ids == model.mask_id  # (B, T)
        if not masked.any():
            break
        logits = filter_logits(model.logits(ids), temperature, top_k)  # (B, T, V)
        probs = F.softmax(logits, dim=-1)
        sample = torch.multinomial(probs.flatten(0, 1), 1).view(ids.shape)  # (B, T)
        if method == "mdlm":
            t, s = 1 - (k - 1) / steps, 1 - k / steps
            reveal = masked & (torch.rand(ids.shape, device=ids.device) < (t - s) / t)
        else:
            conf = torch.log(torch.gather(probs, -1, sample.unsqueeze(-1)).squeeze(-1))  # (B, T)
            conf = conf + temperature * (1 - k / steps) * gumbel_noise(conf)
            n_keep_masked = torch.floor(n_masked * math.cos(math.pi / 2 * k / steps)).long()  # (B, 1)
            reveal = most_confident(conf, masked, n_keep_masked)
        ids = torch.where(reveal, sample, ids)
        if callback:
            callback(k, ids)
    return ids


# ---------------------------------------------------------------------------------------------
# Data and evaluation: the rest of the face train.py calls

def load_data(cfg, verbose=True):
    from data import text
    return text.load(text.prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.data_path, verbose=verbose))


class Data:
    """Random windows of block_size tokens from a prepared corpus; a batch is a function of its position."""
    unit = "tokens"

    def __init__(self, cfg, seed=0, verbose=True):
        self.cfg, self.seed = cfg, seed
        self.tok, self.tokens = load_data(cfg, verbose)
        for split, arr in self.tokens.items():
            if len(arr) <= cfg.block_size:
                raise UserError(f"the {split} text has {len(arr)} tokens, "
                                f"fewer than block_size={cfg.block_size}")

    def batch(self, split, pos, batch_size, device):
        data, T = self.tokens[split], self.cfg.block_size
        ix = np.random.default_rng([self.seed, split == "val", pos]).integers(0, len(data) - T, batch_size)
        x = torch.from_numpy(np.stack([data[i:i + T] for i in ix]).astype(np.int64))  # (B, T)
        return x.to(device, non_blocking=True)

    def items(self, batch):
        return batch.numel()


@torch.no_grad()
def evaluate(model, data, device, n_batches=40, batch_size=64):
    """Masked cross-entropy and accuracy on held-out text with BERT masking at mask_prob (whatever
    the objective), and, on the shapes world, accuracy on attribute words vs structural words."""
    from data.shapes import COLOUR_NAMES, NUMBERS, SHAPES, SIZES
    attribute = {*SHAPES, *COLOUR_NAMES, *SIZES, *NUMBERS, "yes", "no", "top", "bottom", "left", "right",
                 "center", "middle"}
    is_attr = word_mask(model.tok, attribute, device)
    model.eval()
    ce_sum, n, right = 0.0, 0, {True: [0, 0], False: [0, 0]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for k in range(n_batches):
            ids = data.batch("val", k, batch_size, device)
            inputs, labels = mask_tokens(ids, model.mask_id, model.n_regular, model.special_ids,
                                         model.cfg.mask_prob)
            logits = model.logits(inputs)
            sel = labels != -100
            ce_sum += F.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
            n += sel.sum().item()
            hit = logits.argmax(-1) == labels
            for a in (True, False):
                which = sel & (is_attr[ids] == a)
                right[a][0] += (hit & which).sum().item()
                right[a][1] += which.sum().item()
    model.train()
    out = {"val_masked_ce": ce_sum / n, "val_masked_acc": sum(r[0] for r in right.values()) / n}
    if model.cfg.corpus == "shapes":
        out["acc_attribute_words"] = right[True][0] / max(1, right[True][1])
        out["acc_structural_words"] = right[False][0] / max(1, right[False][1])
    return out


@torch.no_grad()
def monitor(model, data, device, n_batches=4, batch_size=64):
    """Cheaply, at every evaluation (and when trained weights are checked): masked-token accuracy on
    the first n_batches val batches, BERT masking at seed 0 -> {'val_masked_acc': accuracy}."""
    model.eval()
    torch.manual_seed(0)  # train.py and check_weights keep the training RNG apart
    right = n = 0
    for k in range(n_batches):
        ids = data.batch("val", k, batch_size, device)
        inputs, labels = mask_tokens(ids, model.mask_id, model.n_regular, model.special_ids,
                                     model.cfg.mask_prob)
        sel = labels != -100
        right += (model.logits(inputs).argmax(-1) == labels)[sel].sum().item()
        n += sel.sum().item()
    model.train()
    return {"val_masked_acc": right / n}
