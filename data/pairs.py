"""Image-text pairs for the vision-language model: each image with its caption and questions.

A batch is {images (N, 3, H, W) in [-1, 1], prompt (B, P) left-padded, answer (B, A) right-padded
and ended with end-of-text, image_index (B,): the image each text row reads}. Several rows share
an image (its caption and its questions), so the vision tower reads each image once. A batch is a
pure function of its position, so the training loop's resume and DDP need no sampler state.
"""
import sys

import numpy as np
import torch

from data import stream_indices, text, to_tensor
from data.bpe import Tokenizer
from data.shapes import BACKGROUND, SHAPES, ShapesSplit, World, caption, exist_question, join_words, questions

CAPTION_PROMPT = "describe the image."
SHAPES_PROMPT = "which shapes are there?"


def shapes_tokenizer(verbose=False):
    """The shapes world's BPE (the one `train.py mlm` uses), prepared once and cached."""
    return text.load(text.prepare("shapes", "bpe", 512, verbose=verbose))[0]


class Pairs:
    """What every source of image-text pairs shares: a subclass gives cfg, seed, tok, images(split)
    (a uint8 (N, H, W, 3) array or memmap) and examples(split, idx, rng)."""
    unit = "tokens"

    def encode(self, texts, left_pad):
        """Texts -> (B, T) ids padded to the longest (prompts on the left, answers on the right)."""
        ids = [self.tok.encode(" " + t) for t in texts]  # words keep their leading space, as in the corpus
        T = max(len(x) for x in ids)
        rows = []
        for x in ids:
            pad = [self.tok.pad_id] * (T - len(x))
            rows.append(pad + x if left_pad else x + pad)
        return torch.tensor(rows, dtype=torch.long)

    def make_batch(self, split, rows, pairs, device):
        """Image numbers (one a text row, repeats allowed) and their (prompt, answer) texts -> a batch;
        each image is read and encoded once."""
        eot = self.tok.eot_id
        prompt = self.encode([p for p, _ in pairs], left_pad=True)
        answer = self.encode([a for _, a in pairs], left_pad=False)
        ends = (answer != self.tok.pad_id).sum(1)  # end-of-text after each answer
        answer = torch.cat([answer, torch.full((len(pairs), 1), self.tok.pad_id)], dim=1)
        answer[torch.arange(len(pairs)), ends] = eot
        scenes, image_index = np.unique(rows, return_inverse=True)  # sorted: memmap reads in order
        return {"images": to_tensor(self.images(split)[scenes], device), "prompt": prompt.to(device),
                "answer": answer.to(device),
                "image_index": torch.from_numpy(image_index.reshape(-1)).to(device)}

    def n_images(self, split):
        return len(self.images(split))

    def fingerprint(self):
        """What identifies the texts and images (None: the shapes world, made by its code)."""
        return None

    def read_with(self, ckpt):
        """Encode texts with the tokenizer a trained model carries (its checkpoint's), so its token ids
        mean what they meant in training; where the data changed since, say so in one line."""
        if ckpt.get("tokenizer") is None:  # written before checkpoints carried their words
            return self
        if ckpt.get("data_fingerprint") not in (None, self.fingerprint()):
            print(f"note: {self.cfg.data_path} changed since the model was trained on it; the model reads it "
                  f"with its own tokenizer", file=sys.stderr, flush=True)
        self.tok = Tokenizer.from_state(ckpt["tokenizer"])
        return self

    def batch(self, split, pos, batch_size, device):
        n = self.n_images(split)
        idx = stream_indices(n, self.seed + (split != "train"), pos * batch_size, batch_size)
        rng = np.random.default_rng([self.seed, split != "train", pos])
        return self.make_batch(split, *self.examples(split, idx, rng), device)

    def items(self, batch):
        """Tokens the fused stack reads: each row's image tokens, prompt and answer, padding aside."""
        text = (batch["prompt"] != self.tok.pad_id).sum() + (batch["answer"] != self.tok.pad_id).sum()
        return batch["prompt"].shape[0] * self.image_len() + int(text)

    def image_len(self):
        return 1 + (self.cfg.img_size // self.cfg.patch_size // self.cfg.merge) ** 2


class ShapesPairs(Pairs):
    """Images from the shapes world's cached splits; text made from each scene's metadata. A batch
    is a pure function of its position, so the loop's resume and DDP need no sampler state."""

    def __init__(self, cfg, seed=0, verbose=True):
        self.cfg, self.seed = cfg, seed
        self.world = World(img_size=cfg.img_size, seed=seed, cooccur=cfg.cooccur, skew=cfg.skew,
                           noise=cfg.noise)
        self.tok = shapes_tokenizer(verbose)
        self.shapes = {s: ShapesSplit(self.world, s, n, verbose=verbose)
                       for s, n in (("train", cfg.n_train), ("val", cfg.n_eval), ("ood", cfg.n_eval))}

    splits = ("train", "val", "ood")
    vocab = SHAPES  # the objects POPE and CHAIR count

    def images(self, split):
        return self.shapes[split].images

    def objects(self, split):
        """Each image's objects, as a set of vocabulary indices."""
        return [set(self.shapes[split].scene(i)[:, 0].tolist()) for i in range(len(self.shapes[split]))]

    def exist_question(self, obj):
        return exist_question(obj)

    def reference(self, split, i):
        """The true caption of image i."""
        return caption(self.shapes[split].scene(i))

    def n_images(self, split):
        if split == "train" and self.cfg.n_captioned:
            return self.cfg.n_captioned
        return len(self.shapes[split])

    def examples(self, split, idx, rng):
        """-> (rows, [(prompt, answer)]): each scene's caption, then texts_per_image - 1 questions
        about it (different kinds while they last); the mlm objective reads captions only."""
        k = 1 if self.cfg.objective == "mlm" else self.cfg.texts_per_image
        rows, pairs = [], []
        for i in idx:
            objs = self.shapes[split].scene(i)
            texts = [(CAPTION_PROMPT, caption(objs))] + self.questions(split, int(i), objs, rng)
            while len(texts) < k:  # more texts than kinds of question: ask them again
                texts += texts[1:4]
            pairs += texts[:k]
            rows += [i] * k
        return np.array(rows), pairs

    def questions(self, split, i, objs, rng):
        """Three questions about a scene, in random order: which shapes there are (all six presence
        decisions in one answer, in a fixed order), "is there a ...?" about a present or an absent
        shape alike, and one of the world's other questions (colour, position, shape, count)."""
        present = sorted(set(objs[:, 0].tolist()))
        absent = [s for s in range(len(SHAPES)) if s not in present] or present
        others = questions(self.world, split, i, objs)[1:]  # [0] is its own existence question
        asked = int(rng.choice(present if rng.random() < 0.5 else absent))
        qs = [(SHAPES_PROMPT, join_words([SHAPES[s] for s in present])),
              (exist_question(asked), "yes" if asked in present else "no"),
              others[int(rng.integers(0, len(others)))][1:]]
        return [qs[j] for j in rng.permutation(3)]


def row_images(batch):
    """A batch's images repeated per text row, for calls that take one image a row (generation)."""
    return batch["images"][batch["image_index"]]


def blank_like(images):
    """The world's empty canvas: every pixel the background colour, as the model's input."""
    return (torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            .div(127.5).sub(1).expand_as(images).contiguous())


def length_groups(prompt, answer, pad_id):
    """Rows split in (at most) two groups at the cut that pads least, each group padded to its own
    longest prompt P and answer A -> [(rows, P, A)]."""
    P, A = (prompt != pad_id).sum(1), (answer != pad_id).sum(1)  # (B,) real lengths
    order = torch.argsort(P + A, stable=True)
    P, A, n = P[order], A[order], len(order)
    k = torch.arange(1, n + 1, device=P.device)
    head = (P.cummax(0).values + A.cummax(0).values) * k  # rows [:k] padded together
    tail = (P.flip(0).cummax(0).values + A.flip(0).cummax(0).values).flip(0) * k.flip(0)  # rows [k:]
    cost = head + torch.cat([tail[1:], tail[:0].new_zeros(1)])  # (n,): cut after row k
    cut = int(cost.argmin()) + 1
    return [(order[i:j], int(P[i:j].max()), int(A[i:j].max())) for i, j in ((0, cut), (cut, n)) if j > i]
