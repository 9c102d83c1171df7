"""Masked generation: drawing scenes by unmasking image tokens (MaskGIT, Chang et al. 2022; MAGE, Li et
al. 2023, "MAsked Generative Encoder to Unify Representation Learning and Image Synthesis").

Masked modeling also draws. An image becomes a grid of discrete tokens (8 x 8 codes, one per patch);
a bidirectional Transformer learns to predict hidden codes from the visible ones and from the caption;
and a picture is drawn from an all-hidden grid by unmasking, a few codes at a time, the most confident
first (mlm.py's `unmask`, MaskGIT's cosine schedule: the same code that writes text there).

  tokenizer  a k-means codebook of 8 x 8 patches (mim.kmeans, fitted when training starts and kept in
             the checkpoint), where MaskGIT trains a VQ-GAN; `codebook_figures` says how much of a
             scene survives it, read by the world's own reader
  model      one stack of mae.Block over [caption tokens, image codes], bidirectional, padding unseen
  training   MAGE's variable mask ratio: each image hides a share drawn from a Gaussian (mean 0.55,
             s.d. 0.25) truncated to [mask_min, 1]; the loss is the cross-entropy of the hidden codes; the
             caption is dropped (`p_uncond`) so that the same model draws unconditionally too
  judge      data.shapes.read_scene reads each cell of a drawn scene as the object whose picture alone
             there is nearest: exact on real scenes, so what it reads in a drawn one is what was drawn

The shapes world then measures what FID cannot: is every object the caption asked for drawn, in its
colour and size, and nothing else? And does a generator hallucinate as a captioner does, drawing the
partner its biased world taught it to expect (a square beside a circle nobody asked for)?

Read `Config`, `GEN.codes` and `GEN.forward` (MAGE's masking), `GEN.logits`, `draw` (mlm.unmask over the
image positions), then `judge` and `evaluate`. docs/gen.md has the lessons.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from clip import Data as CaptionData
from data import to_tensor
from data.pairs import shapes_tokenizer
from data.shapes import PARTNER, SHAPES, ShapesSplit, World, caption, object_match, read_scene
from lib.common import UserError, at_least, divisible
from mae import Block, get_1d_sincos_pos_embed, init_weights, patchify, probes, unpatchify
from mim import kmeans, nearest_code
from mlm import masked_loss, unmask

MAX_CAPTION = 48  # caption positions (the world's longest caption is about 30 tokens)


@dataclass
class Config:
    img_size: int = 64              # pixels a side
    patch_size: int = 8             # pixels a side of each patch: one code
    codebook_size: int = 512        # codes in the k-means codebook of patches
    init_codebook: str = "kmeans"   # fitted when training starts (a checkpoint carries its own)
    n_layer: int = 4                # the stack over [caption, image codes]
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    mask_min: float = 0.5           # MAGE: the share hidden is drawn from [mask_min, 1]
    p_uncond: float = 0.1           # share of training images whose caption is dropped (1: MAGE's own, none)
    n_train: int = 20000            # training scenes (the VLM's: the same cache)
    n_eval: int = 500               # held-out scenes per split (val, ood)
    cooccur: float = 0.5            # the world's bias (data/shapes.py): the partner a generator may draw
    skew: float = 0.5
    noise: float = 0.0
    dataset = "shapes"              # not keys: generation is judged against the world's truth, and
    data_path = ""                  # every training caption names every object
    caption_share = 1.0

    def __post_init__(self):
        at_least(self, 1, "img_size", "patch_size", "n_layer", "n_head", "n_embd", "n_train", "n_eval")
        at_least(self, 2, "codebook_size")
        at_least(self, 0, "cooccur", "skew", "noise")
        divisible(self, "img_size", "patch_size")
        divisible(self, "n_embd", "n_head")
        if not 0 < self.mask_min <= 1:
            raise UserError(f"mask_min={self.mask_min} must be in (0, 1]")
        if not 0 <= self.p_uncond <= 1:
            raise UserError(f"p_uncond={self.p_uncond} must be in [0, 1]")
        if not 0 <= self.cooccur <= 1:
            raise UserError(f"cooccur={self.cooccur} must be in [0, 1]")


# 26 min on one CPU thread beside two other jobs (EPYC-25, docs/gen.md); batch_size = images
train_defaults = dict(batch_size=32, lr=1e-3, min_lr=1e-4, max_iters=3000, warmup_iters=100,
                      weight_decay=0.05, eval_interval=500, eval_iters=4)


def Data(cfg, seed=0, verbose=True):
    """Each scene with its caption: clip.py's pairs ({images, text})."""
    return CaptionData(cfg, seed, verbose)


