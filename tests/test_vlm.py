import json

import numpy as np
import pytest
import torch

import mlm
import vlm
from data.pairs import row_images
from data.shapes import World, caption, object_match, parse_caption, sample_scene
from lib.checkpoints import load_checkpoint
from lib.common import UserError
from study.decoding import cat_states
from tests.conftest import VLM_ARGS, VLM_TINY, evaluate_again, overfit, run, tiny_vlm


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlm()


def test_kv_cache_gives_the_tokens_of_full_recomputation(tiny):
    model, data = tiny
    with torch.no_grad():  # a random model is too timid: sharpen it so answers run long and differ
        model.head_bias.normal_(0, 3)
    b = data.batch("val", 0, 6, "cpu")  # questions and captions: prompts of different lengths
    assert (b["prompt"] == data.tok.pad_id).any()
    cached = model.generate(row_images(b), b["prompt"], 12, use_cache=True)
    full = model.generate(row_images(b), b["prompt"], 12, use_cache=False)
    assert cached.shape[1] > 3 and torch.equal(cached, full)
    torch.manual_seed(1)
    a = model.generate(row_images(b), b["prompt"], 12, temperature=1.0, top_k=5)
    torch.manual_seed(1)
    c = model.generate(row_images(b), b["prompt"], 12, temperature=1.0, top_k=5, use_cache=False)
    assert torch.equal(a, c)
    # a row alone gets the same answer as in the padded batch
    first_real = (b["prompt"][2] != data.tok.pad_id).int().argmax()
    alone = model.generate(row_images(b)[2:3], b["prompt"][2:3][:, first_real:], 12)
    assert torch.equal(alone[0], cached[2, :alone.shape[1]])



def test_start_late_and_join_a_batch_match_full_recomputation(tiny):
    model, data = tiny
    b = data.batch("val", 0, 4, "cpu")
    images, prompt = row_images(b), b["prompt"]
    answer = torch.randint(0, 390, (len(prompt), 3))  # ordinary words: the special ids are 392 and up
    with torch.no_grad():
        full = model.logits(images, prompt, answer)[:, -answer.shape[1] - 1:]  # (B, 4, V): after each prefix
        logits, state = model.start(images, prompt, answer[:, :2])  # joining after two answer tokens
        assert torch.allclose(logits, full[:, 2], atol=1e-5)
        assert torch.allclose(model.step(state, answer[:, 2]), full[:, 3], atol=1e-5)
        logits, state = model.start(images[:1], prompt[:2], image_index=torch.zeros(2, dtype=torch.long))
        other, _ = model.start(images[:1].expand(2, -1, -1, -1), prompt[:2])  # one image read once, two rows
        assert torch.allclose(logits, other, atol=1e-5)
        both = cat_states(state, model.start(images[2:], prompt[2:])[1])
        assert torch.allclose(model.step(both, answer[:, 0])[2:], full[2:, 1], atol=1e-5)


def test_prefix_lm_mask_by_hand():
    key_valid = torch.tensor([[True, True, False, True, True, True, False]])  # img img pad prompt|ans ans pad
    m = vlm.prefix_lm_mask(key_valid, n_prefix=4)[0, 0]
    assert m[0, 3] and m[3, 0] and m[1, 3]  # image and prompt see each other both ways
    assert not m[0, 4] and not m[3, 4]  # the prefix never sees the answer
    assert m[4, 3] and m[4, 4] and not m[4, 5]  # an answer token sees the prefix and itself, not later ones
    assert m[5, 4] and not m[:, 2].any() and not m[:, 6].any()  # padding is never seen


def test_prefix_mask_in_the_model(tiny):
    model, data = tiny
    b = data.batch("train", 1, 4, "cpu")
    n_img, A = data.image_len(), b["answer"].shape[1]
    base = model.logits(b["images"], b["prompt"], b["answer"], b["image_index"])
    later = b["answer"].clone()
    later[:, 2] = (later[:, 2] + 7) % 300
    out = model.logits(b["images"], b["prompt"], later, b["image_index"])
    S = out.shape[1]
    assert torch.allclose(out[:, :S - A + 2], base[:, :S - A + 2], atol=1e-5)  # positions before: unchanged
    assert not torch.allclose(out[:, S - A + 2], base[:, S - A + 2])
    prompt = b["prompt"].clone()
    prompt[:, -2] = (prompt[:, -2] + 7) % 300
    out = model.logits(b["images"], prompt, b["answer"], b["image_index"])
    assert not torch.allclose(out[:, :n_img], base[:, :n_img])  # image tokens see the prompt


