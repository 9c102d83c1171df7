"""Training against hallucination: preference tuning (DPO, as POVID uses it) and its controls.

DPO (Rafailov et al. 2023) tunes the policy against a frozen reference (the model before tuning):
-log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), the
log-probabilities summed over the answer tokens; log 2 while pi = ref. POVID (Zhou et al. 2024) takes
the truth as the preferred answer and, as the dispreferred one, the answer with a plausible
hallucination injected (here: "yes" to the missing partner of a present shape; the caption with that
partner added) and the model's own answer about a distorted image (its caption under diffusion
noise). Controls: the same steps of plain fine-tuning on the preferred answers (is it the preference,
or just more training?), and DPO whose injected hallucination is a random absent shape, not the
partner (is it the prior's own mistake that must be shown?).
"""
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.pairs import CAPTION_PROMPT, row_images
from data.shapes import PARTNER, SHAPES, caption, exist_question
from vlm import answer_positions

LOG2 = math.log(2)  # the DPO loss where the policy is still the reference


def answer_logprob(model, images, prompt, answer, image_index=None):
    """log pi(answer | image, prompt), summed over the answer's real tokens -> (B,)."""
    logits = answer_positions(model.logits(images, prompt, answer, image_index), answer.shape[1])  # (B, A, V)
    logp = logits.log_softmax(-1).gather(-1, answer[..., None])[..., 0]  # (B, A)
    real = answer != model.tok.pad_id
    return (logp.masked_fill(~real, 0.0)).sum(1)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1):
    """DPO on summed log-probabilities of the preferred (w) and dispreferred (l) answers -> scalar."""
    margin = (pi_w - ref_w) - (pi_l - ref_l)  # (B,)
    return -F.logsigmoid(beta * margin).mean()


def hallucinated_caption(objs, rng, shape=None):
    """The scene's caption with the missing partner of a present shape added (the same colour and
    size as its trigger, last in reading order), or None if none is missing; shape: add that one
    instead (the random-negative control), like a random object of the scene."""
    shapes = objs[:, 0].tolist()
    triggers = [k for k, s in enumerate(shapes) if PARTNER[s] not in shapes]
    if not triggers and shape is None:
        return None
    extra = objs[int(rng.choice(triggers or range(len(shapes))))].copy()
    extra[0] = PARTNER[int(extra[0])] if shape is None else shape
    return caption(np.concatenate([objs, extra[None]]))


def preference_pool(data, n_scenes, negatives, rng):
    """Training scenes with a trigger whose partner is missing -> (scenes, prompts, chosen, rejected):
    "is there a {partner}?" no over yes, "is there a {present shape}?" yes over no (without it every
    preferred answer is "no", and tuning teaches "no": adversarial F1 97.5 -> 4.6), and the true caption
    over the one with the partner added; negatives="random": a random absent shape that is no missing
    partner, in the first and the last, instead."""
    train = data.shapes["train"]
    scenes, prompts, chosen, rejected = [], [], [], []
    for i in rng.permutation(len(train)).tolist():
        objs = train.scene(i)
        shapes = set(objs[:, 0].tolist())
        missing = sorted({PARTNER[s] for s in shapes} - shapes)
        plain = [s for s in range(len(SHAPES)) if s not in shapes and s not in missing]
        if not missing or not plain:
            continue
        wrong = int(rng.choice(missing if negatives == "partner" else plain))
        there = int(rng.choice(sorted(shapes)))  # its mirror: as many true yeses as true noes
        scenes += [i, i, i]
        prompts += [exist_question(wrong), exist_question(there), CAPTION_PROMPT]
        chosen += ["no", "yes", caption(objs)]
        rejected += ["yes", "no", hallucinated_caption(objs, rng, wrong)]
        if len(scenes) >= 3 * n_scenes:
            break
    return scenes, prompts, chosen, rejected


@torch.no_grad()
def distorted_answers(model, data, scenes, device, noise_step=500, seed=0):
    """POVID's other negatives: the model's own captions of the scenes under diffusion noise
    (VCD's distortion), kept where they differ from the truth -> (scenes, prompts, chosen, rejected)."""
    from study.decoding import noise_coefficients
    a, s = noise_coefficients(noise_step)
    b = data.make_batch("train", np.array(scenes), [(CAPTION_PROMPT, "")] * len(scenes), device)
    images = row_images(b)
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    said = model.texts(model.generate(a * images + s * eps, b["prompt"], max_new_tokens=40))
    truth = [caption(data.shapes["train"].scene(i)) for i in scenes]
    keep = [j for j in range(len(scenes)) if said[j] != truth[j] and said[j]]
    return ([scenes[j] for j in keep], [CAPTION_PROMPT] * len(keep), [truth[j] for j in keep],
            [said[j] for j in keep])


def preference_batch(data, pool, rows, device):
    """Pool rows -> (chosen batch, rejected batch), the same scenes and prompts."""
    scenes, prompts, chosen, rejected = pool
    scenes, prompts = [scenes[j] for j in rows], [prompts[j] for j in rows]
    good, bad = [chosen[j] for j in rows], [rejected[j] for j in rows]
    return (data.make_batch("train", np.array(scenes), list(zip(prompts, good)), device),
            data.make_batch("train", np.array(scenes), list(zip(prompts, bad)), device))


def batch_logprob(model, b):
    return answer_logprob(model, b["images"], b["prompt"], b["answer"], b["image_index"])


def preference_tune(model, data, how, steps, seed, device, n_scenes=400, batch_size=32, lr=1e-4, beta=0.1):
    """A copy of model tuned `steps` steps: how = dpo (partner negatives, and captions of a distorted
    image), dpo-random (random absent shapes instead of partners) or sft (plain fine-tuning on the
    preferred answers: is it the preference, or just more training?) -> (model, seconds)."""
    t0, rng = time.time(), np.random.default_rng([seed, 23])
    pool = preference_pool(data, n_scenes, "random" if how == "dpo-random" else "partner", rng)
    extra = distorted_answers(model, data, sorted(set(pool[0]))[:n_scenes // 2], device, seed=seed)
    pool = [a + b for a, b in zip(pool, extra)]
    ref = model
    policy = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        chosen, rejected = preference_batch(data, pool, rng.choice(len(pool[0]), batch_size), device)
        if how == "sft":
            loss = policy(chosen)[0]
        else:
            with torch.no_grad():
                ref_w, ref_l = batch_logprob(ref, chosen), batch_logprob(ref, rejected)
            pi_w, pi_l = batch_logprob(policy, chosen), batch_logprob(policy, rejected)
            loss = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return policy.eval(), time.time() - t0
