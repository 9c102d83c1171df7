import copy
import math

import numpy as np
import pytest
import torch

import hallucination as H
import vlm
from data.pairs import row_images
from data.shapes import BACKGROUND, PARTNER, SHAPES
from study import decoding as D
from study import measures as M
from tests.conftest import tiny_vlm


def test_contrastive_logits_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0, 2.0 + math.log(0.1) - 1e-3]])
    cd = torch.tensor([[3.0, 0.0, -5.0, 0.0]])
    out = D.contrastive_logits(logits, cd, alpha=1.0, beta=0.1)
    # (1+a)*l - a*l_cd on tokens with p >= 0.1 max p; the last one is just below the cut
    assert torch.equal(out, torch.tensor([[1.0, 2.0, float("-inf"), float("-inf")]]))
    torch.manual_seed(0)
    logits, cd = torch.randn(50, 30) * 3, torch.randn(50, 30) * 3
    assert torch.equal(D.contrastive_logits(logits, cd, alpha=0.0), D.plausibility_cut(logits, 0.1))
    for alpha in (0.5, 1.0, 5.0):
        assert torch.equal(D.contrastive_logits(logits, cd, alpha, beta=1.0).argmax(-1), logits.argmax(-1))


def test_m3id_weight_schedule_and_mix_by_hand():
    assert D.m3id_weight(0, 0.02) == 0.0  # the first token is the model's own
    assert D.m3id_weight(10, 0.1) == pytest.approx(math.e - 1)  # g = e^-1: (1 - 1/e) / (1/e)
    w = [D.m3id_weight(t, 0.02) for t in range(0, 60, 10)]
    assert all(a < b for a, b in zip(w, w[1:]))  # it only grows
    logits = torch.tensor([[2.0, 1.5, -3.0]])
    blank = torch.tensor([[2.0, 0.5, 0.0]])
    out = D.m3id_logits(logits, blank, 10, 0.1, beta=0.1)
    # 2 + (e-1)*0 = 2; 1.5 + (e-1)*1 = 0.5 + e; -3 is below the cut (p < 0.1 max p)
    assert out[0, 0] == 2.0 and out[0, 1].item() == pytest.approx(0.5 + math.e) and out[0, 2] == float("-inf")
    assert torch.equal(D.m3id_logits(logits, blank, 0, 0.1), D.plausibility_cut(logits, 0.1))


def test_deco_candidates_anchor_and_mix_by_hand():
    logits = torch.tensor([[3.0, 2.0, 0.0, -5.0]])  # p = .705, .259, .035, .000
    assert D.deco_candidates(logits, top_k=3, top_p=0.9).tolist() == [[True, True, False, False]]
    assert D.deco_candidates(logits, top_k=1, top_p=0.9).tolist() == [[True, False, False, False]]
    # layer A is sure of a token that is no candidate; layer B puts 0.870 on candidate 1: B is the anchor
    early = torch.tensor([[[0.0, 0.0, 10.0, 0.0]], [[0.0, 3.0, 0.0, 0.0]]])  # (W=2, B=1, V=4)
    out = D.deco_logits(logits, early, alpha=0.6, top_k=3, top_p=0.9)
    c = math.exp(3) / (math.exp(3) + 3)
    assert out[0, 0] == 3.0 and out[0, 1].item() == pytest.approx(2 + 0.6 * c * 3)
    assert out[0, 2] == out[0, 3] == float("-inf") and out.argmax().item() == 1  # the earlier layer wins
    assert torch.equal(D.deco_logits(logits, early, alpha=0.0, top_k=3), logits.masked_fill(
        ~D.deco_candidates(logits, 3), float("-inf")))
    assert D.deco_window(4) == [2, 3] and D.deco_window(2) == [1] and D.deco_window(12) == list(range(6, 12))


def test_deco_in_decode_reads_the_layers_of_a_full_pass(tiny):
    from study import causes
    model, data = tiny
    b = data.make_batch("val", np.arange(6), [("is there a star?", "")] * 6, "cpu")
    images, sc = row_images(b), H.StudyConfig()
    _, first, _ = D.decode(model, images, b["prompt"], D.METHODS["DeCo (greedy)"], sc, 3, torch.Generator())
    with torch.no_grad():
        states = causes.answer_states(model, images, b["prompt"])  # (L + 1, B, D), without a cache
        window = D.deco_window(len(model.blocks))
        ref = D.deco_logits(model.head(states[-1]), model.head(states[window]), sc.deco_alpha,
                            sc.deco_top_k, sc.deco_top_p)
    assert torch.equal(torch.isinf(first), torch.isinf(ref))
    assert torch.allclose(first[~torch.isinf(ref)], ref[~torch.isinf(ref)], atol=1e-4)


