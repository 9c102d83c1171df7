import json
import re

import pytest
from PIL import Image

from data.captioned import read_folder
from data.shapes import SHAPES, World, caption, render, sample_scene
from lib.common import UserError


def shapes_folder(folder, n=20):
    """n shapes-world scenes as PNGs -> [(file name, caption, shape names)]"""
    w, rows = World(img_size=32), []
    (folder / "img").mkdir(parents=True)
    for i in range(n):
        objs = sample_scene(w, "train", i)
        name = f"img/{i:04d}.png"
        Image.fromarray(render(w, objs)).save(folder / name)
        rows.append((name, caption(objs), sorted({SHAPES[s] for s in objs[:, 0].tolist()})))
    return rows


def test_three_formats_read_the_same_records(tmp_path):
    rows = shapes_folder(tmp_path / "meta")
    lines = []
    for f, c, o in rows:
        qa = [{"q": "is there a star?", "a": "yes" if "star" in o else "no"}]
        lines.append({"file_name": f, "caption": c, "qa": qa, "objects": o})
    (tmp_path / "meta/metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    meta = read_folder(tmp_path / "meta")
    assert len(meta) == 20 and [r["split"] for r in meta].count("val") == 2
    assert meta[0]["captions"] == [rows[0][1]] and meta[0]["objects"] == rows[0][2]

    rows = shapes_folder(tmp_path / "llava")
    llava = [{"image": f, "conversations": [{"from": "human", "value": "<image>\ndescribe the image."},
                                            {"from": "gpt", "value": c}]} for f, c, _ in rows]
    (tmp_path / "llava/train.json").write_text(json.dumps(llava))
    got = read_folder(tmp_path / "llava")
    assert got[3]["qa"] == [("describe the image.", rows[3][1])] and got[3]["objects"] is None

    rows = shapes_folder(tmp_path / "coco")
    images = [{"id": i, "file_name": f} for i, (f, _, _) in enumerate(rows)]
    annotations = [{"image_id": i, "caption": c} for i, (_, c, _) in enumerate(rows)]
    captions = {"images": images, "annotations": annotations}
    (tmp_path / "coco/captions_train.json").write_text(json.dumps(captions))
    cats = [{"id": k, "name": s} for k, s in enumerate(SHAPES)]
    inst = [{"image_id": i, "category_id": SHAPES.index(s)} for i, (_, _, o) in enumerate(rows) for s in o]
    (tmp_path / "coco/instances_train.json").write_text(json.dumps({"categories": cats, "annotations": inst}))
    coco = read_folder(tmp_path / "coco")
    assert [r["captions"] for r in coco] == [[c] for _, c, _ in rows]
    assert [r["objects"] for r in coco] == [o for _, _, o in rows]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 3: not JSON"),
    ('{"file_name": "img/missing.png", "caption": "x"}', "img/missing.png does not exist"),
    ('{"file_name": "img/0000.png", "caption": "x", "objects": "dog"}', "a list of non-empty strings"),
    ('{"file_name": "img/0000.png", "caption": "x", "objects": ["dog", ""]}', "a list of non-empty strings"),
    ('{"caption": "x"}', 'needs a "file_name"'),
    ('{"file_name": "img/0000.png", "caption": "x", "split": "test"}', "must be train or val"),
    ('{"file_name": "/etc/hostname", "caption": "x"}', "line 3: /etc/hostname lies outside"),
    ('{"file_name": "../outside.png", "caption": "x"}', "line 3: ../outside.png lies outside"),
    ('{"file_name": "img/link.png", "caption": "x"}', "line 3: img/link.png lies outside"),
    ('{"file_name": "img/0000.png", "caption": 7}', "the caption must be a non-empty string, not 7"),
    ('{"file_name": "img/0000.png", "caption": ["a", "b"]}', "the caption must be a non-empty string"),
    ('{"file_name": "img/0000.png", "caption": NaN}', "the caption must be a non-empty string, not NaN"),
    ('{"file_name": "img/0000.png", "qa": [{"q": ["is it?"], "a": "yes"}]}', "a question must be a non"),
    ('{"file_name": "' + "x" * 5000 + '.png", "caption": "x"}', "file name must be a path inside"),
    ("[" * 100000 + "]" * 100000, "line 3: not JSON"),
])
def test_bad_metadata_is_one_clear_error(tmp_path, line, message):
    rows = shapes_folder(tmp_path / "f")
    tmp_path = tmp_path / "f"  # the user's folder; beside it, a picture it must not read
    Image.new("RGB", (8, 8)).save(tmp_path.parent / "outside.png")
    (tmp_path / "img/link.png").symlink_to(tmp_path.parent / "outside.png")
    good = [json.dumps({"file_name": f, "caption": c}) for f, c, _ in rows]
    (tmp_path / "metadata.jsonl").write_text("\n".join(good[:2] + [line] + good[2:]))
    with pytest.raises(UserError, match=message):
        read_folder(tmp_path)


