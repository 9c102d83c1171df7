"""Hallucination's cures beyond contrastive decoding: the small functions each cure is made of.

    VTI (Liu et al. 2024)        steer the hidden states along a direction per layer: the visual one
                                 is the mean (or first principal component) of the image tokens'
                                 states minus those of heavily masked copies; added at inference as
                                 x' = normalize(normalize(x) + alpha * normalize(d)) * |x|. Control:
                                 random directions of the same norms.
    DPO (Rafailov et al. 2023),  preference tuning against a frozen reference: -log sigmoid(beta *
    as POVID uses it             ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), the
                                 log-probabilities summed over the answer tokens; log 2 while pi = ref.
    VHR ("Cracking the Code of    a head's vision-aware divergence (VHD) = how far its output at the
    Hallucination in LVLMs")     answer position moves between the real image and the blank canvas,
                                 averaged over calibration scenes; while decoding, the top-k heads'
                                 outputs are scaled by gamma. Controls: k random heads, the k least
                                 vision-aware heads.
The study that runs them against their controls is the next step (issue 15); these are its parts.
"""
import math
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from data.shapes import SHAPES, exist_question
from vlm import answer_positions, blank_like, row_images

LOG2 = math.log(2)  # the DPO loss where the policy is still the reference


def answer_logprob(model, images, prompt, answer):
    """log pi(answer | image, prompt), summed over the answer's real tokens -> (B,)."""
    logits = answer_positions(model.logits(images, prompt, answer), answer.shape[1])  # (B, A, V)
    logp = logits.log_softmax(-1).gather(-1, answer[..., None])[..., 0]  # (B, A)
    real = answer != model.tok.pad_id
    return (logp.masked_fill(~real, 0.0)).sum(1)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1):
    """DPO on summed log-probabilities of the preferred (w) and dispreferred (l) answers -> scalar."""
    margin = (pi_w - ref_w) - (pi_l - ref_l)  # (B,)
    return -F.logsigmoid(beta * margin).mean()


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
