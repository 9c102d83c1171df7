"""Hallucination's cures beyond contrastive decoding: the small functions each cure is made of.

    VTI (Liu et al. 2024)        steer the hidden states along a direction per layer: the visual one
                                 is the mean (or first principal component) of the image tokens'
                                 states minus those of heavily masked copies; added at inference as
                                 x' = normalize(normalize(x) + alpha * normalize(d)) * |x|. Control:
                                 random directions of the same norms. The textual direction per fused
                                 layer: the last caption token's state for the true caption minus that
                                 for the caption with the missing partner added.
    VHR ("Cracking the Code of    a head's vision-aware divergence (VHD) = how far its output at the
    Hallucination in LVLMs")     answer position moves between the real image and the blank canvas,
                                 averaged over calibration scenes; while decoding, the top-k heads'
                                 outputs are scaled by gamma. Controls: k random heads, the k least
                                 vision-aware heads.
Preference training (DPO) lives in `preference.py`. `python cures.py` runs every cure beside its
control on the study's model (see main).
"""
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from data.shapes import SHAPES, caption, exist_question
from preference import hallucinated_caption
from vlm import CAPTION_PROMPT, blank_like, prefix_lm_mask, row_images


def principal_direction(diffs, pca=False):
    """(N, D) differences -> (D,): their mean, or their first principal component turned to agree
    with the mean (a component's sign is arbitrary)."""
    mean = diffs.mean(0)
    if not pca:
        return mean
    _, _, v = torch.linalg.svd(diffs - mean, full_matrices=False)
    d = v[0] * mean.norm()
    return d if torch.dot(d, mean) >= 0 else -d


def steer(x, direction, alpha):
    """VTI's shift of states x (..., D) along direction (D,), their norms kept; alpha = 0 is x itself."""
    if alpha == 0:
        return x
    shifted = F.normalize(x, dim=-1) + alpha * F.normalize(direction, dim=-1)
    return F.normalize(shifted, dim=-1) * x.norm(dim=-1, keepdim=True)


def random_like(directions, gen):
    """The control: for each direction (D,), a random one of the same norm."""
    out = []
    for d in directions:
        r = torch.randn(d.shape, generator=gen, dtype=d.dtype)
        out.append(r / r.norm() * d.norm())
    return out


# ---------------------------------------------------------------------------------------------
# Attention heads (VHR)

def scale_input(scale, module, args):
    """A forward pre-hook: the module's input times scale (C,)."""
    return (args[0] * scale.to(args[0]),)