def test_too_few_images_or_no_text(tmp_path):
    rows = shapes_folder(tmp_path, n=12)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f}) + "\n" for f, _, _ in rows))
    with pytest.raises(UserError, match="no caption and no question"):
        read_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c, _ in rows[:9]))
    with pytest.raises(UserError, match="at least 10"):
        read_folder(tmp_path)


def metadata_folder(folder, n=20):
    """A shapes-world folder with metadata.jsonl: a caption, one existence question, the objects."""
    rows = shapes_folder(folder, n)
    lines = [{"file_name": f, "caption": c, "objects": o,
              "qa": [{"q": "is there a star?", "a": "yes" if "star" in o else "no"}]} for f, c, o in rows]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return rows


def test_folder_pairs_cache_images_and_words_and_train_the_vlm(tmp_path):
    import numpy as np
    import torch
    import vlm
    from data.captioned import FolderPairs
    from tests.conftest import FOLDER_TINY, VLM_TINY, evaluate_again, run
    rows = metadata_folder(tmp_path / "f")
    cfg = vlm.Config(**{**VLM_TINY, "dataset": "folder", "data_path": str(tmp_path / "f")})
    data = FolderPairs(cfg, seed=0, verbose=False, cache_dir=tmp_path / "cache")
    assert data.n_images("train") == 18 and data.n_images("val") == 2
    assert data.images("train").shape == (18, 32, 32, 3) and data.images("train").dtype == np.uint8
    assert np.array_equal(data.images("train")[0], np.asarray(Image.open(tmp_path / "f" / rows[0][0])))
    assert data.tok.decode(data.tok.encode(" " + rows[0][1])) == " " + rows[0][1]  # its own words
    _, texts = data.examples("train", np.arange(6), np.random.default_rng(0))
    k = cfg.texts_per_image
    assert len(texts) == 6 * k and [p for p, _ in texts[0::k]] == ["describe the image."] * 6  # caption first
    again_asked = ["is there a star?", "describe the image.", "is there a star?"]  # one pair: asked again
    assert [p for p, _ in texts[1:k]] == again_asked[:k - 1]
    b = data.batch("train", 0, 4, "cpu")
    assert b["images"].shape[1:] == (3, 32, 32) and len(b["prompt"]) == 4 * cfg.texts_per_image
    texts = {data.tok.decode([t for t in row.tolist() if t != data.tok.pad_id]) for row in b["prompt"]}
    assert texts <= {" describe the image.", " is there a star?"}
    again = FolderPairs(cfg, seed=0, verbose=False, cache_dir=tmp_path / "cache")  # from the cache
    assert np.array_equal(again.images("val"), data.images("val"))
    out = tmp_path / "run"
    run("train.py", "vlm", *[f"--{k}={v}" for k, v in FOLDER_TINY.items()], "--dataset=folder",
        f"--data_path={tmp_path / 'f'}", "--batch_size=4", "--max_iters=2", "--eval_iters=1",
        f"--out_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    again = evaluate_again(out)  # the saved model's answers, recomputed here
    assert (metrics["val_caption_exact"], metrics["val_answer_exact"]) == pytest.approx(
        (again["val_caption_exact"], again["val_answer_exact"]))
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["model"]["dataset"] == "folder"
    p = run("sample.py", "vlm", f"--out_dir={out}", "--ckpt=ckpt.pt", "--split=val", "--n=2")
    assert p.stdout.count("val ") >= 2 and (out / "sample_vlm.png").stat().st_size > 0
    bad = run("sample.py", "vlm", f"--out_dir={out}", "--ckpt=ckpt.pt", "--split=ood", check=False)
    assert bad.returncode == 2 and "has the splits train, val" in bad.stderr


def test_hallucination_study_on_a_folder_pope_from_its_objects(tmp_path):
    import numpy as np
    from study import measures as M
    import vlm
    from data.captioned import FolderPairs
    from tests.conftest import FOLDER_TINY, VLM_TINY, run
    rows = metadata_folder(tmp_path / "f", n=30)
    cfg = vlm.Config(**{**VLM_TINY, "dataset": "folder", "data_path": str(tmp_path / "f")})
    data = FolderPairs(cfg, seed=0, verbose=False, cache_dir=tmp_path / "cache")
    assert data.vocab == sorted({o for _, _, objs in rows for o in objs})
    sets = data.objects("val")
    freq, cooc = M.object_stats(data.objects("train"), len(data.vocab))
    for split in M.POPE_SPLITS:
        qs = M.pope_questions(sets, split, 10, 0, freq, cooc)
        assert sum(lab == "yes" for *_, lab in qs) * 2 == len(qs) > 0
        assert all((obj in sets[i]) == (lab == "yes") for i, obj, lab in qs)  # absent ones truly absent
        for i, obj, lab in qs:
            absent = [o for o in range(len(data.vocab)) if o not in sets[i]]
            score = cooc[sorted(sets[i])].max(0)  # how much each object co-occurs with those present
            if lab == "no" and split == "adversarial":  # the most co-occurring absent object
                assert score[obj] == max(score[a] for a in absent)
    out = tmp_path / "run"
    run("train.py", "vlm", *[f"--{k}={v}" for k, v in FOLDER_TINY.items()], "--dataset=folder",
        f"--data_path={tmp_path / 'f'}", "--batch_size=4", "--max_iters=2", "--eval_iters=1",
        f"--out_dir={out}")
    user = [{"question_id": 70 + k, "image": rows[k][0] if k % 2 else rows[k][0].split("/")[-1],
             "text": f"is there a {rows[k][2][0]} in the image?", "label": "yes"} for k in (0, 1, 9, 19)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in user))
    p = run("hallucination.py", f"--data_path={tmp_path / 'f'}", f"--ckpt={out / 'ckpt.pt'}", "--seeds=1",
            "--n_scenes=3", "--n_captions=3", f"--out_dir={tmp_path / 'study'}",
            f"--pope_file={tmp_path / 'q.jsonl'}")
    results = json.loads((tmp_path / "study/results.json").read_text())["methods"]
    assert "greedy" in results and "unbiased data, greedy" not in results and "greedy" in p.stdout
    records = [json.loads(x) for x in (tmp_path / "study/pope.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["method"] == "greedy" and r["split"] == "adversarial"]
    by_rule = np.mean([M.pope_rule(r["raw"]) == r["label"] for r in mine])  # POPE's reading, recounted
    assert len(mine) == 6 and results["greedy"][0]["pope_adversarial_rule_accuracy"] == pytest.approx(by_rule)
    by_prob = np.mean([r["by_prob"] == r["label"] for r in mine])  # the P(yes) vs P(no) reading, recounted
    assert results["greedy"][0]["pope_adversarial_prob_accuracy"] == pytest.approx(by_prob)
    pope = tmp_path / "study/pope"
    questions = [json.loads(x) for x in (pope / "adversarial_questions.jsonl").read_text().splitlines()]
    answers = (pope / "adversarial_greedy_answers.jsonl").read_text().splitlines()
    assert len(questions) == len(answers) == 6
    assert set(questions[0]) == {"question_id", "image", "text", "label"}
    assert questions[0]["image"] in {f for f, _, _ in rows}
    assert questions[0]["text"] in {f"is there a {o}?" for o in data.vocab}  # asked as the folder asks
    said = [json.loads(x) for x in (pope / "file_greedy_answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in said) == [70, 71, 79, 89] and "file acc" in p.stdout
    said_yes = [M.parse_yes_no(a["text"]) == "yes" for a in said]  # every label is yes
    assert results["greedy"][0]["pope_file_accuracy"] == np.mean(said_yes)
    other = run("hallucination.py", f"--data_path={tmp_path / 'f'}", f"--ckpt={tmp_path / 'nope.pt'}",
                check=False)
    assert other.returncode == 2 and other.stdout == ""
    (tmp_path / "q.jsonl").write_text(json.dumps({**user[0], "image": "elsewhere/1.jpg"}) + "\n")
    for extra in ([f"--pope_file={tmp_path / 'q.jsonl'}"], [f"--pope_file={tmp_path / 'f/metadata.jsonl'}"]):
        bad = run("hallucination.py", f"--data_path={tmp_path / 'f'}", f"--ckpt={out / 'ckpt.pt'}",
                  f"--out_dir={tmp_path / 'bad'}", *extra, check=False)
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert "is not among the folder's images" in run("hallucination.py", f"--data_path={tmp_path / 'f'}",
                                                    f"--pope_file={tmp_path / 'q.jsonl'}", check=False).stderr


def test_the_yes_no_reading_needs_two_first_tokens(tmp_path):
    from data.bpe import Tokenizer
    from data.captioned import folder_tokenizer
    from hallucination import by_prob, yes_no_tokens
    metadata_folder(tmp_path / "f", n=30)
    yes, no = yes_no_tokens(folder_tokenizer(tmp_path / "f", cache_dir=tmp_path / "cache"))
    assert by_prob({yes: 1.0, no: 0.5}, (yes, no)) == "yes"
    assert by_prob({yes: 0.2, no: 0.5}, (yes, no)) == "no"
    old = Tokenizer.train("bpe", "a cat\nyes\nno\n" * 50)  # answers without their leading space
    assert old.encode(" yes")[0] == old.encode(" no")[0] and yes_no_tokens(old) is None
    assert by_prob({0: 1.0}, None) is None


def test_pope_asks_in_the_folders_own_words():
    from data.captioned import existence_phrasing
    qa = [("Is there a dog in the picture?", "yes"), ("is there a cat?", "no")]
    record = {"objects": ["dog"], "qa": qa}
    assert existence_phrasing([record]) == "is there a {} in the picture?"  # the cat is none of its objects
    assert existence_phrasing([{**record, "qa": [("what is it?", "a dog")]}]) == "is there a {} in the image?"


def test_the_shapes_world_exported_is_the_built_in_world(tmp_path):
    import numpy as np
    from data.export import ExportConfig, export
    from data.shapes import ShapesSplit
    export(tmp_path / "w", ExportConfig(n_train=12, n_val=3, img_size=32), verbose=False)
    records = read_folder(tmp_path / "w")
    assert [r["split"] for r in records].count("val") == 3 and len(records) == 15
    built_in = ShapesSplit(World(img_size=32, seed=1337), "train", 12, verbose=False)
    r = records[5]  # train/00005.png
    assert r["file_name"] == "train/00005.png" and r["captions"] == [caption(built_in.scene(5))]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "w" / r["file_name"])), built_in.images[5])
    assert r["objects"] == sorted({SHAPES[s] for s in built_in.scene(5)[:, 0].tolist()}, key=SHAPES.index)
    assert r["qa"][0][0] == "which shapes are there?" and len(r["qa"]) >= 3


def test_a_folder_that_cannot_be_read_is_one_line(tmp_path):
    from tests.conftest import FOLDER_TINY, run
    metadata_folder(tmp_path / "f")
    (tmp_path / "f/img/0003.png").write_bytes(b"not a png")
    args = ["train.py", "vlm", *[f"--{k}={v}" for k, v in FOLDER_TINY.items()], "--dataset=folder",
            "--max_iters=1", f"--out_dir={tmp_path / 'run'}"]
    for extra, words in (([f"--data_path={tmp_path / 'f'}"], "cannot read image"),
                         ([], "--dataset=folder needs --data_path")):
        p = run(*args, *extra, check=False)
        assert p.returncode == 2 and words in p.stderr and p.stdout == "" and len(p.stderr.splitlines()) == 1
        assert not (tmp_path / "run").exists()


def folder_state(folder):
    """Every file under folder, by content -> {relative path: bytes}."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_exporter_never_overwrites_and_leaves_no_half_folder(tmp_path, monkeypatch):
    import errno
    from data import export as exporter
    from tests.conftest import run
    held = tmp_path / "held"
    metadata_folder(held, n=12)
    before = folder_state(held)
    p = run("-m", "data.export", str(held), "--n_train=12", "--n_val=3", "--img_size=32", check=False)
    assert p.returncode == 2 and "already holds files" in p.stderr and p.stdout == ""
    assert folder_state(held) == before  # 12 records stay 12, no image replaced
    saved = []

    def disk_full_after_five(image, path, *args, **kwargs):
        saved.append(path)
        if len(saved) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, path, *args, **kwargs)
    real_save = exporter.Image.Image.save
    monkeypatch.setattr(exporter.Image.Image, "save", disk_full_after_five)
    with pytest.raises(UserError, match="No space left on device; nothing was written there"):
        exporter.export(tmp_path / "new", exporter.ExportConfig(n_train=12, n_val=3, img_size=32), False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held"]  # no folder, no half of one
    (tmp_path / "empty").mkdir()  # an empty folder may be exported into
    exporter.export(tmp_path / "empty", exporter.ExportConfig(n_train=12, n_val=3, img_size=32), False)
    assert len(read_folder(tmp_path / "empty")) == 15


def test_an_export_killed_midway_leaves_no_folder(tmp_path):
    import signal
    import subprocess
    import sys
    from tests.conftest import ROOT
    out = tmp_path / "world"
    p = subprocess.Popen([sys.executable, "-m", "data.export", str(out), "--n_train=20000", "--n_val=10"],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("exported train: 5000/"):
            p.send_signal(signal.SIGKILL)  # no handler runs: the rename at the end never comes
            break
    p.wait(timeout=60)
    assert not out.exists()


@pytest.mark.parametrize("args, words", [(["--n_train=-5"], "n_train=-5 must be at least 1"),
                                         (["--n_val=0"], "n_val=0 must be at least 1"),
                                         (["--cooccur=2"], "cooccur=2.0 must be in [0, 1]"),
                                         (["--img_size=0"], "img_size=0 must be at least 16"),
                                         (["--seed=-1"], "seed=-1 must be at least 0"),
                                         (["--n_train=4", "--n_val=5"], "a folder needs at least 10")])
def test_exporter_settings_are_checked_first(tmp_path, args, words):
    from tests.conftest import run
    p = run("-m", "data.export", str(tmp_path / "w"), *args, check=False)
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stdout == "" and not (tmp_path / "w").exists()


def test_valid_odd_metadata_is_read_as_its_spec_says(tmp_path):
    rows = shapes_folder(tmp_path)
    first = {"file_name": rows[0][0], "caption": "a red circle\u2028beside a square"}  # U+2028 in a string
    lines = [json.dumps(first, ensure_ascii=False)]
    lines += [json.dumps({"file_name": f, "caption": c}) for f, c, _ in rows[1:]]
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # with a BOM
    records = read_folder(tmp_path)
    assert len(records) == 20 and records[0]["captions"] == ["a red circle\u2028beside a square"]
    (tmp_path / "metadata.jsonl").write_bytes("\n".join(lines).encode("utf-16"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_folder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.jsonl").mkdir()
    with pytest.raises(UserError, match="metadata.jsonl is not a file"):
        read_folder(tmp_path)


def test_llava_and_coco_optional_parts_are_optional(tmp_path):
    rows = shapes_folder(tmp_path / "llava")
    items = [{"image": f, "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                            {"from": "gpt", "value": c}]} for f, c, _ in rows]
    (tmp_path / "llava/data.json").write_text(json.dumps(items))
    (tmp_path / "llava/synonyms.json").write_text(json.dumps({"ball": "circle"}))  # sorts first: not the data
    assert len(read_folder(tmp_path / "llava")) == 20
    for bad, words in (({"image": rows[0][0], "conversations": "hi"}, "item 0 is not"),
                       ({"image": [rows[0][0]], "conversations": []}, "item 0 is not"),
                       ({"image": rows[0][0], "conversations": [{"from": "human"},
                                                                {"from": "gpt", "value": "x"}]},
                        "a human turn's value must be a non-empty string")):
        (tmp_path / "llava/data.json").write_text(json.dumps([bad] + items[1:]))
        with pytest.raises(UserError, match=words):
            read_folder(tmp_path / "llava")
    rows = shapes_folder(tmp_path / "coco")
    images = [{"id": i, "file_name": f} for i, (f, _, _) in enumerate(rows)]
    notes = [{"image_id": i, "caption": c} for i, (_, c, _) in enumerate(rows)]
    notes.append({"image_id": 0, "caption": None})  # a null caption: no caption
    (tmp_path / "coco/captions_x.json").write_text(json.dumps({"images": images, "annotations": notes}))
    cats = [{"id": 1, "name": "circle"}]
    (tmp_path / "coco/instances_x.json").write_text(json.dumps({"categories": cats, "annotations": [
        {"image_id": 3, "category_id": 1}]}))  # only image 3 has an instance: the others have no objects
    coco = read_folder(tmp_path / "coco")
    assert [r["objects"] for r in coco][:4] == [[], [], [], ["circle"]]
    assert coco[0]["captions"] == [rows[0][1]]
    (tmp_path / "coco/instances_x.json").write_text(json.dumps({"categories": cats, "annotations": [
        {"image_id": 3, "category_id": 9}]}))
    with pytest.raises(UserError, match="category_id 9 is not among its categories"):
        read_folder(tmp_path / "coco")
    (tmp_path / "coco/captions_x.json").write_text(json.dumps({"images": [{"file_name": "a.png"}],
                                                               "annotations": []}))
    with pytest.raises(UserError, match="\"images\" must be a list of objects with id, file_name"):
        read_folder(tmp_path / "coco")


def test_a_folder_model_keeps_its_words_after_the_folder_changes(tmp_path):
    """The checkpoint carries its tokenizer and its data's fingerprint: after one caption's word is
    edited, sample.py and a resume read with the saved tokenizer and say, in one line, that the folder
    changed."""
    import torch
    from data.bpe import Tokenizer
    from data.captioned import folder_tokenizer
    from tests.conftest import FOLDER_TINY, run
    metadata_folder(tmp_path / "f")
    out = tmp_path / "run"
    common = [*[f"--{k}={v}" for k, v in FOLDER_TINY.items()], "--dataset=folder",
              f"--data_path={tmp_path / 'f'}", "--batch_size=4", "--eval_iters=1"]
    run("train.py", "vlm", *common, "--max_iters=2", f"--out_dir={out}")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    trained = folder_tokenizer(tmp_path / "f", cache_dir=tmp_path / "cache")
    assert ckpt["tokenizer"] == trained.state() and len(ckpt["data_fingerprint"]) == 16
    meta = tmp_path / "f/metadata.jsonl"
    lines = meta.read_text().splitlines()
    first = json.loads(lines[0])
    first["caption"] = "zebra " * 30 + first["caption"]  # new words: the folder's BPE would change
    meta.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    now = folder_tokenizer(tmp_path / "f", cache_dir=tmp_path / "cache")
    assert now.state() != trained.state()  # retrained from the folder, the ids would differ
    p = run("sample.py", "vlm", f"--out_dir={out}", "--ckpt=ckpt.pt", "--split=val", "--n=2")
    assert p.stderr.count("changed since the model was trained on it") == 1 and p.stdout.count("val ") >= 2
    p = run("train.py", "vlm", "--init_from=resume", "--max_iters=3", f"--out_dir={out}")
    assert "changed since the model was trained on it" in p.stderr
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["iter"] == 3 and resumed["tokenizer"] == ckpt["tokenizer"]  # the words it started with
    saved = Tokenizer.from_state(resumed["tokenizer"])
    assert saved.encode(" a red circle") == trained.encode(" a red circle")


def test_init_vision_auto_on_a_folder_pretrains_the_mae_on_its_images(tmp_path):
    import torch
    from tests.conftest import FOLDER_TINY, run
    metadata_folder(tmp_path / "f")
    tiny = {**FOLDER_TINY, "init_vision": "auto"}
    p = run("train.py", "vlm", *[f"--{k}={v}" for k, v in tiny.items()], "--dataset=folder",
            f"--data_path={tmp_path / 'f'}", "--batch_size=4", "--max_iters=1", "--eval_iters=1",
            "--mae_max_iters=2", f"--out_dir={tmp_path / 'vlm'}")
    first = [line for line in p.stdout.splitlines() if line.startswith("first, ")]
    assert len(first) == 1 and f"--dataset=folder --data_path={(tmp_path / 'f').resolve()}" in first[0]
    mae_dir = next(tmp_path.glob("out-mae-folder-*"))
    mae_ckpt = torch.load(mae_dir / "ckpt.pt", weights_only=True)
    assert mae_ckpt["config"]["model"]["dataset"] == "folder" and mae_ckpt["iter"] == 2
    vlm_ckpt = torch.load(tmp_path / "vlm/ckpt.pt", weights_only=True)
    assert vlm_ckpt["config"]["model"]["init_vision"] == str(mae_dir / "ckpt.pt")
    assert not (tmp_path / "out-mae").exists()  # the shapes world's MAE is not the folder's


def photo_dirs(tmp_path, colours=((200, 30, 30), (30, 200, 30), (30, 30, 200))):
    """Flat-coloured 'photos' named by object (red_box.png ...), and one grey background."""
    objects, backgrounds = tmp_path / "objects", tmp_path / "backgrounds"
    objects.mkdir()
    backgrounds.mkdir()
    for name, colour in zip(("red_box", "green_box", "blue_box"), colours):
        Image.new("RGB", (40, 30), colour).save(objects / f"{name}.png")
    Image.new("RGB", (50, 80), (128, 128, 128)).save(backgrounds / "grey.png")
    return objects, backgrounds


def test_composed_photos_say_what_is_where(tmp_path):
    import numpy as np
    from data.compose import ComposeConfig, read_photos, write_scenes
    from data.export import written_folder
    from data.shapes import position_name
    from functools import partial
    objects, backgrounds = photo_dirs(tmp_path)
    cc = ComposeConfig(n_train=16, n_val=4, img_size=48, max_objects=2)
    photos = dict(objects=read_photos(objects, "objects", 2), backgrounds=read_photos(backgrounds, "b", 1))
    written_folder(tmp_path / "out", partial(write_scenes, cc=cc, verbose=False, **photos))
    records = read_folder(tmp_path / "out")
    assert len(records) == 20 and [r["split"] for r in records].count("val") == 4
    colours = {"red box": (200, 30, 30), "green box": (30, 200, 30), "blue box": (30, 30, 200)}
    for r in records:
        image = np.asarray(Image.open(tmp_path / "out" / r["file_name"]))
        assert 1 <= len(r["objects"]) <= 2 and r["objects"] == sorted(r["objects"])
        for cell in range(9):  # each cell's centre pixel: an object's colour exactly where the caption says
            row, col = divmod(cell, 3)
            pixel = tuple(image[row * 16 + 8, col * 16 + 8].tolist())
            phrases = re.split(", | and ", r["captions"][0])  # "a small red box at the top left", ...
            where = position_name(cell)
            named = [n for n in colours if any(p.endswith(f"{n} at the {where}") for p in phrases)]
            assert pixel == (colours[named[0]] if named else (128, 128, 128)), (r, cell)
        for q, answer in r["qa"]:
            if q.startswith("is there"):
                asked = q.removeprefix("is there a ").removesuffix("?")
                assert answer == ("yes" if asked in r["objects"] else "no")
    again = tmp_path / "again"
    written_folder(again, partial(write_scenes, cc=cc, verbose=False, **photos))
    assert (again / "metadata.jsonl").read_text() == (tmp_path / "out/metadata.jsonl").read_text()  # seeded


def test_composing_from_bad_photos_is_one_line_and_writes_nothing(tmp_path):
    from tests.conftest import run
    objects, backgrounds = photo_dirs(tmp_path)
    (objects / "broken.png").write_bytes(b"not a png")
    cases = [([str(objects), str(backgrounds)], "broken.png is not an image"),
             ([str(backgrounds), str(backgrounds)], "holds 1 png/jpg photos; give at least 2"),
             ([str(tmp_path / "nowhere"), str(backgrounds)], "is not a folder")]
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("cat.png", "cat.jpg", "dog.png"):
        Image.new("RGB", (8, 8)).save(twice / name)
    cases.append(([str(twice), str(backgrounds)], "an object named twice"))
    for args, said in cases:
        p = run("-m", "data.compose", *args, str(tmp_path / "out"), "--n_train=12", check=False)
        assert p.returncode == 2 and p.stdout == "" and said in p.stderr and len(p.stderr.splitlines()) == 1
        assert not (tmp_path / "out").exists()
