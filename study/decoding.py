"""Decoding against hallucination: small functions on next-token logits, and one batched decoder.

Every contrast keeps only the tokens that pass the plausibility cut on the clean logits
(p >= b * max p), so where one token passes it is the answer whatever the second branch says; the
second branch (a noised, blank or flipped image) runs only for the rows where it can matter, in one
batch with the clean rows, each row with its own KV cache:
    VCD (Leng et al. 2024)     (1+a)*logits(image) - a*logits(image under diffusion noise, t=500), cut
    the cut alone              the control: how much of VCD's gain is the cut, not the contrast
    no-image contrast          the same formula against a blank canvas (the language prior; as in
                               M3ID's unconditioned branch, without its length schedule)
    RITUAL (Woo et al. 2024)   logits(image) + k*logits(randomly flipped or rotated image), cut
    M3ID (Favero et al. 2024)  logits(image) + w_t*(logits(image) - logits(blank)), cut, where
                               w_t = (1 - g_t)/g_t, g_t = exp(-lambda*t) after t generated tokens: the
                               contrast grows as the image's hold on the text fades (0 at t = 0)
One method reads no second image but the model's own earlier layers:
    DeCo (Wang et al. 2024)    the final logits' candidates (top-k, then top-p); in a window of earlier
                               layers, the anchor = the layer whose logit lens gives one candidate the
                               highest probability c; final + a*c*logits(anchor), candidates only
Settings (alpha, beta, kappa, noise_step, m3id_lambda, deco_*) come from hallucination.StudyConfig.
"""
import math
from dataclasses import dataclass

import torch

from data.pairs import blank_like
from mlm import gumbel_noise


def noise_coefficients(t, steps=1000):
    """VCD's forward diffusion at step t: x_t = a * x_0 + s * eps -> (a, s), sigmoid beta schedule."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    return alpha_bar.sqrt().item(), (1 - alpha_bar).sqrt().item()


def plausible(logits, beta=0.1):
    """VCD's adaptive plausibility constraint: the tokens with p >= beta * max p (temperature 1) -> bool."""
    return logits >= math.log(beta) + logits.max(-1, keepdim=True).values


def plausibility_cut(logits, beta=0.1):
    """The clean logits with every implausible token at -inf."""
    return logits.masked_fill(~plausible(logits, beta), float("-inf"))


def contrastive_logits(logits, logits_cd, alpha=1.0, beta=0.1):
    """VCD: (1+alpha)*logits - alpha*logits_cd, with the plausibility cut computed on the clean logits."""
    return ((1 + alpha) * logits - alpha * logits_cd).masked_fill(~plausible(logits, beta), float("-inf"))


def ritual_logits(logits, logits_t, kappa=1.0, beta=0.1):
    """RITUAL: logits + kappa*logits of the transformed image; the cut on the clean logits, as in its code."""
    return (logits + kappa * logits_t).masked_fill(~plausible(logits, beta), float("-inf"))


def m3id_weight(t, lam):
    """M3ID's weight after t generated tokens: (1 - g_t) / g_t, g_t = exp(-lam * t); that is e^(lam t) - 1."""
    g = math.exp(-lam * t)
    return (1 - g) / g


def m3id_logits(logits, logits_u, t, lam, beta=0.1):
    """M3ID: logits + w_t * (logits - logits without the image), the cut on the clean logits as every
    contrast here has it."""
    scores = logits + m3id_weight(t, lam) * (logits - logits_u)
    return scores.masked_fill(~plausible(logits, beta), float("-inf"))


def deco_candidates(logits, top_k=20, top_p=0.9):
    """DeCo's candidates: the top_k tokens of the final logits, then the fewest of them whose
    probability adds up to top_p (at least one) -> bool (B, V)."""
    p, idx = logits.softmax(-1).topk(min(top_k, logits.shape[-1]), -1)  # (B, k), descending
    keep = p.cumsum(-1) - p < top_p  # a token is kept if the ones before it fall short of top_p
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, keep)


def deco_logits(logits, early, alpha=0.6, top_k=20, top_p=0.9):
    """DeCo: logits (B, V) and the window's logit-lens logits (W, B, V) -> scores (B, V)."""
    cand = deco_candidates(logits, top_k, top_p)  # (B, V)
    conf = early.softmax(-1).masked_fill(~cand, 0).amax(-1)  # (W, B): each layer's best candidate
    c, anchor = conf.max(0)  # (B,)
    picked = early[anchor, torch.arange(logits.shape[0])]  # (B, V)
    return (logits + alpha * c[:, None] * picked).masked_fill(~cand, float("-inf"))


