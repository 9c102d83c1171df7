import copy
import math

import numpy as np
import pytest
import torch

import hallucination as H
import vlm
from data.pairs import row_images
from data.shapes import PARTNER, SHAPES, exist_question
from study import cures
from study import decoding as D
from study import measures as M
from study import preference
from tests.conftest import tiny_vlm
from tests.oracle import Oracle, asked_shape, partner_prior


def test_dpo_loss_by_hand():
    z = torch.zeros(3)
    assert preference.dpo_loss(z, z, z, z).item() == pytest.approx(preference.LOG2)  # pi = ref: log 2
    pi_w, pi_l, ref_w, ref_l = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    margin = (-1 + 2) - (-3 + 2)  # 2
    assert preference.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-0.5 * margin))))
    assert preference.dpo_loss(pi_l, pi_w, ref_w, ref_l).item() > preference.LOG2  # preferring the loser


def test_answer_logprob_sums_the_answer_tokens(tiny):
    model, data = tiny
    pairs = [("is there a star?", "yes"), ("describe the image.", "a red circle")]
    b = data.make_batch("val", np.arange(2), pairs, "cpu")
    images = row_images(b)
    with torch.no_grad():
        got = preference.answer_logprob(model, images, b["prompt"], b["answer"])
        logits = vlm.answer_positions(model.logits(images, b["prompt"], b["answer"]), b["answer"].shape[1])
        logits = logits.log_softmax(-1)
    for row in range(2):
        ids = [t for t in b["answer"][row].tolist() if t != data.tok.pad_id]
        by_hand = sum(logits[row, j, t].item() for j, t in enumerate(ids))
        assert got[row].item() == pytest.approx(by_hand, rel=1e-5)