def test_loss_counts_answer_tokens_only_each_text_weighing_the_same(tiny):
    model, data = tiny
    b = data.batch("train", 2, 4, "cpu")
    loss, _ = model(b)
    logits = model.logits(b["images"], b["prompt"], b["answer"], b["image_index"])
    A = b["answer"].shape[1]
    pred, target = logits[:, -A - 1:-1], b["answer"]
    keep = target != data.tok.pad_id
    per_text = [torch.nn.functional.cross_entropy(p[k], t[k]) for p, t, k in zip(pred, target, keep)]
    assert torch.allclose(loss, torch.stack(per_text).mean(), atol=1e-6)  # a caption counts as a "yes"
    model.cfg.loss_mean = "token"
    try:
        token_mean = torch.nn.functional.cross_entropy(pred[keep], target[keep])
        assert torch.allclose(model(b)[0], token_mean, atol=1e-6)
        assert not torch.allclose(token_mean, loss)  # captions and one-word answers: the means differ
    finally:
        model.cfg.loss_mean = "text"
    other = dict(b, images=torch.zeros_like(b["images"]))
    assert not torch.allclose(model(other)[0], loss)  # the image matters through attention...
    prompt_only = dict(b, answer=b["answer"].masked_fill(torch.ones_like(keep), data.tok.pad_id))
    assert torch.isnan(model(prompt_only)[0]) or model(prompt_only)[0] == 0  # ...but is never a target


def test_tiny_vlm_overfits_a_batch():
    torch.manual_seed(0)
    cfg = vlm.Config(**VLM_TINY)
    data = vlm.Data(cfg, seed=0, verbose=False)
    model = vlm.VLM(cfg, data.tok)
    b = data.batch("train", 0, 8, "cpu")
    loss, metrics = overfit(model, b, 150)
    assert loss.item() < 0.05 and metrics["acc"] == 1.0
    model.eval()
    out = model.generate(row_images(b), b["prompt"], b["answer"].shape[1])
    for ids, answer in zip(out.tolist(), b["answer"].tolist()):
        n = answer.index(data.tok.eot_id) + 1
        assert ids[:n] == answer[:n]


def test_mlm_objective_masks_the_caption_and_sees_everything(tiny):
    _, data = tiny
    torch.manual_seed(0)
    cfg = vlm.Config(**VLM_TINY, objective="mlm")
    model = vlm.VLM(cfg, data.tok)
    b = vlm.Data(cfg, seed=0, verbose=False).batch("train", 0, 8, "cpu")
    assert b["prompt"].shape[1] >= 1 and (b["answer"] == data.tok.eot_id).any()
    torch.manual_seed(3)
    loss, m = model(b)
    torch.manual_seed(3)  # the same masks, by hand: BERT's masking, then the model's fill
    n_regular = data.tok.vocab_size - len(data.tok.special)
    inputs, labels = mlm.mask_tokens(b["answer"], data.tok.mask_id, n_regular, model.special_ids,
                                     cfg.mask_prob)
    logits = model.logits(b["images"], b["prompt"], inputs, b["image_index"])[:, -inputs.shape[1]:]
    sel = labels != -100
    assert sel.any() and (inputs[sel] != b["answer"][sel]).any()  # some caption tokens were hidden
    assert (labels[~sel] == -100).all() and torch.equal(labels[sel], b["answer"][sel])
    by_hand = torch.nn.functional.cross_entropy(logits[sel], labels[sel])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert m["acc"] == pytest.approx((logits[sel].argmax(-1) == labels[sel]).float().mean().item())


def test_caption_parser_and_object_match():
    w = World()
    for i in range(200):
        objs = sample_scene(w, "ood", i)
        said = parse_caption(caption(objs))
        assert object_match(said, objs) == (len(objs), len(objs), len(objs))
    objs = np.array([[0, 0, 1, 0], [1, 2, 0, 4]])  # a large red circle, a small blue square
    assert parse_caption("A large red circle and a cyan star.") == [(1, 0, 0), (-1, 5, 4)]
    assert object_match(parse_caption("a large red circle and a cyan star"), objs) == (1, 2, 2)
    assert object_match(parse_caption("a small red circle, a blue square"), objs) == (1, 2, 2)
    assert object_match(parse_caption("a square and a square"), objs) == (1, 2, 2)  # one square, said twice


def test_init_vision_from_an_mae_checkpoint(tmp_path):
    mae_args = ["--img_size=32", "--patch_size=8", "--n_layer=1", "--n_head=2", "--n_embd=32",
                "--decoder_n_layer=1", "--decoder_n_embd=32", "--decoder_n_head=2", "--n_train=64",
                "--n_val=16",
                "--batch_size=4", "--max_iters=1", "--eval_iters=1", f"--out_dir={tmp_path / 'mae'}"]
    run("train.py", "mae", *mae_args)
    weights = load_checkpoint(tmp_path / "mae/ckpt.pt", "mae")["model"]
    enc = {k[8:]: v for k, v in weights.items() if k.startswith("encoder.")}
    from_mae = {**VLM_TINY, "init_vision": str(tmp_path / "mae/ckpt.pt")}
    model = vlm.VLM(vlm.Config(**from_mae, freeze_vision=True))
    for k, v in model.vision.state_dict().items():
        assert torch.equal(v, enc[k]), k
    assert not any(p.requires_grad for p in model.vision.parameters())
    with pytest.raises(UserError, match=r"encoder.cls_token is \(1, 1, 32\) there, \(1, 1, 64\) here"):
        vlm.VLM(vlm.Config(**{**VLM_TINY, "vision_n_embd": 64, "init_vision": str(tmp_path / "mae/ckpt.pt")}))
    run("train.py", "mlm", "--corpus=pydoc", "--tokenizer=char", "--n_layer=1", "--n_embd=32", "--n_head=2",
        "--block_size=16", "--batch_size=4", "--max_iters=1", "--eval_iters=1",
        f"--out_dir={tmp_path / 'mlm'}")
    with pytest.raises(UserError, match="'mlm' checkpoint, not 'mae'"):
        vlm.VLM(vlm.Config(**{**VLM_TINY, "init_vision": str(tmp_path / "mlm/ckpt.pt")}))