def test_pope_metrics_and_strict_parser():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    answers = ["yes", "yes", None, "yes", "no", "no"]
    m = M.pope_metrics(labels, answers)
    assert m["accuracy"] == 4 / 6 and m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 3 / 6 and m["unparsable"] == 1
    assert M.parse_yes_no("Yes.") == "yes" and M.parse_yes_no("no, there is not") == "no"
    # POPE's rule: the first sentence's words; no/No/not -> no, anything else (even nothing) -> yes
    assert [M.pope_rule(t) for t in ("No, there is not.", "Yes. There is no cat.", "there is not a star",
                                     "", "a square", "nothing", "No.")] == [
        "no", "yes", "no", "yes", "yes", "yes", "no"]
    assert M.parse_yes_no("a square") is None and M.parse_yes_no("") is None
    assert M.parse_yes_no("yesterday") is None


def test_chair_by_hand():
    scenes = [np.array([[0, 0, 1, 0], [1, 2, 0, 4]]), np.array([[2, 1, 1, 3]])]  # circle+square; triangle
    caps = ["a large red circle, a small blue square and a small green star", "a small red triangle"]
    c = M.chair(caps, scenes)
    assert c["chair_i"] == 1 / 4 and c["chair_s"] == 1 / 2 and c["recall"] == 3 / 3
    c = M.chair(["a circle and a circle", "nothing"], scenes)
    assert c["chair_i"] == 1 / 2 and c["chair_s"] == 1 / 2 and c["recall"] == 1 / 3


@pytest.fixture(scope="module")
def tiny():
    model, data = tiny_vlm(n_train=400, n_eval=60, cooccur=0.9)
    with torch.no_grad():
        model.head_bias.normal_(0, 3)
    return model, data


def test_chair_over_a_folders_words_by_hand():
    vocab = ["dog", "frisbee", "traffic light"]
    caps = ["A dog catches a frisbee.", "a puppy under a traffic light", "a dog, a dog and a cat"]
    sets = [{0, 1}, {2}, {1}]
    c = M.chair_words(caps, sets, vocab, {"puppy": "dog"})
    # mentioned: {dog, frisbee}, {dog (puppy), traffic light}, {dog}; hallucinated: dog twice
    assert c["chair_i"] == pytest.approx(2 / 5) and c["chair_s"] == pytest.approx(2 / 3)
    assert c["recall"] == pytest.approx(3 / 4)
    assert M.chair_words(caps[1:2], sets[1:2], vocab)["chair_i"] == 0  # no synonyms: "puppy" is no dog


def test_pope_questions_are_balanced_absent_and_adversarial(tiny):
    _, data = tiny
    freq, cooc = M.shape_stats(data.shapes["train"])
    assert cooc[0, PARTNER[0]] > 0.6 and cooc[0, PARTNER[0]] > 2 * cooc[0, 3]  # the partner bias is learnable
    for split in M.POPE_SPLITS:
        qs = M.pope_questions(data.objects("val"), split, 50, 0, freq, cooc)
        assert len(qs) >= 90 and sum(l == "yes" for _, _, l in qs) * 2 == len(qs)
        for scene, shape, label in qs:
            present = set(data.shapes["val"].scene(scene)[:, 0].tolist())
            assert (shape in present) == (label == "yes")
            absent = [s for s in range(len(SHAPES)) if s not in present]
            if label == "no" and split == "adversarial":
                partner_score = {s: max(cooc[p, s] for p in present) for s in absent}  # by hand
                assert partner_score[shape] == max(partner_score.values())
            if label == "no" and split == "popular":
                assert freq[shape] == max(freq[s] for s in absent)


