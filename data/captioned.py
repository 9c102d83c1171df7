"""A folder of the user's images with their words, read into one list of records.

Three layouts are accepted, found by file name in the folder (the Hugging Face ImageFolder
convention first):
    metadata.jsonl       one JSON object a line: {"file_name": "sub/0001.jpg", "caption": "...",
                         "qa": [{"q": "...", "a": "..."}], "objects": ["dog", "frisbee"], "split": "val"},
                         every field but file_name optional (a line needs a caption or a qa pair)
    *.json (LLaVA)       a list of {"image": ..., "conversations": [{"from": "human", "value":
                         "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}: the turn pairs as qa
    captions_*.json      COCO: images [{id, file_name}], annotations [{image_id, caption}], and the
                         categories of instances_*.json beside it as the objects, where present
Each record: {"file_name", "captions": [...], "qa": [(q, a)], "objects": [...] or None, "split"}.
Held out: every 10th image (in file-name order) unless a `split` field says otherwise.
"""
import hashlib
import json
import os
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

from data import checked_cache, write_manifest
from data.pairs import CAPTION_PROMPT, Pairs
from data.shapes import CACHE_DIR
from lib.common import UserError

MIN_IMAGES = 10


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def from_metadata(path):
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{path}, line {n}: needs a \"file_name\" string")
        qa = row.get("qa") or []
        if not isinstance(qa, list) or not all(isinstance(p, dict) and {"q", "a"} <= set(p) for p in qa):
            raise UserError(f"{path}, line {n}: \"qa\" must be a list of {{\"q\": ..., \"a\": ...}}")
        caption = row.get("caption")
        records.append({"file_name": row["file_name"], "captions": [caption] if caption else [],
                        "qa": [(str(p["q"]), str(p["a"])) for p in qa], "objects": row.get("objects"),
                        "split": row.get("split"), "where": f"{path}, line {n}"})
    return records


