"""Hallucination's cures beyond contrastive decoding: the small functions each cure is made of.

    VTI (Liu et al. 2024)        steer the hidden states along a direction per layer: the visual one
                                 is the mean (or first principal component) of the image tokens'
                                 states minus those of heavily masked copies; added at inference as
                                 x' = normalize(normalize(x) + alpha * normalize(d)) * |x|. Control:
                                 random directions of the same norms.
    DPO (Rafailov et al. 2023),  preference tuning against a frozen reference: -log sigmoid(beta *
    as POVID uses it             ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), the
                                 log-probabilities summed over the answer tokens; log 2 while pi = ref.
The study that runs them against their controls is the next step (issue 15); these are its parts.
"""
import math

import torch
import torch.nn.functional as F

from vlm import answer_positions

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
