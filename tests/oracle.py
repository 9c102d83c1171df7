"""A VLM stand-in for the tests of the measuring code: figures whose right values are known by hand.

Most measures are counts over a model's answers. To know what a count must be, the model is replaced
by an Oracle that knows every image it is shown (registered with its objects), answers by a rule the
test writes (the truth, or the truth with a planted prior), and records what it was shown; the
figures then follow from the rule and the scenes alone.
"""
import types

import numpy as np
import torch

import vlm
from data.shapes import PARTNER, SHAPES, caption, questions


def image_key(img):
    """A float image (3, H, W) in [-1, 1] -> the bytes of the uint8 picture it was made from."""
    pixels = ((img.detach().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy().tobytes()


class Oracle:
    """A VLM stand-in that sees perfectly. It knows each registered picture's objects and questions;
    `rule(objs, prompt, truth) -> answer` says what it answers (default: the truth). Shown a picture it
    does not know (a blank canvas, a noised one), it answers `unknown`. Every picture start() reads is
    kept in `seen`, as keys."""
    generate = vlm.VLM.generate  # the real generation loop, over this stand-in's start and step
    texts = vlm.VLM.texts

    def __init__(self, data, rule=None, unknown=""):
        self.tok, self.rule, self.unknown = data.tok, rule, unknown
        self.cfg = types.SimpleNamespace(objective="prefix", dataset="shapes")
        self.blocks, self.known, self.seen = [], {}, []
        for split, s in data.shapes.items():
            self.register(s.images, [s.scene(i) for i in range(len(s))],
                          [dict((q, a) for _, q, a in questions(data.world, split, i, s.scene(i)))
                           for i in range(len(s))])

    def register(self, images, scenes, qas=None):
        for k, (img, objs) in enumerate(zip(images, scenes)):
            self.known.setdefault(np.ascontiguousarray(img).tobytes(), (objs, qas[k] if qas else {}))

    def truth(self, objs, qa, prompt):
        if prompt == vlm.CAPTION_PROMPT:
            return caption(objs)
        if prompt.startswith("is there a "):
            return "yes" if SHAPES.index(prompt[len("is there a "):-1]) in objs[:, 0] else "no"
        return qa[prompt]

    def answer(self, img, prompt):
        key = image_key(img)
        self.seen.append(key)
        if key not in self.known:
            return self.unknown
        objs, qa = self.known[key]
        truth = self.truth(objs, qa, prompt)
        return self.rule(objs, prompt, truth) if self.rule else truth

    def start(self, images, prompt, answer=None, image_index=None, layers=False):
        images = images if image_index is None else images[image_index]
        pad = self.tok.pad_id
        texts = [self.tok.decode([t for t in row if t != pad]).strip() for row in prompt.tolist()]
        answers = [self.answer(img, p) for img, p in zip(images, texts)]
        plans = [self.tok.encode(" " + a) + [self.tok.eot_id] for a in answers]
        state = {"plans": plans, "t": 0 if answer is None else answer.shape[1]}
        return self.next_logits(state), state

    def step(self, state, token):
        state["t"] += 1
        return self.next_logits(state)

    def next_logits(self, state):
        logits = torch.full((len(state["plans"]), self.tok.vocab_size), -10.0)
        for row, plan in enumerate(state["plans"]):
            logits[row, plan[min(state["t"], len(plan) - 1)]] = 10.0
        return logits

    def eval(self):
        return self

    def train(self):
        return self


def partner_prior(objs, prompt, truth):
    """Sees everything, but says yes to the missing partner of a present shape (the planted prior)."""
    if prompt.startswith("is there a "):
        asked = SHAPES.index(prompt[len("is there a "):-1])
        if asked in {PARTNER[s] for s in objs[:, 0].tolist()}:
            return "yes"
    return truth


def asked_shape(question):
    return SHAPES.index(question.split()[-1].rstrip("?"))
