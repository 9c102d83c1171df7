"""measures.py (POPE, CHAIR) and the VLM's own evaluation (vlm.evaluate), checked on hand-built cases:
an Oracle (tests/oracle.py) answers by a rule the test writes, so each figure's right value follows
from the scenes alone."""
import json
import types

import numpy as np
import pytest
import torch

import hallucination as H
import vlm
from data.shapes import BACKGROUND, COLOUR_NAMES, PARTNER, SHAPES, SIZES, caption, exist_question, questions
from study import decoding as D
from study import measures as M
from tests.conftest import tiny_vlm
from tests.oracle import Oracle, partner_prior


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
    acc = vlm.answer_questions(Oracle(data, miscounts), data, "ood", "cpu", batch_size=16)
    kinds = [k for i in range(len(data.shapes["ood"]))
             for k, _, _ in questions(data.world, "ood", i, data.shapes["ood"].scene(i))]
    n_nine = sum(a == "nine" for i in range(len(data.shapes["ood"]))
                 for k, _, a in questions(data.world, "ood", i, data.shapes["ood"].scene(i)) if k == "count")
    assert n_nine == 0  # no scene has nine objects: every count answer is wrong
    assert acc == {**{k: (0.0 if k == "count" else 1.0) for k in set(kinds)},
                   "all": pytest.approx(1 - kinds.count("count") / len(kinds))}
    yes_sayer = Oracle(data, lambda objs, prompt, truth: "yes")
    exist = vlm.answer_questions(yes_sayer, data, "ood", "cpu", n_scenes=30, kinds=("exist",))
    truths = [questions(data.world, "ood", i, data.shapes["ood"].scene(i))[0][2] for i in range(30)]
    assert exist == {"exist": truths.count("yes") / 30, "all": truths.count("yes") / 30}
    assert vlm.monitor(yes_sayer, data, "cpu", n_scenes=30) == {"ood_exist": truths.count("yes") / 30}


def test_caption_scores_by_hand(world):
    data = world
    first_only = Oracle(data, lambda objs, prompt, truth: caption(objs[:1]))  # names the first object alone
    s = vlm.caption_scores(first_only, data, "val", "cpu", batch_size=16)
    scenes = [data.shapes["val"].scene(i) for i in range(len(data.shapes["val"]))]
    n_objects = sum(len(o) for o in scenes)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(len(scenes) / n_objects)
    assert s["exact"] == pytest.approx(sum(len(o) == 1 for o in scenes) / len(scenes))
    partner = {0: 1, 1: 0, 2: 4, 4: 2, 3: 5, 5: 3}  # written out: the world's pairs

    def adds_a_partner(objs, prompt, truth):  # every caption gains an object the scene may not have
        extra = objs[:1].copy()
        extra[0, 0] = partner[int(objs[0, 0])]
        return caption(np.concatenate([objs, extra]))
    s = vlm.caption_scores(Oracle(data, adds_a_partner), data, "val", "cpu")
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

    def logits(self, images, prompt, answer, image_index):
        """(B, A + 1, V): the prefix-LM's answer predictions sit one position before their tokens
        (vlm.answer_positions), the mlm objective's at the tokens' own, the last A (the truth is the
        caption behind the masks: `truth`, set by the test)."""
        if self.cfg.objective == "mlm":
            pred = self.predict(images, self.truth, image_index)
            return torch.cat([torch.zeros_like(pred[:, :1]), pred], 1)
        pred = self.predict(images, answer, image_index)
        return torch.cat([pred, torch.zeros_like(pred[:, :1])], 1)


def test_attribute_accuracy_reads_the_image_or_the_blank_canvas(world):
    data = world
    stand_in = Attributes(data)
    assert vlm.attribute_accuracy(stand_in, data, "val", "cpu") == 1.0
    assert vlm.attribute_accuracy(stand_in, data, "val", "cpu", blank=True) == 0.0
    # the mlm objective: the attribute words, and only they, are masked; the same counts
    mlm_stand_in = Attributes(data, "mlm")
    calls = []
    orig = mlm_stand_in.logits

    def logits(images, prompt, masked, image_index):
        pairs = [(vlm.CAPTION_PROMPT, caption(data.shapes["val"].scene(i))) for i in range(len(masked))]
        mlm_stand_in.truth = data.make_batch("val", np.arange(len(masked)), pairs, "cpu")["answer"]
        calls.append(masked)
        return orig(images, prompt, masked, image_index)
    mlm_stand_in.logits = logits
    assert vlm.attribute_accuracy(mlm_stand_in, data, "val", "cpu", batch_size=1000) == 1.0
    masked = calls[0] == data.tok.mask_id
    assert torch.equal(masked, torch.isin(mlm_stand_in.truth, stand_in.attr))


def test_evaluate_reports_each_figure_under_its_name(world, monkeypatch):
    data = world
    oracle = Oracle(data)
    attrs = Attributes(data)
    oracle.logits = attrs.logits
    out = vlm.evaluate(oracle, data, "cpu")
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
        got = [(r["scene"], r["question"], r["label"], r["parsed"], r["by_prob"]) for r in mine]
        expected = [(i, exist_question(o), lab, s, s) for (i, o, lab), s in zip(qs, said)]
        assert sorted(got) == sorted(expected)
    assert out["pope_random_accuracy"] > out["pope_adversarial_accuracy"]  # the prior shows where it should


def test_hallucination_file_answers_carry_both_keys(tmp_path, world):
    records = [{"split": "random", "seed": 0, "method": "greedy", "question_id": 0, "scene": 3,
                "question": "is there a star?", "label": "no", "raw": "no"}]
    H.write_pope_files(world, records, tmp_path)
    line = json.loads((tmp_path / "random_greedy_answers.jsonl").read_text())
    assert line == {"question_id": 0, "text": "no", "answer": "no"}  # LLaVA's key and POPE's own
    q = json.loads((tmp_path / "random_questions.jsonl").read_text())
    assert q == {"question_id": 0, "image": "val/3", "text": "is there a star?", "label": "no"}
