import io
import pickle
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from data import stream_indices
from data.images import load_folder, load_image, prepare_cifar10
from data.shapes import (COLOUR_NAMES, NUMBERS, SHAPES, SIZES, ShapesSplit, World, caption, position_name,
                         questions, render, render_scene, sample_scene)
from lib.common import UserError


def test_scene_is_a_pure_function_of_seed_split_index(tmp_path):
    w = World()
    a = [render(w, sample_scene(w, "train", i)) for i in (5, 3, 9)]
    b = [render(w, sample_scene(w, "train", i)) for i in (9, 3, 5)][::-1]  # another order
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(render(w, sample_scene(w, "val", 5)), a[0])
    assert not np.array_equal(sample_scene(World(seed=1), "train", 3), sample_scene(w, "train", 3)) or \
        not np.array_equal(sample_scene(World(seed=1), "train", 5), sample_scene(w, "train", 5))
    split = ShapesSplit(w, "train", 12, cache_dir=tmp_path, verbose=False)
    assert split.images.shape == (12, 64, 64, 3) and split.images.dtype == np.uint8
    assert np.array_equal(split.images[5], a[0])
    again = ShapesSplit(w, "train", 12, cache_dir=tmp_path, verbose=False)  # from the cache
    assert np.array_equal(again.images, split.images) and len(list(tmp_path.iterdir())) == 3  # + manifest


def test_noise_knob_changes_pixels_only_deterministically(tmp_path):
    clean, noisy = World(), World(noise=0.03)
    for i in range(5):
        assert np.array_equal(sample_scene(clean, "ood", i), sample_scene(noisy, "ood", i))  # same scene
    objs = sample_scene(noisy, "train", 3)
    a, b = render_scene(noisy, "train", 3, objs), render_scene(noisy, "train", 3, objs)
    assert np.array_equal(a, b)  # the grain is the scene's own
    assert not np.array_equal(a, render_scene(noisy, "train", 4, objs))
    diff = a.astype(float) - render(clean, objs)
    background = (render(clean, objs) == (24, 24, 32)).all(-1)  # 3 std above black: hardly clipped
    assert abs(diff[background].std() / 255 - 0.03) < 0.003 and abs(diff[background].mean()) < 1
    assert np.array_equal(render_scene(clean, "train", 3, objs), render(clean, objs))
    split = ShapesSplit(noisy, "train", 4, cache_dir=tmp_path, verbose=False)
    assert np.array_equal(split.images[3], a) and np.array_equal(split.scene(3), objs)


def test_render_draws_each_object_in_its_cell_and_colour():
    w = World()
    for i in range(30):
        objs = sample_scene(w, "train", i)
        img = render(w, objs).astype(int)
        for shape, colour, size, cell in objs.tolist():
            row, col = divmod(cell, 3)
            cy, cx = int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)
            centre = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)
            from data.shapes import COLOURS
            target = np.array(COLOURS[COLOUR_NAMES[colour]])
            assert np.abs(centre - target).sum(1).min() < 40, (i, SHAPES[shape])


def test_caption_and_answers_match_metadata():
    w = World()
    for i in range(300):
        objs = sample_scene(w, "train", i)
        cap = caption(objs)
        found = re.findall(r"a (small|large) (\w+) (\w+)", cap)
        assert [(SIZES.index(s), COLOUR_NAMES.index(c), SHAPES.index(t)) for s, c, t in found] == \
            [(o[2], o[1], o[0]) for o in objs.tolist()]
        assert list(objs[:, 3]) == sorted(objs[:, 3])  # reading order
        shapes = objs[:, 0].tolist()
        for kind, q, a in questions(w, "train", i, objs):
            if kind == "exist":
                s = SHAPES.index(re.match(r"is there a (\w+)\?", q).group(1))
                assert a == ("yes" if s in shapes else "no")
            elif kind == "colour":
                s = SHAPES.index(re.match(r"what colour is the (\w+)\?", q).group(1))
                assert a == COLOUR_NAMES[objs[shapes.index(s), 1]]
            elif kind == "shape":
                c = COLOUR_NAMES.index(re.match(r"what shape is the (\w+) object\?", q).group(1))
                assert a == SHAPES[objs[objs[:, 1].tolist().index(c), 0]]
            elif kind == "position":
                s = SHAPES.index(re.match(r"where is the (\w+)\?", q).group(1))
                assert a == position_name(objs[shapes.index(s), 3])
            elif kind == "count":
                m = re.match(r"how many (\w+)s are there\?", q).group(1)
                expect = len(objs) if m == "object" else shapes.count(SHAPES.index(m))
                assert a == NUMBERS[expect]


def test_existence_questions_are_balanced():
    w = World()
    answers = [questions(w, "train", i, sample_scene(w, "train", i))[0][2] for i in range(2000)]
    assert abs(answers.count("yes") / 2000 - 0.5) < 0.04


