"""The code behind every published figure, checked on hand-built cases whose answers are known without it.

Most measures here are counts over a model's answers. To know what a count must be, the model is
replaced by an Oracle: a stand-in that knows every image it is shown (registered with its objects),
answers by a rule the test writes (the truth, or the truth with a planted prior), and records what it
was shown. The figures then follow from the rule and the scenes alone, by hand.
"""
import copy
import json
import math
import types

import numpy as np
import pytest
import torch

import causes
import cures
import decoding as D
import hallucination as H
import measures as M
import vlm
from data.shapes import (BACKGROUND, COLOUR_NAMES, NUMBERS, PARTNER, SHAPES, SIZES, caption, exist_question,
                         questions)
from tests.conftest import tiny_vlm


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
        plans = [self.tok.encode(" " + self.answer(img, p)) + [self.tok.eot_id] for img, p in zip(images, texts)]
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


@pytest.fixture(scope="module")
def world():
    _, data = tiny_vlm(n_train=200, n_eval=60, cooccur=0.9)
    return data


# ---------------------------------------------------------------------------------------------
# What train.py vlm reports: questions, captions, the real image against a blank canvas

def test_question_accuracy_counts_right_answers_per_kind(world):
    data = world

    def miscounts(objs, prompt, truth):  # right about everything but counting
        return "nine" if prompt.startswith("how many") else truth
    acc = M.answer_questions(Oracle(data, miscounts), data, "ood", "cpu", batch_size=16)
    kinds = [k for i in range(len(data.shapes["ood"]))
             for k, _, _ in questions(data.world, "ood", i, data.shapes["ood"].scene(i))]
    n_nine = sum(a == "nine" for i in range(len(data.shapes["ood"]))
                 for k, _, a in questions(data.world, "ood", i, data.shapes["ood"].scene(i)) if k == "count")
    assert n_nine == 0  # no scene has nine objects: every count answer is wrong
    assert acc == {**{k: (0.0 if k == "count" else 1.0) for k in set(kinds)},
                   "all": pytest.approx(1 - kinds.count("count") / len(kinds))}
    yes_sayer = Oracle(data, lambda objs, prompt, truth: "yes")
    exist = M.answer_questions(yes_sayer, data, "ood", "cpu", n_scenes=30, kinds=("exist",))
    truths = [questions(data.world, "ood", i, data.shapes["ood"].scene(i))[0][2] for i in range(30)]
    assert exist == {"exist": truths.count("yes") / 30, "all": truths.count("yes") / 30}
    assert M.monitor(yes_sayer, data, "cpu", n_scenes=30) == {"ood_exist": truths.count("yes") / 30}


def test_caption_scores_by_hand(world):
    data = world
    first_only = Oracle(data, lambda objs, prompt, truth: caption(objs[:1]))  # names the first object alone
    s = M.caption_scores(first_only, data, "val", "cpu", batch_size=16)
    scenes = [data.shapes["val"].scene(i) for i in range(len(data.shapes["val"]))]
    n_objects = sum(len(o) for o in scenes)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(len(scenes) / n_objects)
    assert s["exact"] == pytest.approx(sum(len(o) == 1 for o in scenes) / len(scenes))
    partner = {0: 1, 1: 0, 2: 4, 4: 2, 3: 5, 5: 3}  # written out: the world's pairs

    def adds_a_partner(objs, prompt, truth):  # every caption gains an object the scene may not have
        extra = objs[:1].copy()
        extra[0, 0] = partner[int(objs[0, 0])]
        return caption(np.concatenate([objs, extra]))
    s = M.caption_scores(Oracle(data, adds_a_partner), data, "val", "cpu")
    # the added object, said last, is never right: each object of the scene is matched by its own words
    # first; so precision = objects / (objects + scenes)
    assert s["recall"] == 1.0 and s["exact"] == 0.0
    assert s["precision"] == pytest.approx(n_objects / (n_objects + len(scenes)))