@contextmanager
def scaled_heads(model, heads, gamma):
    """Within the block, the outputs of heads [(layer, head)] are multiplied by gamma before the
    attention's output projection: each head's contribution, and only it, scales. Off: no cost."""
    by_layer = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    handles = []
    for layer, hs in by_layer.items():
        attn = model.blocks[layer].attn
        C = attn.proj.in_features
        scale = torch.ones(C)  # (C,): the heads' outputs lie side by side, hd channels each
        for h in hs:
            scale[h * C // attn.n_head:(h + 1) * C // attn.n_head] = gamma
        handles.append(attn.proj.register_forward_pre_hook(partial(scale_input, scale)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def head_outputs(model, images, prompt):
    """Every head's output at the answer position (the last one) -> (L, B, h, hd)."""
    outs = []

    def hook(proj, args):
        y = args[0][:, -1]  # (B, C)
        outs.append(y.view(y.shape[0], model.cfg.n_head, -1))  # (B, h, hd)
    handles = [blk.attn.proj.register_forward_pre_hook(hook) for blk in model.blocks]
    try:
        model.start(images, prompt)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)  # (L, B, h, hd)


@torch.no_grad()
def vhd_scores(model, data, n_scenes, device, seed=0):
    """Each head's vision-aware divergence over n_scenes training scenes, asked "is there a
    {shape}?" about a random shape: mean |out(image) - out(blank)| -> (L, h)."""
    rng = np.random.default_rng([seed, 17])
    scenes = rng.choice(len(data.shapes["train"]), size=n_scenes, replace=False)
    shapes = rng.integers(len(SHAPES), size=n_scenes)
    b = data.make_batch("train", scenes, [(exist_question(s), "") for s in shapes], device)
    images = row_images(b)
    real = head_outputs(model, images, b["prompt"])
    blank = head_outputs(model, blank_like(images), b["prompt"])
    return (real - blank).norm(dim=-1).mean(1)  # (L, h)


def pick_heads(vhd, k, how, gen=None):
    """k heads [(layer, head)] of a VHD table (L, h): the most vision-aware (top, VHR), the least
    (least, a control) or random ones (random, the other control)."""
    flat = vhd.flatten()
    if how == "top":
        idx = flat.topk(k).indices
    elif how == "least":
        idx = (-flat).topk(k).indices
    else:
        idx = torch.randperm(len(flat), generator=gen)[:k]
    n_head = vhd.shape[1]
    return [(int(i) // n_head, int(i) % n_head) for i in idx]


# ---------------------------------------------------------------------------------------------
# Latent steering (VTI)

def steer_output(direction, alpha, module, args, out):
    """A forward hook: the module's output steered along direction."""
    return steer(out, direction.to(out), alpha)


@contextmanager
def steered(modules, directions, alpha):
    """Within the block, each module's output is steered along its direction (VTI)."""
    handles = [m.register_forward_hook(partial(steer_output, d, alpha)) for m, d in zip(modules, directions)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_outputs(blocks, run):
    """Each block's output while run() runs -> [tensor per block]."""
    outs = []
    handles = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outs


def masked_copies(images, keep, gen, patch):
    """Copies of images (B, 3, H, W) with all but a `keep` share of patches (at least one) painted
    the blank canvas (VTI masks 99% of the image)."""
    B, _, H, W = images.shape
    g = H // patch
    n_keep = max(1, round(keep * g * g))
    kept = torch.rand(B, g * g, generator=gen).argsort(1) < n_keep  # (B, g*g): n_keep random patches
    kept = kept.view(B, 1, g, 1, g, 1).expand(B, 1, g, patch, g, patch).reshape(B, 1, H, W)
    return torch.where(kept.to(images.device), images, blank_like(images))


@torch.no_grad()
def visual_directions(model, images, gen, trials=4, keep=0.01, pca=False):
    """Per tower block: the image tokens' states minus their mean over masked copies, averaged (or
    the first principal component) over images -> [(1+L, Dv) per block]."""
    real = block_outputs(model.vision.blocks, lambda: model.vision(images))
    masked = [block_outputs(model.vision.blocks, lambda: model.vision(
        masked_copies(images, keep, gen, model.cfg.patch_size))) for _ in range(trials)]
    out = []
    for i, r in enumerate(real):
        diffs = r - torch.stack([m[i] for m in masked]).mean(0)  # (B, 1+L, Dv)
        out.append(principal_direction(diffs.flatten(1), pca).view(r.shape[1:]))
    return out


@torch.no_grad()
def textual_directions(model, data, n_scenes, device, seed=0, pca=False):
    """Per fused block: the last caption token's state for the true caption minus that for the one
    with the missing partner added, over training scenes that have one -> [(D,) per block]."""
    rng = np.random.default_rng([seed, 19])
    train, scenes, pairs = data.shapes["train"], [], []
    for i in rng.permutation(len(train))[:4 * n_scenes].tolist():
        bad = hallucinated_caption(train.scene(i), rng)
        if bad is not None and len(scenes) < 2 * n_scenes:
            scenes += [i, i]
            pairs += [(CAPTION_PROMPT, caption(train.scene(i))), (CAPTION_PROMPT, bad)]
    b = data.make_batch("train", np.array(scenes), pairs, device)
    x, key_valid, n_prefix = model.sequence(row_images(b), b["prompt"], b["answer"])
    last = n_prefix + (b["answer"] != model.tok.pad_id).sum(1) - 1  # (N,): each text's end-of-text
    states = block_outputs(model.blocks, lambda: model.run(x, prefix_lm_mask(key_valid, n_prefix)))
    rows = torch.arange(len(scenes), device=x.device)
    return [principal_direction(s[rows, last][0::2] - s[rows, last][1::2], pca) for s in states]