def fit_codebook(cfg, n=500):
    """k-means over the patches of n scenes of the world drawn with world seed 0 (apart from training's)."""
    world = World(img_size=cfg.img_size, seed=0, cooccur=cfg.cooccur, skew=cfg.skew, noise=cfg.noise)
    images = ShapesSplit(world, "train", n, verbose=False).images
    patches = patchify(to_tensor(images, "cpu"), cfg.patch_size).flatten(0, 1)  # (n*L, p*p*3)
    return kmeans(patches, cfg.codebook_size)


def mage_ratio(n, mask_min, generator=None):
    """MAGE's mask ratios: n draws from a Gaussian (mean 0.55, s.d. 0.25) truncated to [mask_min, 1],
    by inverting its CDF at uniform draws between the CDF's values at the two ends -> (n,)."""
    ends = torch.special.ndtr((torch.tensor([mask_min, 1.0]) - 0.55) / 0.25)  # the CDF at mask_min and at 1
    u = ends[0] + (ends[1] - ends[0]) * torch.rand(n, generator=generator)  # (n,)
    return (0.55 + 0.25 * torch.special.ndtri(u)).clamp(mask_min, 1.0)


# ---------------------------------------------------------------------------------------------
# The model

class GEN(nn.Module):
    def __init__(self, cfg, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tok = tokenizer or shapes_tokenizer()
        self.text_vocab = self.tok.vocab_size  # ids below: words; from here on: image codes
        self.mask_id, self.pad_id = self.tok.mask_id, self.tok.pad_id
        self.n_image = (cfg.img_size // cfg.patch_size) ** 2
        D, V = cfg.n_embd, self.text_vocab + cfg.codebook_size
        fitted = cfg.init_codebook == "kmeans"
        p = cfg.patch_size
        codebook = fit_codebook(cfg) if fitted else torch.zeros(cfg.codebook_size, p * p * 3)  # (K, p*p*3)
        self.register_buffer("codebook", codebook)
        self.wte = nn.Embedding(V, D)
        wpe = get_1d_sincos_pos_embed(D, torch.arange(MAX_CAPTION + self.n_image)).float()  # (T, D)
        self.register_buffer("wpe", wpe, persistent=False)
        self.blocks = nn.ModuleList(Block(D, cfg.n_head, cfg.mlp_ratio) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.codebook_size)
        self.reinit()

    def reinit(self):
        """The weights drawn afresh (the codebook, a fitted tokenizer, stays)."""
        self.apply(init_weights)
        nn.init.normal_(self.wte.weight, std=self.cfg.n_embd ** -0.5)  # as in vlm.py: tokens, sin-cos alike

    def codes(self, images):
        """(N, 3, H, W) in [-1, 1] -> (N, L) ids of each patch's nearest code, offset past the words."""
        return nearest_code(patchify(images, self.cfg.patch_size), self.codebook) + self.text_vocab

    def pixels(self, ids):
        """(N, L) image ids -> (N, H, W, 3) uint8: each code's patch put back in its place."""
        patches = self.codebook[(ids - self.text_vocab).clamp(0, self.cfg.codebook_size - 1)]  # (N, L, p*p*3)
        x = unpatchify(patches, self.cfg.patch_size)  # (N, 3, H, W)
        return ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()

    def sequence(self, text, image_ids):
        """Captions (N, T) right-padded, image ids (N, L) -> (N, MAX_CAPTION + L): the caption padded to
        its fixed length, so every image code sits at the same position in every sequence."""
        text = text[:, :MAX_CAPTION]
        pad = torch.full((len(text), MAX_CAPTION - text.shape[1]), self.pad_id, device=text.device)
        return torch.cat([text, pad, image_ids], dim=1)

    def hidden(self, ids):
        """(N, T) ids -> (N, T, D) the last block's states, normalised. Padding is never attended to."""
        x = self.wte(ids) + self.wpe[:ids.shape[1]]  # (N, T, D)
        attend = (ids != self.pad_id)[:, None, None, :]  # (N, 1, 1, T): keys that are not padding
        for blk in self.blocks:
            x = blk(x, attend)
        return self.ln_f(x)

    def logits(self, ids):
        """(N, T) ids -> (N, T, V) logits over the whole vocabulary, every id but the image codes at -inf
        (so mlm.unmask draws codes only)."""
        codes = self.head(self.hidden(ids)).float()  # (N, T, K)
        words = torch.full((*codes.shape[:2], self.text_vocab), float("-inf"), device=codes.device)
        return torch.cat([words, codes], dim=-1)  # (N, T, V)

    def forward(self, batch):
        image = self.codes(batch["images"])  # (N, L)
        N, L = image.shape
        text = batch["text"]
        if self.training and self.cfg.p_uncond:  # dropped captions: all padding, the image alone
            drop = torch.rand(N, device=text.device) < self.cfg.p_uncond
            text = text.masked_fill(drop[:, None], self.pad_id)
        n_masked = torch.ceil(mage_ratio(N, self.cfg.mask_min) * L).long().to(image.device)  # (N,)
        rank = torch.rand(N, L, device=image.device).argsort(1).argsort(1)  # (N, L): a random order
        hidden = rank < n_masked[:, None]  # (N, L)
        inputs = self.sequence(text, image.masked_fill(hidden, self.mask_id))
        labels = self.sequence(torch.full_like(text, -100), image.masked_fill(~hidden, -100))
        labels[:, :MAX_CAPTION] = -100
        _, loss, acc = masked_loss(self.logits(inputs), labels)
        return loss, {"acc": acc}


Model = GEN


class Encoder(nn.Module):
    """MAGE's other half: the generator read as an encoder. A whole image (no caption, nothing hidden)
    -> its codes' states, for mae.probes beside the MAE's encoder."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        """(N, 3, H, W) -> ((N, L, D),): the states at the image positions (no cls token here)."""
        m = self.model
        no_caption = torch.full((len(images), 0), m.pad_id, dtype=torch.long, device=images.device)
        return (m.hidden(m.sequence(no_caption, m.codes(images)))[:, MAX_CAPTION:],)

    def reinit(self):
        self.model.reinit()


@torch.no_grad()
def draw(model, texts, steps=12, temperature=1.0, seed=0, method="maskgit", chunk=250):
    """Captions (a list; "" draws unconditionally) -> (N, H, W, 3) uint8 scenes drawn by unmasking, the
    most confident codes first (maskgit) or in a random order (mdlm: masked diffusion's sampler)."""
    device = next(model.parameters()).device
    model.eval()
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(texts), chunk):
        part = texts[i:i + chunk]
        text = torch.full((len(part), MAX_CAPTION), model.pad_id, device=device)
        for r, t in enumerate(part):
            x = (model.tok.encode(" " + t) + [model.tok.eot_id])[:MAX_CAPTION] if t else []
            text[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        blank = torch.full((len(part), model.n_image), model.mask_id, device=device)
        filled = unmask(model, model.sequence(text, blank), steps, method, temperature)
        out.append(model.pixels(filled[:, MAX_CAPTION:]))
    model.train()
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Evaluation: the judge reads what was drawn

def judge(world, images, scenes):
    """Drawn images against the scenes their captions describe -> {precision, recall, f1 of objects
    (shape, colour and size right), exact (every object right and nothing else), partner: the share of
    absent partners drawn, other: the share of other absent shapes drawn, partner_added and other_added:
    the same, counting only drawings that also keep every shape asked for (the unasked shape is an
    extra object, not a stand-in for one asked), distance: the mean distance of a drawn cell to its
    nearest reading}."""
    tp = said = truth = exact = 0
    partner = [0, 0, 0]  # [drawn, drawn as an extra, chances]: absent shapes that partner one asked for
    other = [0, 0, 0]  # the same for every other absent shape
    distance = []
    for img, objs in zip(images, scenes):
        drawn, dist = read_scene(world, img)
        distance.append(dist.mean())
        hit, n_said, n_true = object_match(drawn[:, [2, 1, 0]].tolist(), objs)
        tp, said, truth = tp + hit, said + n_said, truth + n_true
        exact += hit == n_said == n_true
        asked, shapes_drawn = objs[:, 0].tolist(), drawn[:, 0].tolist()
        kept = all(shapes_drawn.count(a) >= asked.count(a) for a in set(asked))  # nothing asked is missing
        for s in set(range(len(SHAPES))) - set(asked):
            count = partner if any(PARTNER[a] == s for a in asked) else other
            count[0] += s in shapes_drawn
            count[1] += s in shapes_drawn and kept
            count[2] += 1
    precision, recall = tp / max(said, 1), tp / max(truth, 1)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-9), "exact": exact / len(images),
            "partner": partner[0] / max(partner[2], 1), "other": other[0] / max(other[2], 1),
            "partner_added": partner[1] / max(partner[2], 1), "other_added": other[1] / max(other[2], 1),
            "distance": float(np.mean(distance))}


@torch.no_grad()
def codebook_figures(model, data, n=500):
    """What the tokenizer keeps: the share of codes in use, the squared error of each held-out patch put
    back as its code, and the share of scenes the world's reader still reads exactly after the round trip."""
    split = data.shapes["val"]
    n = min(n, len(split))
    images = to_tensor(split.images[:n], "cpu")
    ids = model.codes(images.to(model.codebook.device))  # (n, L)
    round_trip = model.pixels(ids)
    exact = sum(np.array_equal(read_scene(split.world, round_trip[i])[0], split.scene(i)) for i in range(n))
    error = ((to_tensor(round_trip, "cpu") - images) ** 2).mean().item()
    return {"codebook_use": ids.unique().numel() / model.cfg.codebook_size, "round_trip_mse": error,
            "round_trip_exact": exact / n}


def evaluate(model, data, device, steps=12, n_probe=4000):
    """The tokenizer's ceiling, then scenes drawn from the held-out captions of val (the bias) and ood
    (the bias broken), judged; unconditional scenes, judged by their distance to anything real; and
    MAGE's other half, the same model probed as an encoder (mae.probes: beside a random-init GEN)."""
    out = codebook_figures(model, data)
    out.update(probes(Encoder(model), "gen", data, device, n_probe))
    for split in ("val", "ood"):
        shapes = data.shapes[split]
        scenes = [shapes.scene(i) for i in range(len(shapes))]
        drawn = draw(model, [caption(s) for s in scenes], steps)
        out.update({f"{split}_{k}": v for k, v in judge(shapes.world, drawn, scenes).items()})
    readings = [read_scene(data.shapes["val"].world, x) for x in draw(model, [""] * 100, steps)]
    out["uncond_distance"] = float(np.mean([dist.mean() for _, dist in readings]))
    out["uncond_objects"] = float(np.mean([len(objs) for objs, _ in readings]))
    return out


def monitor(model, data, device, n=100):
    """Cheaply, at every evaluation: object F1 of scenes drawn from the first n ood captions."""
    shapes = data.shapes["ood"]
    scenes = [shapes.scene(i) for i in range(min(n, len(shapes)))]
    return {"ood_f1": judge(shapes.world, draw(model, [caption(s) for s in scenes]), scenes)["f1"]}