class Attributes:
    """A stand-in for attribute_accuracy: right about exactly the attribute words when it sees the
    picture, wrong about exactly them on a blank canvas (right about every other word there)."""

    def __init__(self, data, objective="prefix"):
        self.tok = data.tok
        self.cfg = types.SimpleNamespace(objective=objective)
        words = [*SHAPES, *COLOUR_NAMES, *SIZES]
        ids = [self.tok.encode(" " + w) for w in words]
        assert all(len(i) == 1 for i in ids)  # one token a word: the hand count below is per word
        self.attr = torch.tensor([i[0] for i in ids])
        self.blank = torch.tensor(BACKGROUND, dtype=torch.float).div(127.5).sub(1)

    def predict(self, images, answer, image_index):
        blank = (images == self.blank.view(1, 3, 1, 1)).flatten(1).all(1)[image_index]  # (B,)
        is_attr = torch.isin(answer, self.attr)
        right = torch.where(blank[:, None], ~is_attr, is_attr)  # (B, A)
        pred = torch.where(right, answer, (answer + 1) % self.tok.vocab_size)
        return torch.nn.functional.one_hot(pred, self.tok.vocab_size).float()

    def answer_logits(self, images, prompt, answer, image_index):
        return self.predict(images, answer, image_index)

    def fill(self, images, prompt, masked, image_index):  # the mlm objective: the truth is behind the masks
        self.masked = masked
        return self.predict(images, self.truth, image_index)


def test_attribute_accuracy_reads_the_image_or_the_blank_canvas(world):
    data = world
    stand_in = Attributes(data)
    assert M.attribute_accuracy(stand_in, data, "val", "cpu") == 1.0
    assert M.attribute_accuracy(stand_in, data, "val", "cpu", blank=True) == 0.0
    # the mlm objective: the attribute words, and only they, are masked; the same counts
    mlm_stand_in = Attributes(data, "mlm")
    calls = []
    orig = mlm_stand_in.fill

    def fill(images, prompt, masked, image_index):
        pairs = [(vlm.CAPTION_PROMPT, caption(data.shapes["val"].scene(i))) for i in range(len(masked))]
        mlm_stand_in.truth = data.make_batch("val", np.arange(len(masked)), pairs, "cpu")["answer"]
        calls.append(masked)
        return orig(images, prompt, masked, image_index)
    mlm_stand_in.fill = fill
    assert M.attribute_accuracy(mlm_stand_in, data, "val", "cpu", batch_size=1000) == 1.0
    masked = calls[0] == data.tok.mask_id
    assert torch.equal(masked, torch.isin(mlm_stand_in.truth, stand_in.attr))


def test_evaluate_reports_each_figure_under_its_name(world, monkeypatch):
    data = world
    oracle = Oracle(data)
    attrs = Attributes(data)
    oracle.answer_logits = attrs.answer_logits
    out = M.evaluate(oracle, data, "cpu")
    for split in ("val", "ood"):
        assert out[f"{split}_q_all"] == 1.0 and out[f"{split}_caption_f1"] == 1.0
        assert out[f"{split}_caption_exact"] == 1.0
        assert out[f"{split}_attr_acc_image"] == 1.0 and out[f"{split}_attr_acc_blank"] == 0.0


# ---------------------------------------------------------------------------------------------
# POPE: the statistics its splits are drawn from, the questions, the run, and its records

def test_object_stats_by_hand():
    sets = [{0, 1}, {0}, {0, 2}, None, {1}]  # None: an image nobody annotated
    freq, cooc = M.object_stats(sets, 3)
    assert freq.tolist() == pytest.approx([3 / 5, 2 / 5, 1 / 5])
    # row a, column b: P(b present | a present). P(square | circle) = 1/3; P(circle | square) = 1/2
    assert cooc[0, 1] == pytest.approx(1 / 3) and cooc[1, 0] == pytest.approx(1 / 2)
    assert cooc[2, 0] == 1.0 and cooc[0, 2] == pytest.approx(1 / 3) and cooc[1, 2] == 0 and cooc[0, 0] == 1


