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


def read_text(path):
    """A text file as UTF-8 (a byte-order mark allowed), or a one-line error."""
    if not Path(path).is_file():
        raise UserError(f"{path} is not a file")
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_json(path):
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON: {e.__class__.__name__}") from None


def json_lines(path):
    """-> [(line number, object)]: JSON Lines, split at newlines only (a string may hold U+2028)."""
    out = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as e:
                why = getattr(e, "msg", "nested too deeply")
                raise UserError(f"{path}, line {n}: not JSON ({why})") from None
    return out


def text_of(value, where, what):
    """A caption, question or answer: a non-empty string, or a one-line error naming where."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {what} must be a non-empty string, not {json.dumps(value)[:40]}")
    return value.strip()


def from_metadata(path):
    records = []
    for n, row in json_lines(path):
        where = f"{path}, line {n}"
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{where}: needs a \"file_name\" string")
        qa = row.get("qa") or []
        if not isinstance(qa, list) or not all(isinstance(p, dict) and {"q", "a"} <= set(p) for p in qa):
            raise UserError(f"{where}: \"qa\" must be a list of {{\"q\": ..., \"a\": ...}}")
        caption = row.get("caption")
        captions = [] if caption in (None, "") else [text_of(caption, where, "the caption")]
        pairs = [(text_of(p["q"], where, "a question"), text_of(p["a"], where, "an answer")) for p in qa]
        records.append({"file_name": row["file_name"], "captions": captions, "qa": pairs,
                        "objects": row.get("objects"), "split": row.get("split"), "where": where})
    return records


def from_llava(path):
    items = read_json(path)
    if not isinstance(items, list):
        raise UserError(f"{path}: a LLaVA file is a JSON list of {{\"image\", \"conversations\"}} items")
    records = []
    for n, item in enumerate(items):
        where = f"{path}, item {n}"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
                not isinstance(item.get("conversations"), list):
            raise UserError(f"{where} is not {{\"image\": \"a file name\", \"conversations\": [...]}}")
        qa = []
        turns = item["conversations"]
        if not all(isinstance(t, dict) for t in turns):
            raise UserError(f"{where}: each turn is {{\"from\": ..., \"value\": ...}}")
        for human, gpt in zip(turns[0::2], turns[1::2]):  # the first human/gpt pair is enough
            if human.get("from") == "human" and gpt.get("from") == "gpt":
                question = text_of(human.get("value"), where, "a human turn's value").replace("<image>", "")
                qa.append((question.strip(), text_of(gpt.get("value"), where, "a gpt turn's value")))
        records.append({"file_name": item["image"], "captions": [], "qa": qa[:1], "objects": None,
                        "split": None, "where": where})
    return records


def coco_rows(coco, path, key, fields):
    """A COCO file's list `key`, each row a dict with `fields` -> the rows, or a one-line error."""
    rows = coco.get(key, []) if isinstance(coco, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(fields) <= set(r) for r in rows):
        raise UserError(f"{path}: \"{key}\" must be a list of objects with {', '.join(fields)}")
    return rows


def from_coco(path):
    coco = read_json(path)
    names = {im["id"]: im["file_name"] for im in coco_rows(coco, path, "images", ("id", "file_name"))}
    captions = {}
    for a in coco_rows(coco, path, "annotations", ("image_id", "caption")):
        if a["caption"] is not None:  # a null caption is no caption
            text = text_of(a["caption"], f"{path}, image {a['image_id']}", "a caption")
            captions.setdefault(a["image_id"], []).append(text)
    objects = {}
    instances = Path(path).with_name(Path(path).name.replace("captions_", "instances_"))
    if instances.exists():
        inst = read_json(instances)
        category = {c["id"]: c["name"] for c in coco_rows(inst, instances, "categories", ("id", "name"))}
        for a in coco_rows(inst, instances, "annotations", ("image_id", "category_id")):
            if a["category_id"] not in category:
                raise UserError(f"{instances}: category_id {a['category_id']} is not among its categories")
            objects.setdefault(a["image_id"], set()).add(category[a["category_id"]])
    return [{"file_name": names[i], "captions": captions.get(i, []), "qa": [],  # no instance: no object
             "objects": sorted(objects.get(i, ())) if instances.exists() else None, "split": None,
             "where": f"{path}, image {i}"} for i in sorted(names, key=lambda i: str(names[i]))]


def read_folder(folder):
    """The folder's records, checked: files exist, objects are lists of strings, text is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data_path={folder}: no such folder")
    coco = sorted(folder.glob("captions_*.json"))
    llava = sorted(p for p in folder.glob("*.json")  # found by role: not COCO's, not the synonyms
                   if not p.name.startswith(("captions_", "instances_")) and p.name != "synonyms.json")
    if (folder / "metadata.jsonl").exists():
        records = from_metadata(folder / "metadata.jsonl")
    elif coco:
        records = from_coco(coco[0])
    elif llava:
        records = from_llava(llava[0])
    else:
        raise UserError(f"{folder} has no metadata.jsonl, LLaVA *.json or COCO captions_*.json")
    root = folder.resolve()
    for r in records:
        if not isinstance(r["file_name"], str) or len(r["file_name"]) > 1000:
            raise UserError(f"{r['where']}: the image's file name must be a path inside {folder}")
        image = (folder / r["file_name"]).resolve()  # symbolic links followed: where it really is
        if not image.is_relative_to(root):
            raise UserError(f"{r['where']}: {r['file_name']} lies outside {folder}, where its images must be")
        if not image.is_file():
            raise UserError(f"{r['where']}: {r['file_name']} does not exist in {folder}")
        objs = r["objects"]
        named = isinstance(objs, list) and all(isinstance(o, str) and o.strip() for o in objs)
        if objs is not None and not named:
            raise UserError(f"{r['where']}: \"objects\" must be a list of non-empty strings")
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
    for n, q in json_lines(path):
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
    text = "\n".join(" " + t for t in texts)  # each with the leading space Pairs.encode gives it
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
        texts = [(r["file_name"], r["captions"], r["qa"], r["objects"]) for r in records]
        self._fingerprint = hashlib.sha1(json.dumps(texts).encode()).hexdigest()[:16]

    def fingerprint(self):
        """The folder's images (by name) and everything said of them."""
        return self._fingerprint

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
