"""Contrastive eyes: CLIP (Radford et al. 2021) and FLIP (Li et al. 2023) on the shapes world.

The other way to join images and words. No text is generated: an image tower and a text tower each
map their input to one vector in a shared space, and training pulls each image's vector towards its own
caption's and away from the other captions of the batch (the symmetric InfoNCE loss): a batch of N pairs
is an N-way classification, images to texts and texts to images, at a learned temperature.

  image tower  mae.ViTEncoder (train.py mae's shapes, so a VLM can start from it); the image is its
               cls token, projected
  text tower   the same Block, causal (CLIP's); the text is the feature at its end-of-text token,
               which under a causal mask has read the whole caption and no padding, projected
  FLIP         --image_mask_ratio drops that share of the patches before the image tower while
               training (MAE's random masking, no decoder): fewer tokens, a cheaper step;
               --unmasked_from=N trains every patch again from step N (FLIP's short unmasked tuning)

The shapes world knows every scene's truth, so what a contrastive model cannot tell apart is exact
here: `negatives` scores each held-out image's caption against the same caption edited one way
(data.shapes.negative: an absent object added, a present one removed, colours or positions swapped),
and against the per-object score the field proposed (F-CLIPScore, Oh and Hwang 2025: the caption's
score averaged with each object phrase's own). OHD-Caps (Liu et al. 2024) asked the same of CLIP.

Read `Config`, `CLIP` (encode_image, encode_text, forward), `clip_loss`, then the evaluation:
`retrieval`, `zero_shot` and `negatives`. docs/clip.md has the lessons, with their controls.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import stream_indices, to_tensor
from data.captioned import FolderPairs, folder_tokenizer, read_folder
from data.pairs import ShapesPairs, shapes_tokenizer
from data.shapes import COLOUR_NAMES, NEGATIVES, SHAPES, SIZES, caption, describe, negative
from lib.common import UserError, at_least, divisible, one_of
from mae import Block, ViTEncoder, get_1d_sincos_pos_embed, init_weights

MAX_TEXT = 77  # CLIP's context: longer captions are cut, keeping their end-of-text token


@dataclass
class Config:
    img_size: int = 64              # pixels a side
    patch_size: int = 8             # pixels a side of each patch
    dataset: str = "shapes"         # shapes (the world) | folder: --data_path=DIR of captioned images
    data_path: str = ""             # the folder, with --dataset=folder (data/captioned.py)
    n_train: int = 20000            # training scenes (the VLM's: the same cache)
    n_eval: int = 500               # held-out scenes per split (val, ood)
    n_layer: int = 4                # image tower (mae.ViTEncoder); its shapes are train.py mae's...
    n_head: int = 4                 # ...so that train.py vlm --init_vision=out-clip/ckpt.pt can start
    n_embd: int = 128               # from it
    text_n_layer: int = 2           # text tower: causal blocks
    text_n_head: int = 4
    text_n_embd: int = 128
    embed_dim: int = 128            # the shared space both towers project to
    mlp_ratio: float = 4.0          # MLP width / model width (both towers)
    image_mask_ratio: float = 0.0   # FLIP: share of patches dropped before the image tower in training
    unmasked_from: int = 0          # FLIP's unmasked tuning: from this step on, none dropped (0: never)
    caption_share: float = 1.0      # each training caption names each object with this chance (at least
                                    # one), as web captions leave objects out; held-out captions name all
    cooccur: float = 0.5            # the world's bias (data/shapes.py), as for train.py vlm
    skew: float = 0.5
    noise: float = 0.0

    def __post_init__(self):
        at_least(self, 1, "img_size", "patch_size", "n_train", "n_eval", "n_layer", "n_head", "n_embd",
                 "text_n_layer", "text_n_head", "text_n_embd", "embed_dim")
        at_least(self, 0, "unmasked_from", "cooccur", "skew", "noise")
        if not 0 < self.caption_share <= 1:
            raise UserError(f"caption_share={self.caption_share} must be in (0, 1]")
        divisible(self, "img_size", "patch_size")
        divisible(self, "n_embd", "n_head")
        divisible(self, "text_n_embd", "text_n_head")
        one_of(self, "dataset", ("shapes", "folder"))
        if self.dataset == "folder" and not self.data_path:
            raise UserError("--dataset=folder needs --data_path=DIR, a folder of captioned images")
        if self.dataset == "shapes" and self.data_path:
            raise UserError(f"--data_path={self.data_path} does nothing in the shapes world; "
                            f"add --dataset=folder")
        if not 0 <= self.image_mask_ratio < 1:
            raise UserError(f"image_mask_ratio={self.image_mask_ratio} must be in [0, 1)")
        if self.unmasked_from and not self.image_mask_ratio:
            raise UserError("--unmasked_from tunes without FLIP's masking; it needs --image_mask_ratio > 0")
        if not 0 <= self.cooccur <= 1:
            raise UserError(f"cooccur={self.cooccur} must be in [0, 1]")
        if self.mlp_ratio <= 0:
            raise UserError(f"mlp_ratio={self.mlp_ratio} must be positive")

    def check_flags(self, given):
        """Keys given that would do nothing (the world's, with a folder) are a mistake, said first."""
        world = [k for k in given if k in ("n_train", "n_eval", "cooccur", "skew", "noise")]
        if self.dataset == "folder" and world:
            raise UserError(f"--{world[0]} is the shapes world's; a folder brings its own images and texts")
        if self.dataset == "folder":  # read now, before anything is printed
            read_folder(self.data_path)


# about 23 min on one CPU thread (EPYC-25, docs/clip.md); batch_size = image-caption pairs, the N of N-way
train_defaults = dict(batch_size=128, lr=1e-3, min_lr=1e-4, max_iters=1500, warmup_iters=100,
                      weight_decay=0.1, eval_interval=250, eval_iters=4)


# ---------------------------------------------------------------------------------------------
# The data: each image with one caption

def encode_captions(tok, texts):
    """Captions -> (N, T) ids, each ended by end-of-text, right-padded to the longest."""
    ids = [tok.encode(" " + t)[:MAX_TEXT - 1] + [tok.eot_id] for t in texts]
    T = max(len(x) for x in ids)
    return torch.tensor([x + [tok.pad_id] * (T - len(x)) for x in ids], dtype=torch.long)


def named_part(objs, share, rng):
    """The objects a partial caption names: each with chance `share`, at least one, in reading order."""
    keep = rng.random(len(objs)) < share
    if not keep.any():
        keep[rng.integers(len(objs))] = True
    return objs[keep]


class Data:
    """Image-caption pairs: the shapes world's scenes with their true captions, or a user's folder's
    captioned images (one of each image's captions, drawn). A batch {images (N, 3, H, W), text (N, T)}
    is a pure function of its position, as everywhere here."""
    unit = "pairs"

    def __init__(self, cfg, seed=0, verbose=True):
        self.cfg, self.seed = cfg, seed
        if cfg.dataset == "folder":
            self.source = FolderPairs(cfg, seed, verbose)
            self.keep = {}
            for split in ("train", "val"):  # the images with a caption
                self.keep[split] = [i for i, r in enumerate(self.source.records[split]) if r["captions"]]
            if not all(self.keep.values()):
                raise UserError(f"{cfg.data_path}: CLIP needs captions in both splits, train and val")
            self.shapes = None
        else:
            self.source = ShapesPairs(cfg, seed, verbose)
            self.keep = {s: range(len(split)) for s, split in self.source.shapes.items()}
            self.shapes = self.source.shapes
        self.tok = self.source.tok

    def read_with(self, ckpt):
        self.tok = self.source.read_with(ckpt).tok
        return self

    def fingerprint(self):
        return self.source.fingerprint()

    def texts(self, split, rows, rng):
        """The captions of the images numbered rows (of the split's kept ones); in training, each object
        named with the chance caption_share (at least one, in reading order)."""
        if self.shapes is not None:
            scenes = [self.shapes[split].scene(i) for i in rows]
            if split == "train" and self.cfg.caption_share < 1:
                scenes = [named_part(s, self.cfg.caption_share, rng) for s in scenes]
            return [caption(s) for s in scenes]
        records = [self.source.records[split][self.keep[split][i]] for i in rows]
        return [r["captions"][rng.integers(len(r["captions"]))] for r in records]

    def images(self, split, rows):
        return self.source.images(split)[np.asarray(self.keep[split])[rows]]

    def batch(self, split, pos, batch_size, device):
        n = len(self.keep[split])
        rows = np.sort(stream_indices(n, self.seed + (split != "train"), pos * batch_size, batch_size))
        rng = np.random.default_rng([self.seed, split != "train", pos])
        return {"images": to_tensor(self.images(split, rows), device),
                "text": encode_captions(self.tok, self.texts(split, rows, rng)).to(device)}

    def items(self, batch):
        return len(batch["images"])


# ---------------------------------------------------------------------------------------------
# The model: two towers, one space

def clip_loss(logits, same):
    """Symmetric InfoNCE: logits (N, N), image i against text j; same (N, N) bool, text j reads as text
    i does. Each image's target is its caption, spread evenly over the batch's identical captions (in
    the shapes world two scenes often share one: "a small red circle"), and so is each text's -> ()."""
    target = same.float() / same.sum(1, keepdim=True)  # (N, N): rows sum to 1; the identity when all differ
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2


class CLIP(nn.Module):
    def __init__(self, cfg, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        if tokenizer is None:
            tokenizer = folder_tokenizer(cfg.data_path) if cfg.dataset == "folder" else shapes_tokenizer()
        self.tok = tokenizer
        D = cfg.text_n_embd
        self.encoder = ViTEncoder(cfg.img_size, cfg.patch_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                                  cfg.mlp_ratio)  # named as the MAE's, so that load_encoder reads either
        self.wte = nn.Embedding(self.tok.vocab_size, D)
        wpe = get_1d_sincos_pos_embed(D, torch.arange(MAX_TEXT)).float()  # (MAX_TEXT, D)
        self.register_buffer("wpe", wpe, persistent=False)
        self.text_blocks = nn.ModuleList(Block(D, cfg.text_n_head, cfg.mlp_ratio)
                                         for _ in range(cfg.text_n_layer))
        self.text_norm = nn.LayerNorm(D)
        self.image_proj = nn.Linear(cfg.n_embd, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(D, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's start: temperature 0.07
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training steps, for unmasked_from
        self.apply(init_weights)
        nn.init.normal_(self.wte.weight, std=D ** -0.5)  # as in vlm.py: tokens and sin-cos on equal terms
        nn.init.normal_(self.encoder.cls_token, std=0.02)

    def mask_ratio(self):
        """FLIP: the share of patches dropped now (training only, and not in the unmasked tuning)."""
        tuning = self.cfg.unmasked_from and self.step.item() >= self.cfg.unmasked_from
        return self.cfg.image_mask_ratio if self.training and not tuning else 0.0

    def encode_image(self, images):
        """(N, 3, H, W) -> (N, E), unit length: the tower's cls token (of the kept patches), projected."""
        x = self.encoder(images, self.mask_ratio())[0]  # (N, 1 + kept, D)
        return F.normalize(self.image_proj(x[:, 0]), dim=-1)

    def encode_text(self, text):
        """(N, T) ids, right-padded -> (N, E), unit length: the feature at each end-of-text token."""
        x = self.wte(text) + self.wpe[:text.shape[1]]  # (N, T, D)
        for blk in self.text_blocks:
            x = blk(x, is_causal=True)
        x = self.text_norm(x)
        ends = (text != self.tok.pad_id).sum(1) - 1  # (N,): the end-of-text positions
        return F.normalize(self.text_proj(x[torch.arange(len(x)), ends]), dim=-1)  # (N, E)

    def forward(self, batch):
        img, txt = self.encode_image(batch["images"]), self.encode_text(batch["text"])  # (N, E) each
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP clamps the inverse temperature at 100
        logits = scale * img @ txt.T  # (N, N)
        same = (batch["text"][:, None] == batch["text"][None]).all(-1)  # (N, N): identical captions
        loss = clip_loss(logits.float(), same)
        if self.training:
            self.step += 1
        return loss, {"temperature": 1 / scale.detach()}


Model = CLIP


# ---------------------------------------------------------------------------------------------
# Evaluation: retrieval, zero-shot recognition and hard negatives, on held-out scenes

@torch.no_grad()
def embed(model, data, split, device, n=None, chunk=250):
    """A held-out split's images and captions, each embedded -> (N, E), (N, E), [captions]."""
    model.eval()
    n = min(n or len(data.keep[split]), len(data.keep[split]))
    rng = np.random.default_rng([data.seed, 2])
    texts = data.texts(split, range(n), rng)
    img = [model.encode_image(to_tensor(data.images(split, np.arange(i, min(i + chunk, n))), device))
           for i in range(0, n, chunk)]
    txt = text_vectors(model, texts, device, chunk)
    model.train()
    return torch.cat(img).float().cpu(), txt, texts


@torch.no_grad()
def text_vectors(model, texts, device, chunk=250):
    out = [model.encode_text(encode_captions(model.tok, texts[i:i + chunk]).to(device))
           for i in range(0, len(texts), chunk)]
    return torch.cat(out).float().cpu()  # (len(texts), E)


def retrieval(img, txt, texts, ks=(1, 5)):
    """Recall@k both ways: the share of images whose k best texts include their caption, and of captions
    whose k best images include theirs. A text or image counts as found when its caption reads the same
    as the truth's: identical captions cannot be told apart by anyone -> {'i2t_r1': ...}."""
    sim = img @ txt.T  # (N, N)
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    label = torch.tensor([ids[t] for t in texts])
    same = label[:, None] == label[None]  # (N, N)
    out = {}
    for k in ks:
        k_eff = min(k, len(texts))
        out[f"i2t_r{k}"] = same.gather(1, sim.topk(k_eff, dim=1).indices).any(1).float().mean().item()
        out[f"t2i_r{k}"] = same.gather(1, sim.T.topk(k_eff, dim=1).indices).any(1).float().mean().item()
    return out


def class_vectors(model, names, device, prompts):
    """CLIP's prompt ensembling: each class's text vector is the mean of its prompts' -> (K, E)."""
    vecs = []
    for name in names:
        vecs.append(text_vectors(model, [p.format(name) for p in prompts], device).mean(0))
    return F.normalize(torch.stack(vecs), dim=-1)


def zero_shot(model, data, split, device, img=None):
    """Zero-shot recognition on the split's one-object scenes, two ways -> {'zero_shot_shape': acc, ...}:
    the best prompt: of the 72 descriptions "a {size} {colour} {shape}", the one that scores highest
    names the shape and the colour; ensembled: each shape's vector is the mean of its 12 prompts (every
    size and colour), as CLIP ensembles phrasings, and likewise each colour's."""
    scenes = [data.shapes[split].scene(i) for i in range(len(data.keep[split]))]
    one = [i for i, s in enumerate(scenes) if len(s) == 1]
    if img is None:
        img = embed(model, data, split, device)[0]
    model.eval()
    kinds = []  # (shape, colour, size): every object the world draws
    for shape in range(len(SHAPES)):
        for colour in range(len(COLOUR_NAMES)):
            kinds += [(shape, colour, size) for size in range(len(SIZES))]
    prompts = [f"a {SIZES[z]} {COLOUR_NAMES[c]} {SHAPES[s]}" for s, c, z in kinds]
    best = (img[one] @ text_vectors(model, prompts, device).T).argmax(1)  # (n_one,): one of the 72
    out = {"zero_shot_scenes": len(one)}
    shape_prompts, colour_prompts = [], []
    for size in SIZES:
        shape_prompts += [f"a {size} {colour} {{}}" for colour in COLOUR_NAMES]
        colour_prompts += [f"a {size} {{}} {shape}" for shape in SHAPES]
    for what, names, ensemble, column in (("shape", SHAPES, shape_prompts, 0),
                                          ("colour", COLOUR_NAMES, colour_prompts, 1)):
        truth = torch.tensor([int(scenes[i][0, column]) for i in one])
        said = torch.tensor([kinds[b][column] for b in best.tolist()])
        out[f"zero_shot_{what}"] = (said == truth).float().mean().item()
        averaged = (img[one] @ class_vectors(model, names, device, ensemble).T).argmax(1)  # (n_one,)
        out[f"zero_shot_{what}_ensembled"] = (averaged == truth).float().mean().item()
    model.train()
    return out


def popularity(data):
    """Shapes, most frequent in the training scenes first (POPE's popular negatives)."""
    return np.argsort(-data.shapes["train"].presence(0, len(SHAPES)).sum(0), kind="stable").tolist()


def edited_scenes(data, split):
    """For each kind of hard negative, the split's scenes that allow it -> {kind: (rows, true scenes,
    edited scenes)}; each edit drawn with its own seed (scene, kind), the same for every model."""
    shapes, popular, out = data.shapes[split], popularity(data), {}
    for k, kind in enumerate(NEGATIVES):
        rows, trues, edits = [], [], []
        for i in range(len(data.keep[split])):
            rng = np.random.default_rng([i, k])
            edited = negative(kind, shapes.scene(i), rng, popular, shapes.world.grid)
            if edited is not None:
                rows.append(i)
                trues.append(shapes.scene(i))
                edits.append(edited)
        out[kind] = (rows, trues, edits)
    return out


def wins(true, neg):
    """The share of pairs where the true caption scores higher; a tie counts half."""
    return ((true > neg).float() + 0.5 * (true == neg).float()).mean().item()


def negatives(model, data, split, device, img=None):
    """How often the true caption outscores the same caption edited one way (data.shapes.negative), per
    kind, over the split's scenes that allow the edit; beside it the per-object score (F-CLIPScore: the
    mean of the caption's score and each object phrase's) -> {'neg_{kind}': share, ...}."""
    if img is None:
        img = embed(model, data, split, device)[0]
    model.eval()
    out = {}
    for kind, (rows, trues, edits) in edited_scenes(data, split).items():
        for name, per_object in (("neg", False), ("neg_per_object", True)):
            true = scores(model, img[rows], trues, device, per_object)
            out[f"{name}_{kind}"] = wins(true, scores(model, img[rows], edits, device, per_object))
    model.train()
    return out


def scores(model, img, scenes, device, per_object=False):
    """Each image's cosine with its scene's caption -> (n,); per_object: averaged with each of the
    caption's object phrases' ("a small red circle") cosines (F-CLIPScore)."""
    full = (img * text_vectors(model, [caption(s) for s in scenes], device)).sum(1)  # (n,)
    if not per_object:
        return full
    phrases, owner = [], []
    for i, scene in enumerate(scenes):
        phrases += [f"a {describe(o)}" for o in scene.tolist()]
        owner += [i] * len(scene)
    owner = torch.tensor(owner)
    each = (img[owner] * text_vectors(model, phrases, device)).sum(1)  # (n_phrases,)
    total = full + torch.zeros(len(scenes)).index_add_(0, owner, each)
    return total / (1 + torch.bincount(owner, minlength=len(scenes)))


def evaluate(model, data, device):
    """Retrieval on every held-out split; in the shapes world also zero-shot recognition and the hard
    negatives, on val (the training world's bias) and ood (the bias broken)."""
    out = {}
    for split in ("val", "ood") if data.shapes is not None else ("val",):
        img, txt, texts = embed(model, data, split, device)
        out.update({f"{split}_{k}": v for k, v in retrieval(img, txt, texts).items()})
        if data.shapes is not None:
            out.update({f"{split}_{k}": v for k, v in zero_shot(model, data, split, device, img).items()})
            out.update({f"{split}_{k}": v for k, v in negatives(model, data, split, device, img).items()})
    return out


def monitor(model, data, device, n=250):
    """Cheaply, at every evaluation: image-to-text recall@1 among the first n val scenes."""
    img, txt, texts = embed(model, data, "val", device, n)
    return {"val_i2t_r1": retrieval(img, txt, texts, ks=(1,))["i2t_r1"]}
