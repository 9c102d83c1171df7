import copy
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import hallucination as H
import vlm
from data.pairs import row_images
from data.shapes import PARTNER, render_scene
from data.shapes import SHAPES
from lib.checkpoints import load_model
from mae import linear_probe
from study import causes
from tests.conftest import ROOT, VLM_TINY, run, tiny_vlm
from tests.oracle import Oracle, partner_prior


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlm(n_train=200, n_eval=60, cooccur=0.9, noise=0.05)


def test_a_removal_changes_only_that_objects_cell(tiny):
    _, data = tiny
    val = data.shapes["val"]
    edits = causes.beaf_edits(val, 20, seed=0)
    assert {e[3] for e in edits} == {"partner", "random"}
    after = causes.removed_images(data.world, "val", val, edits)
    cell = data.world.img_size / data.world.grid
    for (scene, k, kept, kind), img in zip(edits, after):
        objs = val.scene(scene)
        shapes = objs[:, 0].tolist()
        assert shapes.count(shapes[k]) == 1 and shapes[kept] != shapes[k]
        assert (kind == "partner") == any(PARTNER[t] == shapes[k] for t in shapes)
        changed = np.nonzero((img != val.images[scene]).any(-1))
        row, col = divmod(int(objs[k, 3]), data.world.grid)
        assert len(changed[0]) > 0
        assert changed[0].min() >= int(row * cell) - 1 and changed[0].max() <= int((row + 1) * cell) + 1
        assert changed[1].min() >= int(col * cell) - 1 and changed[1].max() <= int((col + 1) * cell) + 1
        again = render_scene(data.world, "val", scene, objs)  # the same grain: only the object went
        assert np.array_equal(again, val.images[scene])


def test_beaf_measures_by_hand():
    def rec(before, after, kb, ka, kind="partner"):
        return {"before": before, "after": after, "kept_before": kb, "kept_after": ka, "kind": kind}
    records = [rec("yes", "no", "yes", "yes"),   # understood
               rec("yes", "yes", "yes", "yes"),  # stubborn
               rec("no", "no", "yes", "no"),     # stubborn, and the kept object's answer flipped
               rec("no", "yes", "yes", "yes", "random")]  # ignorant: wrong both times
    m = causes.beaf_measures(records)
    assert (m["TU"], m["IG"], m["SB"], m["ID"]) == (0.25, 0.25, 0.5, 0.25)
    assert m["F1"] == pytest.approx(2 * 0.25 * 0.75 / (0.25 + 0.75))
    table = causes.beaf_table(records)
    assert table["partner"]["n"] == 3 and table["random"]["IG"] == 1.0 and table["all"]["n"] == 4


def test_logit_lens_at_the_last_layer_is_the_models_own_answer(tiny):
    model, data = tiny
    b = data.make_batch("val", np.arange(4), [("is there a star?", "")] * 4, "cpu")
    images = row_images(b)
    states = causes.answer_states(model, images, b["prompt"])
    assert states.shape == (len(model.blocks) + 1, 4, model.cfg.n_embd)
    with torch.no_grad():
        lens = causes.logit_lens(model, states)[-1]
        own = model.logits(images, b["prompt"], b["prompt"][:, :0])[:, -1]
    finite = torch.isfinite(own)
    assert torch.allclose(lens[finite], own[finite], atol=1e-4)
    assert causes.lens_says_yes(model, states).shape == (len(model.blocks) + 1, 4)


def test_probe_separates_a_separable_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 16, generator=g)
    score = x[:, 3] - 0.5 * x[:, 7] - 0.2
    x = x[score.abs() > 0.3][:400]  # separable with a margin
    y = (x[:, 3] - 0.5 * x[:, 7] > 0.2).long()
    predict = linear_probe(x[:300], y[:300])
    assert predict(x[300:]).shape == (100,)
    acc = ((predict(x[300:]) > 0).long() == y[300:]).float().mean()
    assert acc > 0.97
    shuffled = linear_probe(x[:300], y[torch.randperm(300, generator=g)])  # no signal: chance
    assert ((shuffled(x[300:]) > 0).long() == y[300:]).float().mean() < 0.8
    two = linear_probe(x[:300], torch.stack([y[:300], 1 - y[:300]], 1))  # two labels at once, (N, 2)
    assert two(x[300:]).shape == (100, 2)
    assert ((two(x[300:]) > 0).long() == torch.stack([y[300:], 1 - y[300:]], 1)).float().mean() > 0.97