def test_gated_batched_branches_give_the_tokens_of_separate_passes(tiny):
    model, data = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.ln_f.weight.mul_(5)  # peaked: the cut keeps one token in some rows and steps, more in others
    sc = H.StudyConfig()
    prompts = [(vlm.CAPTION_PROMPT, ""), ("which shapes are there?", "")]
    prompts += [(f"is there a {s}?", "") for s in SHAPES]
    b = data.make_batch("val", np.arange(8), prompts, "cpu")
    images = row_images(b)
    for name in ("VCD (greedy)", "RITUAL (sampling)", "no-image contrast (sampling)", "M3ID (greedy)"):
        m = D.METHODS[name]
        gated, _, _ = D.decode(model, images, b["prompt"], m, sc, 10, torch.Generator().manual_seed(3))
        full, _, n_full = D.decode(model, images, b["prompt"], m, sc, 10, torch.Generator().manual_seed(3),
                                   gate=False)
        # rows the second branch reads within 1, 5 and 10 tokens: rows join late, one at a time, some never
        n = [D.decode(model, images, b["prompt"], m, sc, t, torch.Generator().manual_seed(3))[2]
             for t in (1, 5, 10)]
        assert n_full == 8 and n[0] < n[1] < n[2] < 8, (name, n)
        # the reference: each branch as its own pass over every row, the same random draws, no gate
        gen = torch.Generator().manual_seed(3)
        draws = D.branch_draws(8, m.second, gen)
        images2, index = D.second_images(images, torch.arange(8), m.second, draws, sc)
        states = [model.start(images, b["prompt"]), model.start(images2, b["prompt"], image_index=index)]
        logits, states = [s[0] for s in states], [s[1] for s in states]
        out = []
        for t in range(gated.shape[1]):
            scores = D.mix(m, *logits, sc, t).masked_fill(~D.plausible(logits[0], sc.beta), float("-inf"))
            if m.sample:
                u = torch.rand(scores.shape, generator=gen)
                token = (scores.log_softmax(-1) - torch.log(-torch.log(u.clamp(1e-10, 1)))).argmax(-1)
            else:
                token = scores.argmax(-1)
            out.append(token)
            logits = [model.step(st, token) for st in states]
        ref = torch.stack(out, 1)
        done = torch.cumsum((ref == data.tok.eot_id).int(), 1) - (ref == data.tok.eot_id).int() > 0
        ref = ref.masked_fill(done, data.tok.pad_id)
        assert torch.equal(gated, ref) and torch.equal(full, ref), name


def test_the_study_end_to_end_writes_what_its_records_say(tmp_path, tiny_vlm_ckpt):
    """`python hallucination.py` on a tiny model (as its own control): results.json's POPE figures are
    recounted from pope.jsonl's answers, and POPE's answer files hold those answers."""
    import json
    from tests.conftest import run
    out = tmp_path / "study"
    p = run("hallucination.py", f"--ckpt={tiny_vlm_ckpt}", f"--control_ckpt={tiny_vlm_ckpt}", "--seeds=2",
            "--n_scenes=6", "--n_captions=4", f"--out_dir={out}")
    results = json.loads((out / "results.json").read_text())["methods"]
    records = [json.loads(line) for line in (out / "pope.jsonl").read_text().splitlines()]
    assert list(results) == [*D.METHODS, "unbiased data, greedy"] and "| method |" in p.stdout
    for name, rows in results.items():
        for seed, figures in enumerate(rows):
            for split in M.POPE_SPLITS:
                mine = [r for r in records if (r["method"], r["seed"], r["split"]) == (name, seed, split)]
                assert len(mine) == 12 and [r["label"] for r in mine].count("yes") == 6
                right = [r["parsed"] == r["label"] for r in mine]
                yes = [r["parsed"] == "yes" for r in mine]
                assert figures[f"pope_{split}_accuracy"] == pytest.approx(sum(right) / 12), (name, split)
                assert figures[f"pope_{split}_yes_ratio"] == pytest.approx(sum(yes) / 12)
                by_prob = sum(r["by_prob"] == r["label"] for r in mine) / 12
                assert figures[f"pope_{split}_prob_accuracy"] == pytest.approx(by_prob)
                assert all(r["parsed"] == M.parse_yes_no(r["raw"]) for r in mine)
    for split in M.POPE_SPLITS:
        seed0 = [r for r in records if (r["method"], r["seed"], r["split"]) == ("VCD (greedy)", 0, split)]
        lines = (out / f"pope/{split}_VCD__greedy_answers.jsonl").read_text().splitlines()
        answers = [json.loads(x) for x in lines]
        expected = [(r["question_id"], r["raw"], r["raw"]) for r in seed0]
        assert [(a["question_id"], a["text"], a["answer"]) for a in answers] == expected


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
    share = H.image_attention(model, row_images(b), b["prompt"], b["answer"])
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
    images, sc = row_images(b), H.StudyConfig()
    a, s = D.noise_coefficients(sc.noise_step)
    for name in ("VCD (greedy)", "RITUAL (sampling)", "M3ID (greedy)"):
        seen, start = [], model.start

        def recording(imgs, prompt, answer=None, image_index=None, layers=False):
            seen.append(imgs if image_index is None else imgs[image_index])
            return start(imgs, prompt, answer, image_index, layers)
        monkeypatch.setattr(model, "start", recording)
        gen = torch.Generator().manual_seed(5)
        D.decode(model, images, b["prompt"], D.METHODS[name], sc, 2, gen, gate=False)
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