def test_train_vlm_then_sample(tmp_path):
    p = run("train.py", "vlm", *VLM_ARGS, "--batch_size=8", "--max_iters=4", "--eval_iters=1",
            "--log_interval=2",
            f"--out_dir={tmp_path}")
    assert "tokens/s" in p.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    again = evaluate_again(tmp_path)  # what the saved model answers, recomputed here
    for k in ("ood_q_exist", "ood_q_all", "val_caption_f1", "ood_caption_exact", "ood_attr_acc_image",
              "ood_attr_acc_blank"):
        assert metrics[k] == pytest.approx(again[k]), k
    p = run("sample.py", "vlm", f"--out_dir={tmp_path}", "--scenes=0,3", "--split=ood")
    assert p.stdout.startswith("ood 0: ") and "ood 3: " in p.stdout and (tmp_path / "sample_vlm.png").exists()
    p = run("sample.py", "vlm", f"--out_dir={tmp_path}", "--n=2", "--prompt=is there a circle?")
    assert p.stdout.count("val ") == 2
    p = run("sample.py", "vlm", f"--out_dir={tmp_path}", "--scenes=99999", check=False)
    assert p.returncode == 2 and "scenes 0 to 15" in p.stderr


def test_vlm_resume_gives_identical_losses(tmp_path):
    common = [*VLM_ARGS, "--batch_size=4", "--eval_iters=1", "--eval_interval=3", "--log_interval=1",
              "--lr_decay_iters=5"]
    run("train.py", "vlm", *common, "--max_iters=5", f"--out_dir={tmp_path / 'once'}")
    run("train.py", "vlm", *common, "--max_iters=2", f"--out_dir={tmp_path / 'twice'}")
    run("train.py", "vlm", "--init_from=resume", "--max_iters=5", f"--out_dir={tmp_path / 'twice'}")
    once = load_checkpoint(tmp_path / "once/ckpt.pt", "vlm")
    twice = load_checkpoint(tmp_path / "twice/ckpt.pt", "vlm")
    assert [i for i, _ in twice["history"]["train"]] == [1, 2, 3, 4, 5]
    assert once["history"]["train"] == twice["history"]["train"]  # bit for bit
    assert once["history"]["monitor"][-1]["ood_exist"] == twice["history"]["monitor"][-1]["ood_exist"]
    for k, v in once["model"].items():
        assert torch.equal(v, twice["model"][k]), k


def test_mlm_objective_trains_and_fills_blanks_given_the_image(tmp_path):
    run("train.py", "vlm", *VLM_ARGS, "--objective=mlm", "--batch_size=8", "--max_iters=2", "--eval_iters=1",
        f"--out_dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ood_attr_acc_image"] == pytest.approx(evaluate_again(tmp_path)["ood_attr_acc_image"])
    assert "ood_q_exist" not in metrics  # it does not answer
    p = run("sample.py", "vlm", f"--out_dir={tmp_path}", "--scenes=1", "--prompt=a large [MASK] circle")
    assert "[MASK] #1:" in p.stdout and "most likely: a large" in p.stdout
    p = run("sample.py", "vlm", f"--out_dir={tmp_path}", "--scenes=1", check=False)
    assert p.returncode == 2 and "fills blanks" in p.stderr


def test_time_to_sight_is_the_first_evaluation_at_the_bar(tmp_path):
    import bench
    evaluations = ((250, 100.0, 0.6), (500, 210.0, 0.96), (750, 300.0, 0.94), (1000, 400.0, 0.99))
    monitor = [{"iter": it, "seconds": sec, "ood_exist": acc} for it, sec, acc in evaluations]
    assert bench.time_to_sight(monitor, 60.0) == "sight 0.95 at iteration 500, 270 s (pretraining 60 s)"
    assert bench.time_to_sight(monitor[:1], 0.0) == "sight 0.95 not reached (best 0.600)"
    run("train.py", "vlm", *VLM_ARGS, "--batch_size=4", "--max_iters=2", "--eval_interval=1",
        "--eval_iters=1", f"--out_dir={tmp_path / 'run'}")
    p = run("bench.py", "sight", str(tmp_path / "run"), str(tmp_path / "curves.png"))
    assert "sight 0.95 not reached" in p.stdout and (tmp_path / "curves.png").stat().st_size > 0