def disk_of(size):
    """A child process's files may grow to `size` bytes and no further: a full disk, as Python sees it."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_the_map_trains_each_cell_once_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    conf = tmp_path / "tiny.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in VLM_TINY.items()) + "batch_size = 4\neval_iters = 1\n")
    args = ["-m", "study.causes", "--cooccur=0,0.9", "--noise=0.3", "--max_iters=2", "--n_scenes=6",
            f"--config={conf}", f"--out_dir={tmp_path / 'map'}"]
    full = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=disk_of(400_000),  # a tiny model's full checkpoint needs more
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert full.returncode == 1 and full.stderr.startswith("error: could not write")
    assert full.stderr.count("\n") == 1
    assert not list((tmp_path / "map").rglob("*tmp*"))  # nothing half-written
    first = run(*args)
    assert first.stdout.count("python train.py vlm") == 2
    grid = json.loads((tmp_path / "map/map.json").read_text())["cells"]
    assert set(grid) == {"0,0.3", "0.9,0.3"}
    ckpt = tmp_path / "map/cooccur0.9-noise0.3-seed0/ckpt.pt"
    _, model, cfg, saved = load_model("vlm", ckpt)  # the cell's figures, recomputed from its model
    data = vlm.Data(cfg, seed=saved["config"]["train"]["seed"], verbose=False)
    torch.set_num_threads(1)  # as the subprocess ran
    try:
        rates = causes.partner_yes(model, data, 6, "cpu")
        sight = vlm.answer_questions(model, data, "ood", "cpu", kinds=("exist",))["all"]
    finally:
        torch.set_num_threads(threads)
    cell = grid["0.9,0.3"][0]
    assert (cell["partner_yes"], cell["random_absent_yes"], cell["ood_exist"]) == (*rates, sight)
    assert torch.load(ckpt, weights_only=True)["config"]["model"]["noise"] == 0.3
    stamp = ckpt.stat().st_mtime_ns
    second = run(*args)
    assert "python train.py" not in second.stdout and ckpt.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "map/map.json").read_text())["cells"] == grid  # from the cached figures
    assert Image.open(tmp_path / "map/map.png").size == (1280, 800)  # one slide wide
    assert "| 0 / 0.3 | 1 | " in second.stdout and "| 0.9 / 0.3 | 1 | " in second.stdout  # the table
    one = run("-m", "study.causes", f"--ckpt={ckpt}", "--n_scenes=6", f"--out_dir={tmp_path / 'one'}")
    assert "BEAF partner" in one.stdout and (tmp_path / "one/layers.png").stat().st_size > 0
    beaf = json.loads((tmp_path / "one/beaf_layers.json").read_text())["beaf"]
    assert len(beaf) == 1 and set(beaf[0]) == {"partner", "random", "all"}


def test_map_table_gives_mean_and_spread_over_runs():
    keys = [key for key, _, _, _ in causes.MAP_COLUMNS]
    run_a, run_b = dict.fromkeys(keys, 0.5), dict.fromkeys(keys, 0.5)
    run_a.update(ood_exist=0.9, partner_yes=0.30)
    run_b.update(ood_exist=1.0, partner_yes=0.40)
    lines = causes.map_table({("0.9", "0.2"): [run_a, run_b], ("0", "0"): [run_a]})
    assert len(lines) == 4 and lines[2].startswith("| 0 / 0 | 1 | 0.900 | 50.0 |")  # sorted, one run: no ±
    cells = lines[3].split(" | ")
    assert cells[:3] == ["| 0.9 / 0.2", "2", "0.950 ± 0.050"] and cells[6] == "35.0 ± 5.0"


# ---------------------------------------------------------------------------------------------
# The causes: the map's partner rates, BEAF's before and after, the layers

def test_map_partner_rates_are_the_partner_and_the_random_absent(tiny):
    _, data = tiny
    assert causes.partner_yes(Oracle(data, partner_prior), data, 20, "cpu") == (1.0, 0.0)
    assert causes.partner_yes(Oracle(data), data, 20, "cpu") == (0.0, 0.0)

    def yes_to_others(objs, prompt, truth):
        if prompt.startswith("is there a "):
            asked = SHAPES.index(prompt[len("is there a "):-1])
            return "no" if asked in [PARTNER[s] for s in objs[:, 0].tolist()] else "yes"
        return truth
    assert causes.partner_yes(Oracle(data, yes_to_others), data, 20, "cpu") == (0.0, 1.0)


def test_ask_answers_each_image_about_its_own_shape(tiny):
    _, data = tiny
    val = data.shapes["val"]
    shapes = [int(val.scene(i)[0, 0]) for i in range(10)] + [s for s in range(6)]
    images = np.stack([val.images[i] for i in range(10)] + [val.images[0]] * 6)
    said = causes.ask_exists(Oracle(data), data, images, shapes, H.StudyConfig(), "cpu", batch_size=4)
    present = val.scene(0)[:, 0].tolist()
    assert said == ["yes"] * 10 + ["yes" if s in present else "no" for s in range(6)]


def test_beaf_asks_before_on_the_scene_and_after_on_the_edit(tiny):
    _, data = tiny
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


def test_answer_states_are_each_blocks_output(tiny):
    model, data = tiny
    b = data.make_batch("val", np.arange(5), [("is there a star?", "")] * 5, "cpu")
    images = row_images(b)
    states = causes.answer_states(model, images, b["prompt"])
    with torch.no_grad():
        _, state = model.start(images, b["prompt"], layers=True)  # the generation path keeps them too
        x, key_valid, n_prefix = model.sequence(model.image_tokens(images), b["prompt"], b["prompt"][:, :0])
        mask = vlm.prefix_lm_mask(key_valid, n_prefix)
        by_hand = [x[:, -1]]  # block by block, written out here
        for blk in model.blocks:
            x = blk(x, attn_mask=mask)
            by_hand.append(x[:, -1])
    assert states.shape == (len(model.blocks) + 1, 5, model.cfg.n_embd)
    for layer, expected in enumerate(by_hand):
        assert torch.allclose(states[layer], expected, atol=1e-5), layer
        assert torch.allclose(state["layers"][layer][:, -1], expected, atol=1e-5), layer
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


def crafted(ckpt, path, **model):
    """A copy of a checkpoint whose model config says otherwise (only what is checked before loading)."""
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["model"].update(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return path


def test_a_run_left_with_only_its_best_checkpoint_is_named_not_resumed(tmp_path, tiny_vlm_ckpt):
    from lib.checkpoints import run_left
    from lib.common import UserError
    new = tmp_path / "new"
    assert run_left("vlm", ["--max_iters=2"], new) == ["vlm", "--max_iters=2", f"--out_dir={new}"]
    assert run_left("vlm", [], tiny_vlm_ckpt.parent) == []  # finished
    crafted(tiny_vlm_ckpt, tmp_path / "best/ckpt_best.pt")
    with pytest.raises(UserError, match="holds ckpt_best.pt but no ckpt.pt"):
        run_left("vlm", [], tmp_path / "best")


def test_the_map_and_the_cures_check_everything_before_any_work(tmp_path, tiny_vlm_ckpt):
    mlm_model = crafted(tiny_vlm_ckpt, tmp_path / "mlm/ckpt.pt", objective="mlm")
    folder_model = crafted(tiny_vlm_ckpt, tmp_path / "folder/ckpt.pt", dataset="folder", data_path="photos")
    wide = crafted(tiny_vlm_ckpt, tmp_path / "wide/ckpt.pt", img_size=64)
    (tmp_path / "typo.conf").write_text("n_layr = 2\n")
    (tmp_path / "one.conf").write_text("n_eval = 1\n")
    old = tmp_path / "map"  # a map whose cell was trained for another budget
    crafted(tiny_vlm_ckpt, old / "cooccur0.9-noise0.3-seed0/ckpt.pt", cooccur=0.9, noise=0.3)
    out = f"--out_dir={tmp_path / 'out'}"
    rows = [(["-m", "study.causes", "--noise=0,nan", out], "--noise=0,nan: out of range"),
            (["-m", "study.causes", "--cooccur=inf", out], "--cooccur=inf: out of range"),
            (["-m", "study.causes", "--cooccur=0.9,0.90", out], "names a value twice"),
            (["-m", "study.causes", f"--config={tmp_path / 'typo.conf'}", out], "did you mean --n_layer"),
            (["-m", "study.causes", f"--config={tmp_path / 'one.conf'}", out], "n_eval=1 in"),
            (["-m", "study.causes", f"--ckpt={tiny_vlm_ckpt}", "--noise=0.2", out], "there is no map"),
            (["-m", "study.causes", f"--ckpt={mlm_model}", out], "is an --objective=mlm model"),
            (["-m", "study.causes", "--cooccur=0.9", "--noise=0.3", "--max_iters=5", f"--out_dir={old}"],
             "holds a model of another recipe (max_iters=2"),
            (["hallucination.py", f"--ckpt={tiny_vlm_ckpt}", f"--control_ckpt={folder_model}", "--n_scenes=6",
              out], "was trained on the folder photos"),
            (["-m", "study.cures", f"--ckpt={tiny_vlm_ckpt}", f"--control_ckpt={tiny_vlm_ckpt}",
              "--n_scenes=6", f"--halved_ckpt={wide}", out], "reads 64 px images, the study model 32 px")]
    for args, words in rows:
        p = run(*args, check=False)
        one_line = len(p.stderr.strip().splitlines()) == 1
        assert p.returncode == 2 and words in p.stderr and one_line, (args, p.stderr)
        assert p.stdout == "" and not (tmp_path / "out").exists(), args
    assert sorted(p.name for p in old.iterdir()) == ["cooccur0.9-noise0.3-seed0"]  # the old cell untouched