def test_pope_questions_pick_popular_and_adversarial_by_hand():
    # four shapes; freq: circle most frequent; cooc: given a square, a triangle comes most often
    freq = np.array([0.9, 0.5, 0.3, 0.1])
    cooc = np.array([[1.0, 0.2, 0.1, 0.3],
                     [0.4, 1.0, 0.8, 0.1],   # P(. | square): triangle 0.8
                     [0.1, 0.2, 1.0, 0.7],
                     [0.0, 0.0, 0.0, 1.0]])
    sets = [{1}, {1, 3}, {0}]
    qs = {split: M.pope_questions(sets, split, 3, 0, freq, cooc) for split in M.POPE_SPLITS}
    absent = {split: {i: o for i, o, label in q if label == "no"} for split, q in qs.items()}
    assert absent["popular"] == {0: 0, 1: 0, 2: 1}  # the most frequent shape not there
    # square: triangle (0.8); square + diamond: max over present of P(b | a): triangle 0.8 beats circle 0.4;
    # circle alone: diamond (0.3) over square (0.2) and triangle (0.1)
    assert absent["adversarial"] == {0: 2, 1: 2, 2: 3}
    for split, q in qs.items():
        assert sorted((i, label) for i, o, label in q if o in sets[i]) == [(0, "yes"), (1, "yes"), (2, "yes")]
        assert all(o not in sets[i] for i, o, label in q if label == "no")