def test_bias_in_train_and_broken_in_ood():
    w = World(cooccur=0.9)

    def square_given_circle(split):
        hits = total = 0
        for i in range(3000):
            shapes = sample_scene(w, split, i)[:, 0].tolist()
            if 0 in shapes and len(shapes) >= 2:
                total += 1
                hits += 1 in shapes
        return hits / total

    assert square_given_circle("train") > 0.8
    assert square_given_circle("ood") < 0.55
    skew = np.bincount([s for i in range(2000) for s in sample_scene(World(), "train", i)[:, 0]], minlength=6)
    flat = np.bincount([s for i in range(2000) for s in sample_scene(World(), "ood", i)[:, 0]], minlength=6)
    assert skew[0] > 1.5 * skew[5] and flat.max() < 1.25 * flat.min()


def test_presence_multi_hot(tmp_path):
    split = ShapesSplit(World(img_size=32), "val", 20, cache_dir=tmp_path, verbose=False)
    pres = split.presence(0, len(SHAPES))
    for i in range(20):
        assert set(np.nonzero(pres[i])[0]) == set(split.scene(i)[:, 0].tolist())


def test_stream_indices_cover_each_epoch_and_are_deterministic():
    a = stream_indices(10, 0, 0, 25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert np.array_equal(a[7:19], stream_indices(10, 0, 7, 12))
    assert not np.array_equal(a[:10], stream_indices(10, 1, 0, 10))


def test_image_folder_resizes_and_names_a_corrupt_file(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(tmp_path / "b.jpg")
    images, paths = load_folder(tmp_path, 32)
    assert images.shape == (2, 32, 32, 3) and images[0, 5, 5, 0] > 200 and images[1, 5, 5, 2] > 200
    (tmp_path / "c.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="c.png"):
        load_folder(tmp_path, 32)
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png", 32)


def test_cifar10_prepare_reads_the_python_tarball(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "cifar-10-python.tar.gz"
    batches = {}
    with tarfile.open(src, "w:gz") as tar:
        for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            d = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))}
            batches[name] = d
            raw = pickle.dumps(d)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    out = prepare_cifar10(src.as_uri(), cache_dir=tmp_path / "cache")
    train = np.load(out / "train_images.npy")
    assert train.shape == (20, 32, 32, 3)
    # channel-first rows of 1024 become (H, W, C): red plane first
    assert train[0, 0, 1, 0] == batches["data_batch_1"][b"data"][0, 1]
    assert train[0, 0, 1, 2] == batches["data_batch_1"][b"data"][0, 2048 + 1]
    assert np.load(out / "test_labels.npy").tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError, match="CIFAR-10"):
        prepare_cifar10(tmp_path / "nowhere.tar.gz", cache_dir=tmp_path / "other")


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_damaged_shapes_cache_is_detected_and_rebuilt(tmp_path, capsys, damage):
    w = World(img_size=32)
    first = np.array(ShapesSplit(w, "val", 40, cache_dir=tmp_path, verbose=False).images)
    img = next(tmp_path.glob("*.img.npy"))
    raw = img.read_bytes()
    if damage == "truncate":
        img.write_bytes(raw[:len(raw) // 2])
    else:  # the same size, pixels zeroed: only the checksum can tell
        img.write_bytes(raw[:200] + bytes(len(raw) - 200))
    again = ShapesSplit(w, "val", 40, cache_dir=tmp_path, verbose=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "rebuilding" in out[0] and img.name in out[0]
    assert np.array_equal(np.array(again.images), first)
    ShapesSplit(w, "val", 40, cache_dir=tmp_path, verbose=True)  # sound now: nothing said
    assert capsys.readouterr().out == ""


def test_text_cache_follows_the_corpus_content_and_refuses_binary(tmp_path):
    from data import text
    corpus = tmp_path / "my.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    a = text.prepare(str(corpus), "char", cache_dir=tmp_path / "c", verbose=False)
    corpus.write_text("a dog ran in the fog! " * 200)  # edited: same path, new words
    b = text.prepare(str(corpus), "char", cache_dir=tmp_path / "c", verbose=False)
    assert a != b
    tok, splits = text.load(b)
    assert "dog" in tok.decode(splits["train"][:40].tolist())
    (b / "train.bin").write_bytes((b / "train.bin").read_bytes()[:-10])  # truncated
    assert text.prepare(str(corpus), "char", cache_dir=tmp_path / "c", verbose=False) == b
    assert len(text.load(b)[1]["train"]) == len(splits["train"])
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(UserError, match="not UTF-8"):
        text.prepare(str(tmp_path / "bin.txt"), "char", cache_dir=tmp_path / "c")


def crafted_tarball(path, payload_marker):
    """A CIFAR-shaped tarball whose test_batch, when unpickled naively, runs a shell command."""
    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {payload_marker}",)
    with tarfile.open(path, "w:gz") as tar:
        raw = pickle.dumps({b"data": Exploit(), b"labels": [0]})
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))


def test_crafted_cifar_tarball_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    crafted_tarball(tmp_path / "evil.tar.gz", marker)
    with pytest.raises(UserError, match="refusing to load posix.system|refusing to load os.system"):
        prepare_cifar10(tmp_path / "evil.tar.gz", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache" / "cifar10" / "manifest.json").exists()
    (tmp_path / "not.tar.gz").write_bytes(b"plain text, not a tarball")
    with pytest.raises(UserError, match="not a readable cifar-10-python.tar.gz"):
        prepare_cifar10(tmp_path / "not.tar.gz", cache_dir=tmp_path / "cache")