def test_steering_keeps_norms_and_follows_the_direction():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(5, 8, generator=g), torch.randn(8, generator=g)
    assert torch.equal(cures.steer(x, d, 0.0), x)
    y = cures.steer(x, d, 0.5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert ((y @ d) > (x @ d)).all() and ((cures.steer(x, -d, 0.5) @ d) < (x @ d)).all()
    diffs = d + 0.1 * torch.randn(200, 8, generator=g)
    mean = cures.principal_direction(diffs)
    assert torch.nn.functional.cosine_similarity(mean, d, dim=0) > 0.99
    flipped = cures.principal_direction(torch.cat([diffs, -diffs[:50]]), pca=True)
    assert torch.dot(flipped, diffs.mean(0)) > 0  # the component's sign agrees with the mean
    randoms = cures.random_like([d, 2 * d], g)
    assert [r.norm().item() for r in randoms] == pytest.approx([d.norm().item(), 2 * d.norm().item()])
    assert torch.nn.functional.cosine_similarity(randoms[0], d, dim=0).abs() < 0.9
    on_gpu = cures.random_like([torch.ones(8, device="meta")], g)  # directions on another device than
    assert on_gpu[0].device.type == "meta"                        # the generator (a CUDA model's)


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlm()


def test_head_scale_gamma_one_is_the_model_and_one_head_scales_alone(tiny):
    model, data = tiny
    b = data.make_batch("val", np.arange(3), [("is there a star?", "")] * 3, "cpu")
    images = row_images(b)
    every = [(l, h) for l in range(len(model.blocks)) for h in range(model.cfg.n_head)]
    with torch.no_grad():
        plain = model.start(images, b["prompt"])[0]
        with cures.scaled_heads(model, every, 1.0):
            assert torch.equal(model.start(images, b["prompt"])[0], plain)
        attn, C = model.blocks[0].attn, model.cfg.n_embd
        x = torch.randn(2, 5, C)
        seen = []
        handle = attn.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        out = attn(x)
        handle.remove()
        with cures.scaled_heads(model, [(0, 1)], 3.0):
            scaled = attn(x)
        hd = C // model.cfg.n_head
        part = slice(hd, 2 * hd)  # head 1's channels: its contribution is y_1 @ W[:, part].T
        expected = 2.0 * seen[0][..., part] @ attn.proj.weight[:, part].T
        assert torch.allclose(scaled - out, expected, atol=1e-5)
    assert not model.blocks[0].attn.proj._forward_pre_hooks  # the hooks are gone after the block


def test_vhd_is_zero_for_a_blind_head_and_picks_follow_it(tiny):
    model, data = tiny
    model = copy.deepcopy(model)
    C, hd = model.cfg.n_embd, model.cfg.n_embd // model.cfg.n_head
    with torch.no_grad():  # head 1 of layer 0 reads nothing: its values are zero
        model.blocks[0].attn.qkv.weight[2 * C + hd:2 * C + 2 * hd] = 0
        model.blocks[0].attn.qkv.bias[2 * C + hd:2 * C + 2 * hd] = 0
    vhd = cures.vhd_scores(model, data, 8, "cpu")
    assert vhd.shape == (len(model.blocks), model.cfg.n_head)
    assert vhd[0, 1] == 0 and (vhd.flatten().sort().values[1:] > 0).all()
    assert cures.pick_heads(vhd, 1, "least") == [(0, 1)]
    top = cures.pick_heads(vhd, 3, "top")
    assert [vhd[l, h].item() for l, h in top] == vhd.flatten().topk(3).values.tolist()
    r1 = cures.pick_heads(vhd, 4, "random", torch.Generator().manual_seed(1))
    r2 = cures.pick_heads(vhd, 4, "random", torch.Generator().manual_seed(1))
    assert r1 == r2 and len(set(r1)) == 4


def test_vti_steering_hooks_masked_copies_and_directions(tiny):
    model, data = tiny
    b = data.make_batch("val", np.arange(3), [("is there a star?", "")] * 3, "cpu")
    images = row_images(b)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1  # no pixel is the background's
    masked = cures.masked_copies(noise, 0.01, gen, model.cfg.patch_size)  # 16 patches: one kept
    patches = (masked != vlm.blank_like(noise)).any(1).view(3, 4, 8, 4, 8).any(4).any(2)  # (3, 4, 4)
    assert patches.sum((1, 2)).tolist() == [1, 1, 1]
    kept = patches.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(noise)
    assert torch.equal(masked[kept], noise[kept]) and torch.equal(masked[~kept], vlm.blank_like(noise)[~kept])
    vis = cures.visual_directions(model, images, gen, trials=2)
    assert [tuple(d.shape) for d in vis] == [(17, 32)] * len(model.vision.blocks)
    txt = cures.textual_directions(model, data, 6, "cpu")
    assert [tuple(d.shape) for d in txt] == [(32,)] * len(model.blocks)
    with torch.no_grad():
        plain = model.start(images, b["prompt"])[0]
        with cures.steered(model.blocks, txt, 0.0), cures.steered(model.vision.blocks, vis, 0.0):
            assert torch.equal(model.start(images, b["prompt"])[0], plain)
        before = cures.block_outputs(model.blocks[:1], lambda: model.start(images, b["prompt"]))[0]
        with cures.steered(model.blocks[:1], txt[:1], 0.5):
            after = cures.block_outputs(model.blocks[:1], lambda: model.start(images, b["prompt"]))[0]
            assert not torch.equal(model.start(images, b["prompt"])[0], plain)
    cos = torch.nn.functional.cosine_similarity
    assert (cos(after, txt[0], dim=-1) > cos(before, txt[0], dim=-1)).all()
    assert torch.equal(model.start(images, b["prompt"])[0], plain)  # the hooks are gone


def test_hallucinated_caption_adds_the_missing_partner():
    from data.shapes import PARTNER
    objs = np.array([[0, 1, 0, 3], [2, 0, 1, 5]])  # a circle (partner: square) and a triangle (star)
    rng = np.random.default_rng(0)
    bad = preference.hallucinated_caption(objs, rng)
    square = np.array([[PARTNER[0], 1, 0, 3]])  # the trigger's colour and size
    star = np.array([[PARTNER[2], 0, 1, 5]])
    assert bad in (cures.caption(np.concatenate([objs, square])), cures.caption(np.concatenate([objs, star])))
    assert preference.hallucinated_caption(np.array([[0, 1, 0, 3], [1, 0, 1, 5]]), rng) is None  # both there


def test_preference_pool_negatives_and_a_dpo_step(tiny):
    from data.shapes import PARTNER, SHAPES
    model, data = tiny
    train = data.shapes["train"]
    for negatives in ("partner", "random"):
        pool = preference.preference_pool(data, 10, negatives, np.random.default_rng(0))
        scenes, prompts, chosen, rejected = pool
        assert len(scenes) == 30 and chosen[0::3] == ["no"] * 10 and rejected[0::3] == ["yes"] * 10
        assert chosen[1::3] == ["yes"] * 10 and rejected[1::3] == ["no"] * 10  # balanced: not "say no"
        for i, q, q_there in zip(scenes[0::3], prompts[0::3], prompts[1::3]):
            shapes = set(train.scene(i)[:, 0].tolist())
            asked, there = (SHAPES.index(x.split()[-1].rstrip("?")) for x in (q, q_there))
            missing = {PARTNER[s] for s in shapes} - shapes
            assert asked not in shapes and (asked in missing) == (negatives == "partner") and there in shapes
        for i, good, bad in zip(scenes[2::3], chosen[2::3], rejected[2::3]):
            assert good == cures.caption(train.scene(i)) and bad.startswith(good.split(" and ")[0])
    pool = preference.preference_pool(data, 4, "partner", np.random.default_rng(0))
    chosen, rejected = preference.preference_batch(data, pool, [0, 1, 2], "cpu")
    with torch.no_grad():  # the policy is still the reference: log 2
        w, l = preference.batch_logprob(model, chosen), preference.batch_logprob(model, rejected)
    assert preference.dpo_loss(w, l, w, l).item() == pytest.approx(preference.LOG2)
    tuned, _ = preference.preference_tune(model, data, "dpo", 3, 0, "cpu", n_scenes=8, batch_size=4)
    assert tuned is not model and any((p - q).abs().max() > 0 for p, q in
                                      zip(tuned.parameters(), model.parameters()))


def test_the_cures_table_runs_every_cure_beside_its_controls(tmp_path, tiny_vlm_ckpt):
    import json
    from tests.conftest import run
    ckpt = tiny_vlm_ckpt
    p = run("-m", "study.cures", f"--ckpt={ckpt}", f"--control_ckpt={ckpt}", f"--halved_ckpt={ckpt}",
            "--seeds=1",
            "--n_scenes=6", "--n_captions=4", "--n_calib=4", "--dpo_steps=2", "--k_heads=2",
            f"--out_dir={tmp_path / 'cures'}")
    results = json.loads((tmp_path / "cures/cures.json").read_text())["methods"]
    names = list(results)
    assert names[0] == "greedy" and len(names) == 13 and "x greedy" in p.stdout
    assert any(n.startswith("control: 2 random heads") for n in names) and "DPO (partner negatives)" in names
    assert results["DPO (partner negatives)"][0]["train_min"] > 0 and results["greedy"][0]["train_min"] == 0
    for name, (row,) in results.items():  # each cure's time as a multiple of greedy's, this seed
        assert row["x_greedy"] == pytest.approx(row["seconds"] / results["greedy"][0]["seconds"])
    assert (tmp_path / "cures/cures.png").stat().st_size > 0


def test_a_killed_cures_run_resumes_from_its_measured_rows(tmp_path, tiny_vlm_ckpt):
    import json
    import os
    import subprocess
    import sys
    import time
    from tests.conftest import ROOT, run
    args = ["-m", "study.cures", f"--ckpt={tiny_vlm_ckpt}", f"--control_ckpt={tiny_vlm_ckpt}",
            f"--halved_ckpt={tiny_vlm_ckpt}", "--seeds=1", "--n_scenes=6", "--n_captions=4", "--n_calib=4",
            "--dpo_steps=2", "--k_heads=2", f"--out_dir={tmp_path / 'cures'}"]
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = tmp_path / "cures/rows"
    while p.poll() is None and len(list(rows.glob("*.json"))) < 2:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.kill()  # kill -9: no handler runs
    p.wait()
    kept = {f.name: (f.stat().st_mtime_ns, json.loads(f.read_text())) for f in rows.glob("*.json")}
    assert len(kept) >= 2 and not (tmp_path / "cures/cures.json").exists()
    again = run(*args)
    assert again.stdout.count("measured by an earlier run") == len(kept)
    methods = json.loads((tmp_path / "cures/cures.json").read_text())["methods"]
    assert len(methods) == 13 and len(list(rows.glob("*.json"))) == 13
    for name, (stamp, saved) in kept.items():  # the rows measured before the kill: kept, not measured again
        assert (rows / name).stat().st_mtime_ns == stamp
        row = next(r for n, (r,) in methods.items() if cures.row_path(tmp_path, 0, n).name == name)
        assert {k: row[k] for k in saved["figures"]} == saved["figures"]
    name, (_, saved) = next(iter(kept.items()))
    row = next(n for n in methods if cures.row_path(tmp_path / "cures", 0, n).name == name)
    assert cures.measured_row(tmp_path / "cures", 0, row, saved["stamp"]) == saved["figures"]
    other = {**saved["stamp"], "config": {**saved["stamp"]["config"], "dpo_steps": 3}}
    assert cures.measured_row(tmp_path / "cures", 0, row, other) is None  # another recipe: measured again
    (rows / name).write_text('{"stamp": ')  # damaged: measured again
    assert cures.measured_row(tmp_path / "cures", 0, row, saved["stamp"]) is None


def test_cures_partner_yes_rate_counts_only_missing_partners():
    _, data = tiny_vlm(n_train=200, n_eval=60, cooccur=0.9)
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