def test_pope_run_counts_the_answers_it_records(world):
    data = world
    sc = H.StudyConfig(n_scenes=25, seeds=1)
    stats = M.shape_stats(data.shapes["train"])
    out, records = H.pope_run(Oracle(data, partner_prior), data, "m", D.METHODS["greedy"], sc, 0, stats,
                              torch.Generator(), "cpu")
    val = data.shapes["val"]
    for split in M.POPE_SPLITS:
        qs = M.pope_questions(data.objects("val"), split, 25, 0, *stats)
        said = []
        for i, shape, label in qs:  # by hand: present, or the partner of something present, is a yes
            present = val.scene(i)[:, 0].tolist()
            said.append("yes" if shape in present or shape in [PARTNER[s] for s in present] else "no")
        labels = [label for _, _, label in qs]
        right = sum(s == lab for s, lab in zip(said, labels))
        tp = sum(s == lab == "yes" for s, lab in zip(said, labels))
        precision, recall = tp / said.count("yes"), tp / labels.count("yes")
        assert out[f"pope_{split}_accuracy"] == pytest.approx(right / len(qs))
        assert out[f"pope_{split}_yes_ratio"] == pytest.approx(said.count("yes") / len(qs))
        assert out[f"pope_{split}_f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        for reading in ("prob", "rule"):  # P(yes) vs P(no) and POPE's rule agree with the answers here
            assert out[f"pope_{split}_{reading}_accuracy"] == pytest.approx(right / len(qs))
        mine = [r for r in records if r["split"] == split]
        assert sorted((r["scene"], r["question"], r["label"], r["parsed"], r["by_prob"]) for r in mine) == sorted(
            (i, exist_question(o), lab, s, s) for (i, o, lab), s in zip(qs, said))
    assert out["pope_random_accuracy"] > out["pope_adversarial_accuracy"]  # the prior shows where it should


def test_cures_partner_yes_rate_counts_only_missing_partners(world):
    data = world
    sc = H.StudyConfig(n_scenes=25, seeds=1)
    stats = M.shape_stats(data.shapes["train"])
    val = data.shapes["val"]

    def rate(rule):
        _, records = H.pope_run(Oracle(data, rule), data, "m", D.METHODS["greedy"], sc, 0, stats,
                                torch.Generator(), "cpu")
        return cures.partner_yes_rate(records, val), records

    assert rate(partner_prior)[0] == 1.0
    assert rate(None)[0] == 0.0  # the truth: never yes to an absent shape

    def yes_to_any_other_absent(objs, prompt, truth):
        if prompt.startswith("is there a "):
            asked = SHAPES.index(prompt[len("is there a "):-1])
            return "no" if asked in {PARTNER[s] for s in objs[:, 0].tolist()} - set(objs[:, 0].tolist()) \
                else "yes"
        return truth
    r, records = rate(yes_to_any_other_absent)
    partners = [rec for rec in records if rec["label"] == "no" and asked_shape(rec["question"]) in
                {PARTNER[s] for s in val.scene(rec["scene"])[:, 0].tolist()}]
    assert len(partners) > 5 and r == 0.0
    hand = [{"scene": 0, "question": exist_question(PARTNER[int(val.scene(0)[0, 0])]), "label": "no",
             "parsed": "yes"}]
    if PARTNER[int(val.scene(0)[0, 0])] not in val.scene(0)[:, 0]:
        assert cures.partner_yes_rate(hand, val) == 1.0
        assert cures.partner_yes_rate([{**hand[0], "parsed": "no"}], val) == 0.0
        assert math.isnan(cures.partner_yes_rate([{**hand[0], "label": "yes"}], val))  # no partner question


def test_hallucination_file_answers_carry_both_keys(tmp_path, world):
    records = [{"split": "random", "seed": 0, "method": "greedy", "question_id": 0, "scene": 3,
                "question": "is there a star?", "label": "no", "raw": "no"}]
    H.write_pope_files(world, records, tmp_path)
    line = json.loads((tmp_path / "random_greedy_answers.jsonl").read_text())
    assert line == {"question_id": 0, "text": "no", "answer": "no"}  # LLaVA's key and POPE's own
    q = json.loads((tmp_path / "random_questions.jsonl").read_text())
    assert q == {"question_id": 0, "image": "val/3", "text": "is there a star?", "label": "no"}


# ---------------------------------------------------------------------------------------------
# The causes: the map's partner rates, BEAF's before and after, the layers

def test_map_partner_rates_are_the_partner_and_the_random_absent(world):
    data = world
    assert causes.partner_yes(Oracle(data, partner_prior), data, 20, "cpu") == (1.0, 0.0)
    assert causes.partner_yes(Oracle(data), data, 20, "cpu") == (0.0, 0.0)

    def yes_to_others(objs, prompt, truth):
        if prompt.startswith("is there a "):
            asked = SHAPES.index(prompt[len("is there a "):-1])
            return "no" if asked in [PARTNER[s] for s in objs[:, 0].tolist()] else "yes"
        return truth
    assert causes.partner_yes(Oracle(data, yes_to_others), data, 20, "cpu") == (0.0, 1.0)


def test_ask_answers_each_image_about_its_own_shape(world):
    data = world
    val = data.shapes["val"]
    shapes = [int(val.scene(i)[0, 0]) for i in range(10)] + [s for s in range(6)]
    images = np.stack([val.images[i] for i in range(10)] + [val.images[0]] * 6)
    said = causes.ask(Oracle(data), data, images, shapes, H.StudyConfig(), "cpu", batch_size=4)
    present = val.scene(0)[:, 0].tolist()
    assert said == ["yes"] * 10 + ["yes" if s in present else "no" for s in range(6)]


def test_beaf_asks_before_on_the_scene_and_after_on_the_edit(world):
    data = world
    val = data.shapes["val"]
    edits = causes.beaf_edits(val, 30, seed=0)
    assert {e[3] for e in edits} == {"partner", "random"}
    after = causes.removed_images(data.world, "val", val, edits)
    oracle = Oracle(data, partner_prior)
    oracle.register(after, [np.delete(val.scene(e[0]), e[1], axis=0) for e in edits])
    records = causes.beaf_answers(oracle, data, "val", edits, H.StudyConfig(), "cpu")
    # before: the object is there (yes); after: the prior keeps saying yes to a removed partner
    # (stubborn), and a removed other shape is seen gone (true understanding); the kept one stays yes
    for r, e in zip(records, edits):
        assert (r["scene"], r["kind"]) == (e[0], e[3]) and r["before"] == "yes"
        assert r["after"] == ("yes" if e[3] == "partner" else "no")
        assert r["kept_before"] == r["kept_after"] == "yes"
    table = causes.beaf_table(records)
    assert (table["partner"]["SB"], table["partner"]["TU"]) == (1.0, 0.0)
    assert (table["random"]["TU"], table["random"]["SB"], table["all"]["ID"]) == (1.0, 0.0, 0.0)
    assert table["all"]["n"] == len(edits)


@pytest.fixture(scope="module")
def tiny():
    model, data = tiny_vlm(n_train=200, n_eval=60, cooccur=0.9)
    with torch.no_grad():
        model.head_bias.normal_(0, 3)
    return model, data


def test_answer_states_are_each_blocks_output(tiny):
    model, data = tiny
    b = data.make_batch("val", np.arange(5), [("is there a star?", "")] * 5, "cpu")
    images = vlm.row_images(b)
    states = causes.answer_states(model, images, b["prompt"])
    with torch.no_grad():
        _, state = model.start(images, b["prompt"], layers=True)  # the generation path keeps them too
        x = model.sequence(images, b["prompt"], b["prompt"][:, :0])[0]
    assert torch.allclose(states[0], x[:, -1])
    for layer in range(len(model.blocks)):
        assert torch.allclose(states[layer + 1], state["layers"][layer], atol=1e-5), layer
    assert not torch.allclose(states[1], states[2])


def test_layer_report_finds_the_layer_that_knows(tiny, monkeypatch):
    model, data = tiny
    planted = 1  # only the first block's output carries the answer

    def states_of(model, data, split, items, device):
        g = torch.Generator().manual_seed(len(items) + (split == "val"))
        x = torch.randn(len(model.blocks) + 1, len(items), model.cfg.n_embd, generator=g)
        x[planted, :, 0] += 10 * torch.tensor([c[2] for c in items]).float()
        return x
    monkeypatch.setattr(causes, "states_of", states_of)
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.head_bias[model.tok.encode(" yes")[0]] = 1e4  # the lens says yes at every layer
    report = causes.layer_report(model, data, "cpu", n_train=150, n_val=50)
    items = causes.existence_items(data.shapes["val"], 50, 1)
    n_true = sum(c[2] for c in items)
    probe = report["probe, all"]
    assert probe[planted] > 0.97 and all(a < 0.85 for k, a in enumerate(probe) if k != planted), probe
    assert report["probe, where the output is wrong"][planted] > 0.97
    assert report["lens, all"] == pytest.approx([n_true / len(items)] * len(probe))
    assert report["lens, missing partners"] == [0.0] * len(probe)
    assert report["n_wrong"] == len(items) - n_true


def test_image_attention_is_the_share_on_the_image_by_hand(tiny):
    model, data = tiny
    model = copy.deepcopy(model)
    C = model.cfg.n_embd
    with torch.no_grad():  # queries and keys all zero: each position attends evenly to what it may see
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * C] = 0
            blk.attn.qkv.bias[:2 * C] = 0
    b = data.make_batch("val", np.arange(3), [("is there a star?", "yes"), (vlm.CAPTION_PROMPT, "a red star"),
                                              ("where is the circle?", "top left")], "cpu")
    share = H.image_attention(model, vlm.row_images(b), b["prompt"], b["answer"])
    n_img = data.image_len()
    n_prompt = (b["prompt"] != data.tok.pad_id).sum(1)
    # the position predicting answer token t sees the image, the real prompt, and answer tokens before t
    expected = n_img / (n_img + n_prompt[:, None] + torch.arange(b["answer"].shape[1])[None])
    real = b["answer"] != data.tok.pad_id  # the answers' own tokens (padding after them sees less)
    assert torch.allclose(share[real], expected.float()[real], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Decoding: what each second branch is given, and how it is mixed in

def test_vcd_noise_coefficients_from_the_schedule_by_hand():
    betas = [1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-(-6 + 12 * i / 999))) for i in range(1000)]
    alpha_bar = math.prod(1 - b for b in betas[:501])  # x_500: the steps 0..500 applied
    a, s = D.noise_coefficients(500)
    assert a == pytest.approx(math.sqrt(alpha_bar), rel=1e-9) and s == pytest.approx(math.sqrt(1 - alpha_bar))
    assert (round(a, 3), round(s, 3)) == (0.863, 0.505)  # the reference's published pair