def from_llava(path):
    items = read_json(path)
    if not isinstance(items, list):
        raise UserError(f"{path}: a LLaVA file is a JSON list of {{\"image\", \"conversations\"}} items")
    records = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "conversations" not in item:
            raise UserError(f"{path}: item {n} is not {{\"image\": ..., \"conversations\": [...]}}")
        qa = []
        turns = item["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):  # the first human/gpt pair is enough
            if human.get("from") == "human" and gpt.get("from") == "gpt":
                qa.append((human["value"].replace("<image>", "").strip(), gpt["value"].strip()))
        records.append({"file_name": item["image"], "captions": [], "qa": qa[:1], "objects": None,
                        "split": None, "where": f"{path}, item {n}"})
    return records


def from_coco(path):
    coco = read_json(path)
    names = {im["id"]: im["file_name"] for im in coco.get("images", [])}
    captions = {}
    for a in coco.get("annotations", []):
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    objects = {}
    instances = Path(path).with_name(Path(path).name.replace("captions_", "instances_"))
    if instances.exists():
        inst = read_json(instances)
        category = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for a in inst.get("annotations", []):
            objects.setdefault(a["image_id"], set()).add(category[a["category_id"]])
    return [{"file_name": names[i], "captions": captions.get(i, []), "qa": [],
             "objects": sorted(objects[i]) if instances.exists() else None, "split": None,
             "where": f"{path}, image {i}"} for i in sorted(names, key=names.get)]


def read_folder(folder):
    """The folder's records, checked: files exist, objects are lists of strings, text is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data_path={folder}: no such folder")
    coco = sorted(folder.glob("captions_*.json"))
    llava = sorted(p for p in folder.glob("*.json") if not p.name.startswith(("captions_", "instances_")))
    if (folder / "metadata.jsonl").exists():
        records = from_metadata(folder / "metadata.jsonl")
    elif coco:
        records = from_coco(coco[0])
    elif llava:
        records = from_llava(llava[0])
    else:
        raise UserError(f"{folder} has no metadata.jsonl, LLaVA *.json or COCO captions_*.json")
    for r in records:
        if not (folder / r["file_name"]).is_file():
            raise UserError(f"{r['where']}: {r['file_name']} does not exist in {folder}")
        objs = r["objects"]
        if objs is not None and not (isinstance(objs, list) and all(isinstance(o, str) for o in objs)):
            raise UserError(f"{r['where']}: \"objects\" must be a list of strings")
    usable = [r for r in records if r["captions"] or r["qa"]]
    if not usable:
        raise UserError(f"{folder}: no caption and no question-answer pair to train on")
    if len(usable) < MIN_IMAGES:
        raise UserError(f"{folder}: {len(usable)} images with text; at least {MIN_IMAGES} are needed")
    usable.sort(key=lambda r: r["file_name"])
    for k, r in enumerate(usable):
        r["split"] = r["split"] or ("val" if k % 10 == 9 else "train")
        if r["split"] not in ("train", "val"):
            raise UserError(f"{r['where']}: split {r['split']!r} must be train or val")
        del r["where"]
    return usable


def read_pope_file(path, records):
    """A POPE question file (RUCAIBox/POPE: {question_id, image, text, label} a line) whose images are in
    the folder (by path, or by file name alone) -> [(split, image index, text, label, question_id)]."""
    found = []  # (file name, (split, index in that split)) of every image
    for s in ("train", "val"):
        names = [r["file_name"] for r in records if r["split"] == s]
        found += [(name, (s, i)) for i, name in enumerate(names)]
    where = {Path(name).name: place for name, place in reversed(found)}  # a bare name: its first image
    where.update(found)  # a path inside the folder is exact
    if not Path(path).is_file():
        raise UserError(f"--pope_file={path}: no such file")
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            q = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON line") from None
        if q is None:
            continue
        if not isinstance(q, dict) or not {"question_id", "image", "text", "label"} <= q.keys():
            raise UserError(f"{path}:{n}: a POPE question needs question_id, image, text and label")
        if q["label"] not in ("yes", "no"):
            raise UserError(f"{path}:{n}: label {q['label']!r} must be yes or no")
        if str(q["image"]) not in where:
            raise UserError(f"{path}:{n}: image {q['image']} is not among the folder's images with text")
        out.append((*where[str(q["image"])], str(q["text"]), q["label"], q["question_id"]))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


# ---------------------------------------------------------------------------------------------
# The folder as the VLM's pairs: the same face as the shapes world's

def folder_key(folder, records, img_size):
    """What identifies the decoded images: each file's name, size and modification time, the size."""
    stats = []
    for r in records:
        st = os.stat(Path(folder) / r["file_name"])
        stats.append((r["file_name"], r["split"], st.st_size, st.st_mtime_ns))
    return hashlib.sha1(json.dumps([stats, img_size]).encode()).hexdigest()[:12]


def build_images(out, folder, records, img_size):
    from data.images import load_image
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for split in ("train", "val"):
        images = [load_image(Path(folder) / r["file_name"], img_size) for r in records if r["split"] == split]
        tmp = out / f"{split}.{os.getpid()}.tmp.npy"
        np.save(tmp, np.stack(images) if images else np.zeros((0, img_size, img_size, 3), np.uint8))
        os.replace(tmp, out / f"{split}.npy")
        files.append(out / f"{split}.npy")
    write_manifest(out / "manifest.json", files)


def build_tokenizer(out, text, vocab_size):
    from data.bpe import Tokenizer
    out.mkdir(parents=True, exist_ok=True)
    Tokenizer.train("bpe", text, vocab_size).save(out / "tokenizer.json")
    write_manifest(out / "manifest.json", [out / "tokenizer.json"])


def read_synonyms(path, vocab):
    """synonyms.json, if the folder has one: {word: object}, each object one of the folder's."""
    if not path.exists():
        return {}
    words = read_json(path)
    if not isinstance(words, dict) or not all(isinstance(k, str) and v in vocab for k, v in words.items()):
        raise UserError(f"{path}: a {{\"word\": \"object\"}} map whose objects are the folder's own")
    return words


def folder_tokenizer(folder, records=None, verbose=False, cache_dir=CACHE_DIR):
    """A BPE trained on the folder's own captions and answers, cached by their content."""
    from data.bpe import Tokenizer
    records = records or read_folder(folder)
    texts = []
    for r in records:  # its captions, then each question and answer
        texts += r["captions"]
        for qa in r["qa"]:
            texts += list(qa)
    text = "\n".join(texts)
    out = Path(cache_dir) / f"folder_bpe_{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    build = partial(build_tokenizer, out, text, 512)
    checked_cache(out / "manifest.json", build, f"the tokenizer of {folder}", verbose)
    return Tokenizer.load(out / "tokenizer.json")


def existence_phrasing(records):
    """POPE's question in the folder's own words: the commonest "is there a {object}..." of its
    questions about its objects, or POPE's "is there a {} in the image?" where it asks none."""
    seen = Counter()
    for r in records:
        for q, _ in r["qa"]:
            for o in r["objects"] or ():
                if q.lower().startswith(f"is there a {o}"):
                    rest = q.lower()[len(f"is there a {o}"):]
                    seen["is there a {}" + rest.replace("{", "{{").replace("}", "}}")] += 1
    return seen.most_common(1)[0][0] if seen else "is there a {} in the image?"


class FolderPairs(Pairs):
    """A user's folder (read_folder's records) as the VLM's image-text pairs: the images decoded,
    resized and centre-cropped once into a checked cache, a BPE trained on the folder's own captions
    and answers (cached by their content); captions are asked with the shapes world's prompt."""
    splits = ("train", "val")

    def __init__(self, cfg, seed=0, verbose=True, cache_dir=CACHE_DIR):
        if not cfg.data_path:
            raise UserError("--dataset=folder needs --data_path=DIR, a folder of images with metadata.jsonl, "
                            "a LLaVA *.json or COCO captions_*.json")
        self.cfg, self.seed = cfg, seed
        records = read_folder(cfg.data_path)
        self.records = {"train": [r for r in records if r["split"] == "train"],
                        "val": [r for r in records if r["split"] == "val"]}
        empty = [s for s in ("train", "val") if not self.records[s]]
        if empty:
            raise UserError(f"{cfg.data_path}: the split fields leave no {empty[0]} images")
        out = Path(cache_dir) / f"folder_{folder_key(cfg.data_path, records, cfg.img_size)}"
        checked_cache(out / "manifest.json", partial(build_images, out, cfg.data_path, records, cfg.img_size),
                      f"images of {cfg.data_path}", verbose)
        self._images = {s: np.load(out / f"{s}.npy", mmap_mode="r") for s in ("train", "val")}
        self.tok = folder_tokenizer(cfg.data_path, records, verbose, cache_dir)
        names = set()
        for r in records:
            names.update(r["objects"] or ())
        self.vocab = sorted(names)
        self.synonyms = read_synonyms(Path(cfg.data_path) / "synonyms.json", self.vocab)
        self.asks = existence_phrasing(records)

    def images(self, split):
        return self._images[split]

    def objects(self, split):
        """Each image's objects as a set of vocabulary indices, None where the folder names none."""
        out = []
        for r in self.records[split]:
            out.append(None if r["objects"] is None else {self.vocab.index(o) for o in r["objects"]})
        return out

    def exist_question(self, obj):
        return self.asks.format(self.vocab[obj])

    def reference(self, split, i):
        """Image i's first caption, or else its first answer."""
        r = self.records[split][i]
        return r["captions"][0] if r["captions"] else r["qa"][0][1]

    def texts(self, record):
        return [(CAPTION_PROMPT, c) for c in record["captions"]] + list(record["qa"])

    def examples(self, split, idx, rng):
        """-> (rows, [(prompt, answer)]): as in the shapes world, each image's caption (one of them,
        drawn), then texts_per_image - 1 of its question-answer pairs, drawn without repeats while they
        last; an image with captions only (or pairs only) gives what it has, asked again if need be."""
        rows, pairs, k = [], [], self.cfg.texts_per_image
        for i in idx:
            r = self.records[split][i]
            caption = r["captions"][rng.integers(len(r["captions"]))] if r["captions"] else None
            texts = [(CAPTION_PROMPT, caption)] if caption is not None else []
            texts += [r["qa"][j] for j in rng.permutation(len(r["qa"]))[:k - len(texts)]]
            while len(texts) < k:
                texts += texts[:k - len(texts)]
            pairs += texts
            rows += [i] * k
        return np.array(rows), pairs