def deco_window(n_layer):
    """The earlier layers DeCo reads (block outputs, 1 = the first block): the second half before the
    last, as its LLaVA runs read layers 20-28 of 32."""
    return list(range(max(1, n_layer // 2), n_layer))


def transform(img, k):
    """RITUAL's random transformations that keep what is in a scene: k = 0, 1 flips, 2, 3 quarter turns."""
    if k == 0:
        return img.flip(-1)
    if k == 1:
        return img.flip(-2)
    return torch.rot90(img, k - 1, (-2, -1))


def cat_states(a, b):
    """Two generation states (VLM.start's) at the same position -> one, rows of a then rows of b: how a
    second-branch row joins the batch late."""
    caches = []
    for cache_a, cache_b in zip(a["caches"], b["caches"]):  # one per layer: keys and values
        caches.append({k: torch.cat([cache_a[k], cache_b[k]]) for k in cache_a})
    return {"caches": caches, "key_valid": torch.cat([a["key_valid"], b["key_valid"]]),
            "pos": torch.cat([a["pos"], b["pos"]])}


@dataclass(frozen=True)
class Method:
    second: str = ""      # the second branch's image: noised, blank, transformed, or none
    mix: str = ""         # vcd (contrast), ritual (sum), m3id (growing contrast); deco: earlier layers
    cut: bool = False     # the plausibility cut on the clean logits (every two-branch method has it)
    sample: bool = False  # sample at T=1 (Gumbel max), else greedy


METHODS = {
    "greedy": Method(),
    "sampling": Method(sample=True),
    "cut only (sampling)": Method(cut=True, sample=True),
    "VCD (sampling)": Method(second="noised", mix="vcd", cut=True, sample=True),
    "VCD (greedy)": Method(second="noised", mix="vcd", cut=True),
    "no-image contrast (sampling)": Method(second="blank", mix="vcd", cut=True, sample=True),
    "RITUAL (sampling)": Method(second="transformed", mix="ritual", cut=True, sample=True),
    "M3ID (greedy)": Method(second="blank", mix="m3id", cut=True),
    "DeCo (greedy)": Method(mix="deco"),
}


def mix(method, logits, logits_2, study, t=0):
    """The clean and the second branch's logits after t generated tokens -> scores, implausible tokens
    (on the clean) at -inf."""
    if method.mix == "ritual":
        return ritual_logits(logits, logits_2, study.kappa, study.beta)
    if method.mix == "m3id":
        return m3id_logits(logits, logits_2, t, study.m3id_lambda, study.beta)
    return contrastive_logits(logits, logits_2, study.alpha, study.beta)


def branch_draws(n, second, gen):
    """The second branch's random draws for each of n rows, made up front so that they never depend on
    which rows ask: a noise seed per image (VCD) or a transformation (RITUAL)."""
    if second == "noised":
        return torch.randint(2 ** 62, (n,), generator=gen).tolist()
    if second == "transformed":
        return torch.randint(0, 4, (n,), generator=gen).tolist()
    return None


def second_images(images, rows, second, draws, study):
    """The second branch's images for `rows` (n,) -> (images, image_index or None)."""
    if second == "noised":  # VCD: x_t = a * x_0 + s * eps, eps drawn once per image
        a, s = noise_coefficients(study.noise_step)
        eps = [torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(draws[r]))
               for r in rows.tolist()]
        return a * images[rows] + s * torch.stack(eps).to(images.device), None
    if second == "transformed":
        return torch.stack([transform(images[r], draws[r]) for r in rows.tolist()]), None
    return blank_like(images[:1]), torch.zeros_like(rows)  # one blank canvas: the tower reads it once


@torch.no_grad()
def decode(model, images, prompt, method, study, max_new_tokens, gen, gate=True, image_index=None):
    """One method over a batch -> (tokens (B, T), first-step scores (B, V), rows the second branch read).
    image_index: as in a batch, each row's image (the second branch draws its noise or turn per row).

    Every step is one batched forward over the clean rows and the second branch's rows, each row with
    its own KV cache. The second branch can only reorder the tokens that pass the plausibility cut on
    the clean logits; where one token passes, every method here picks it. So (gate=True) a row joins
    the second branch only when two or more first pass: it reads the second image, its prompt and
    the tokens so far in one pass (vlm.start) and joins the batch. The tokens are those of running
    both branches for every row from the start (gate=False), which a test checks."""
    images = images if image_index is None else images[image_index]  # (B, 3, H, W): one a row
    B, dev = images.shape[0], images.device
    # (B, V); rows B.. will be the second branch's; DeCo reads each layer's newest state
    logits, state = model.start(images, prompt, layers=method.mix == "deco")
    window = deco_window(len(model.blocks))
    rows = torch.zeros(0, dtype=torch.long, device=dev)  # the clean row each second-branch row belongs to
    draws = branch_draws(B, method.second, gen)
    out, done, first = [], torch.zeros(B, dtype=torch.bool, device=dev), None
    for _ in range(max_new_tokens):
        clean = logits[:B]
        keep = plausible(clean, study.beta) if method.cut else None  # (B, V); every two-branch method cuts
        scores = clean.masked_fill(~keep, float("-inf")) if method.cut else clean
        if method.second:
            need = ~done & ((keep.sum(-1) > 1) | (not gate))  # (B,)
            joining = need.clone()
            joining[rows] = False
            joining = joining.nonzero()[:, 0]
            if len(joining):  # their answers so far: not done, so no padding
                answer = torch.stack(out, 1)[joining] if out else prompt[joining, :0]  # (n, t)
                imgs, index = second_images(images, joining, method.second, draws, study)
                logits_2, state_2 = model.start(imgs, prompt[joining], answer, index)
                rows, state = torch.cat([rows, joining]), cat_states(state, state_2)
                logits = torch.cat([logits, logits_2])
            where = torch.zeros(B, dtype=torch.long, device=dev)
            where[rows] = B + torch.arange(len(rows), device=dev)  # each row's second-branch logits
            r = need.nonzero()[:, 0]
            scores[r] = mix(method, clean[r], logits[where[r]], study, len(out))
        if method.mix == "deco":
            early = model.head(torch.stack([state["layers"][i][:B, -1] for i in window]))  # (W, B, V)
            scores = deco_logits(clean, early, study.deco_alpha, study.deco_top_k, study.deco_top_p)
        first = scores if first is None else first
        if method.sample:
            token = (scores.log_softmax(-1) + gumbel_noise(scores, gen)).argmax(-1)  # Gumbel max: T=1
        else:
            token = scores.argmax(-1)
        out.append(torch.where(done, model.tok.pad_id, token))
        done |= token == model.tok.eot_id
        if done.all() or len(out) == max_new_tokens:
            break
        logits = model.step(state, torch.cat([token, token[rows]]))  # every branch, one forward
    return torch.stack(out, 1), first, len(rows)