def test_second_branch_images_by_hand():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    rows, sc = torch.tensor([2, 0]), H.StudyConfig()
    draws = [11, 22, 33]
    noised, index = D.second_images(images, rows, "noised", draws, sc)
    a, s = D.noise_coefficients(sc.noise_step)
    for out, r in zip(noised, rows.tolist()):
        eps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(draws[r]))
        assert torch.allclose(out, a * images[r] + s * eps) and index is None
    turned, _ = D.second_images(images, torch.arange(3), "transformed", [0, 1, 3], sc)
    pic = images.numpy()
    assert np.array_equal(turned[0].numpy(), pic[0][:, :, ::-1])  # left-right
    assert np.array_equal(turned[1].numpy(), pic[1][:, ::-1, :])  # upside down
    assert np.array_equal(turned[2].numpy(), np.rot90(pic[2], 2, axes=(1, 2)))  # half a turn
    blank, index = D.second_images(images, rows, "blank", None, sc)
    assert blank.shape == (1, 3, 8, 8) and index.tolist() == [0, 0]
    assert torch.allclose(blank[0, :, 0, 0], torch.tensor(BACKGROUND) / 127.5 - 1)


def test_mix_is_each_methods_formula_by_hand():
    sc = H.StudyConfig(alpha=0.5, kappa=2.0, m3id_lambda=0.1, beta=0.01)
    clean, other = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 3.0, -1.0]])
    vcd = D.mix(D.METHODS["VCD (greedy)"], clean, other, sc)
    assert vcd.tolist() == [[1.5 * 2 - 0.5 * 1, 1.5 * 1 - 0.5 * 3, 1.5 * 0 + 0.5]]
    ritual = D.mix(D.METHODS["RITUAL (sampling)"], clean, other, sc)
    assert ritual.tolist() == [[2 + 2 * 1, 1 + 2 * 3, 0 - 2 * 1]]  # added: the transformed image agrees
    w = math.exp(0.1 * 4) - 1
    m3id = D.mix(D.METHODS["M3ID (greedy)"], clean, other, sc, t=4)
    assert m3id[0].tolist() == pytest.approx([2 + w * 1, 1 + w * -2, 0 + w * 1], rel=1e-5)
    blank_contrast = D.mix(D.METHODS["no-image contrast (sampling)"], clean, other, sc)
    assert torch.equal(blank_contrast, vcd)


def test_decode_gives_each_branch_its_own_image(tiny, monkeypatch):
    model, data = tiny
    b = data.make_batch("val", np.arange(4), [("is there a star?", "")] * 4, "cpu")
    images, sc = vlm.row_images(b), H.StudyConfig()
    a, s = D.noise_coefficients(sc.noise_step)
    for name in ("VCD (greedy)", "RITUAL (sampling)", "M3ID (greedy)"):
        seen, start = [], model.start

        def recording(imgs, prompt, answer=None, image_index=None, layers=False):
            seen.append(imgs if image_index is None else imgs[image_index])
            return start(imgs, prompt, answer, image_index, layers)
        monkeypatch.setattr(model, "start", recording)
        D.decode(model, images, b["prompt"], D.METHODS[name], sc, 2, torch.Generator().manual_seed(5), gate=False)
        monkeypatch.undo()
        assert torch.equal(seen[0], images) and len(seen) == 2
        g = torch.Generator().manual_seed(5)  # the draws, as the method makes them up front
        if name.startswith("VCD"):
            seeds = torch.randint(2 ** 62, (4,), generator=g).tolist()
            eps = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(d))
                               for d in seeds])
            assert torch.allclose(seen[1], a * images + s * eps, atol=1e-6)
        elif name.startswith("RITUAL"):
            ks = torch.randint(0, 4, (4,), generator=g).tolist()
            for out, img, k in zip(seen[1], images.numpy(), ks):  # flips, then quarter turns
                ref = img[:, :, ::-1] if k == 0 else img[:, ::-1] if k == 1 else np.rot90(img, k - 1, (1, 2))
                assert np.array_equal(out.numpy(), ref)
        else:
            assert torch.allclose(seen[1], vlm.blank_like(images))
