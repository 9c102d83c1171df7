"""Would the suite notice a wrong figure? Plant one small bug at a time in the code that computes the
course's figures, run the tests that guard it, and count the bugs they catch.

    python tests/mutants.py            every planted bug (about 5 minutes on 2 cores)
    python tests/mutants.py 3 7        only bugs 3 and 7 (their numbers in the list)

Each bug is planted in a copy of the repository (its tracked files and the data cache), never in
this checkout. The first eleven are the ones a review planted and the suite once missed (issue 25);
the rest were planted to check the new tests. Exit status 1 if any bug goes unnoticed.
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURES, CAUSES, CURES = "tests/test_measures.py", "tests/test_causes.py", "tests/test_cures.py"
DECODING = "tests/test_hallucination.py"  # decoding.py's tests, and the study's
MIM = "tests/test_mim.py"
CLIP = "tests/test_clip.py"
GEN = "tests/test_gen.py"

# (what the bug does, file, the line as it is, the line with the bug, the tests that must catch it)
MUTANTS = [
    ("question accuracy counts wrong answers as right", "vlm.py",
     "right.get(kind, 0) + (said == a)", "right.get(kind, 0) + (said != '')", [MEASURES]),
    ("the blank-canvas accuracy reads the real image", "vlm.py",
     'images = blank_like(b["images"]) if blank else b["images"]', 'images = b["images"]', [MEASURES]),
    ("the map's partner-yes and random-absent rates swapped", "study/causes.py",
     "asked += [int(rng.choice(missing)), int(rng.choice(plain))]",
     "asked += [int(rng.choice(plain)), int(rng.choice(missing))]", [CAUSES]),
    ("the cures table's partner-yes counts the wrong questions", "study/cures.py",
     'if r["label"] == "no" and asked in {PARTNER[s] for s in shapes}:',
     'if r["label"] == "no" and asked not in {PARTNER[s] for s in shapes}:', [CURES]),
    ("BEAF's before and after images swapped", "study/causes.py",
     "np.concatenate([before, after, before, after])", "np.concatenate([after, before, before, after])",
     [CAUSES]),
    ("the layer probes read the same layer at every depth", "study/causes.py",
     "linear_probe(x_train[l], y_train)(x_val[l])", "linear_probe(x_train[-1], y_train)(x_val[-1])",
     [CAUSES]),
    ("the co-occurrence matrix transposed", "study/measures.py", "    return freq, cooc\n",
     "    return freq, cooc.T\n", [MEASURES]),
    ("VCD's second branch given the clean image", "study/decoding.py",
     "return a * images[rows] + s * torch.stack(eps).to(images.device), None", "return images[rows], None",
     [DECODING]),
    ("RITUAL's sign flipped", "study/decoding.py", "return (logits + kappa * logits_t)",
     "return (logits - kappa * logits_t)", [DECODING]),
    ("the attention plot measures the share on text", "hallucination.py", "w[..., :n_img].sum(-1)",
     "w[..., n_img:].sum(-1)", [DECODING]),
    ("checkpoints written in place", "lib/checkpoints.py", "torch.save(obj, tmp)", "torch.save(obj, path)",
     ["tests/test_errors.py::test_a_save_that_fails_midway_leaves_the_old_checkpoint_whole"]),
    # planted to check the new tests: flipped comparisons, swapped arguments, off-by-one, transposed
    ("POPE's false negatives skip unparsable answers", "study/measures.py",
     'fn = sum(lab == "yes" and a != "yes"', 'fn = sum(lab == "yes" and a == "no"',
     ["tests/test_hallucination.py"]),
    ("POPE's popular split asks the rarest absent shape", "study/measures.py",
     "no = max(absent, key=freq.__getitem__)", "no = min(absent, key=freq.__getitem__)", [MEASURES]),
    ("POPE's adversarial split reads the co-occurrence by column", "study/measures.py",
     "cooc[present].max(0)", "cooc[:, present].max(1)", [MEASURES]),
    ("caption precision and recall swapped", "vlm.py", "p, r = tp / max(1, n_said), tp / max(1, n_true)",
     "p, r = tp / max(1, n_true), tp / max(1, n_said)", [MEASURES]),
    ("P(yes) vs P(no) read the wrong way round", "hallucination.py",
     '"yes" if scores[yes_no[0]] > scores[yes_no[1]]', '"yes" if scores[yes_no[0]] < scores[yes_no[1]]',
     [MEASURES]),
    ("the blank figure computed with the image", "vlm.py",
     "attribute_accuracy(model, data, split, device, blank=True)",
     "attribute_accuracy(model, data, split, device, blank=False)", [MEASURES]),
    ("the monitor asks every kind of question", "vlm.py",
     'n_scenes=n_scenes, kinds=("exist",))', "n_scenes=n_scenes, kinds=None)", [MEASURES]),
    ("shape frequency counted, not averaged", "study/measures.py", "freq = present.mean(0)",
     "freq = present.sum(0)", [MEASURES]),
    ("the random absent shape may be a missing partner", "study/causes.py",
     "if s not in shapes and s not in missing]", "if s not in shapes]", [CAUSES]),
    ("VCD's noise one diffusion step early", "study/decoding.py", "torch.cumprod(1 - betas, 0)[t]",
     "torch.cumprod(1 - betas, 0)[t - 1]", [DECODING]),
    ("the second branch reads the clean rows in decode", "study/decoding.py",
     "model.start(imgs, prompt[joining], answer, index)",
     "model.start(images[joining], prompt[joining], answer)",
     [DECODING]),
    ("the answer positions off by one", "vlm.py", "return x[:, -A - 1:-1]", "return x[:, -A:]",
     [DECODING, "tests/test_vlm.py"]),
    ("M3ID's weight without its division", "study/decoding.py", "return (1 - g) / g", "return 1 - g",
     [DECODING]),
    ("the per-layer states lose the last block's output", "vlm.py",
     "        if states is not None:\n            states.append(x)\n        return self.head(x)",
     "        return self.head(x)", [CAUSES]),
    ("CHAIR_s counts every caption that names anything", "study/measures.py", "bad_captions += n_said > tp",
     "bad_captions += n_said >= tp", ["tests/test_hallucination.py"]),
    ("a lazy import closes a cycle", "data/pairs.py", "def row_images(batch):\n",
     "def row_images(batch):\n    from data.captioned import FolderPairs  # noqa: F401\n",
     ["tests/test_house.py::test_the_import_graph_has_no_cycle_and_measures_import_no_idea"]),
    ("AttMask hides the least attended patches", "mim.py", "return attention_scores(self.teacher, imgs)",
     "return -attention_scores(self.teacher, imgs)", [MIM]),
    ("HPM hides the easiest patches", "mim.py", "hardest = predicted_loss.topk(n_hard, dim=1).indices",
     "hardest = (-predicted_loss).topk(n_hard, dim=1).indices", [MIM]),
    ("the features target without its layer norm", "mim.py",
     "F.smooth_l1_loss(pred.float(), F.layer_norm(z, z.shape[-1:]), reduction=\"none\")",
     "F.smooth_l1_loss(pred.float(), z, reduction=\"none\")", [MIM]),
    ("the rank loss's pairs ignore the mask", "mim.py", "pairs = mask[:, :, None] * mask[:, None, :]",
     "pairs = torch.ones_like(diff)", [MIM]),
    ("green noise low-passed instead of band-passed", "mim.py",
     "passband = ((radius >= band[0]) & (radius <= band[1])).float()",
     "passband = (radius <= band[1]).float()",
     [MIM]),
    ("the count probe asks \"at least 1\" (always yes)", "mae.py",
     "at_least_k = [count >= k for k in range(2, split.world.max_objects + 1)]",
     "at_least_k = [count >= k for k in range(1, split.world.max_objects + 1)]", [MIM]),
    ("InfoNCE one way only (images to texts)", "clip.py",
     "return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2",
     "return F.cross_entropy(logits, target)", [CLIP]),
    ("identical captions counted as negatives", "clip.py",
     "target = same.float() / same.sum(1, keepdim=True)", "target = torch.eye(len(same))", [CLIP]),
    ("FLIP drops patches at evaluation too", "clip.py",
     "return self.cfg.image_mask_ratio if self.training and not tuning else 0.0",
     "return self.cfg.image_mask_ratio if not tuning else 0.0", [CLIP]),
    ("the text vector read at the last position, padding included", "clip.py",
     "ends = (text != self.tok.pad_id).sum(1) - 1", "ends = torch.full((len(text),), text.shape[1] - 1)",
     [CLIP]),
    ("the partner negative adds any absent shape", "data/shapes.py",
     '"add_partner": [PARTNER[s] for s in present if PARTNER[s] in absent][:1]}[kind]',
     '"add_partner": absent}[kind]', [CLIP]),
    ("the colour swap swaps sizes", "data/shapes.py",
     'column, differ = (1, [1]) if kind == "swap_colours" else (3, [0, 1, 2])',
     'column, differ = (2, [2]) if kind == "swap_colours" else (3, [0, 1, 2])', [CLIP]),
    ("the per-object score forgets the whole caption", "clip.py",
     "total = full + torch.zeros(len(scenes)).index_add_(0, owner, each)",
     "total = 0 * full + torch.zeros(len(scenes)).index_add_(0, owner, each)", [CLIP]),
    ("retrieval counts only the pair's own text as found", "clip.py",
     "same = label[:, None] == label[None]  # (N, N)", "same = torch.eye(len(texts), dtype=torch.bool)",
     [CLIP]),
    ("MaskGIT reveals the least confident", "mlm.py", "return masked & (rank >= n_keep_masked)",
     "return masked & (rank < masked.sum(1, keepdim=True) - n_keep_masked)", [GEN]),
    ("the generator's partner rate counts every absent shape", "gen.py",
     "count = partner if any(PARTNER[a] == s for a in asked) else other",
     "count = partner", [GEN]),
    ("MAGE's ratios drawn from the whole Gaussian", "gen.py",
     "u = ends[0] + (ends[1] - ends[0]) * torch.rand(n, generator=generator)  # (n,)",
     "u = torch.rand(n, generator=generator)  # (n,)", [GEN]),
    ("the world's reader ignores the empty template", "data/shapes.py",
     "        if best:\n            objs.append", "        if True:\n            objs.append", [GEN]),
    ("the MAGE encoder pools the empty caption slots with the image", "gen.py",
     "m.codes(images)))[:, MAX_CAPTION:],)", "m.codes(images))),)", [GEN]),
    ("the probes skip the first patch of an encoder without a cls token", "mae.py",
     'first = 0 if getattr(encoder, "cls_token", None) is None else 1', "first = 1", [GEN]),
    ("the judge counts a partner drawn instead of the shape asked as one drawn beside it", "gen.py",
     "count[1] += s in shapes_drawn and kept", "count[1] += s in shapes_drawn", [GEN]),
]


def copy_repo(dest):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    if (ROOT / "data/cache").is_dir():  # rendered scenes: no need to draw them again
        shutil.copytree(ROOT / "data/cache", dest / "data/cache")


def caught(repo, mutant):
    """Plant the bug, run its tests, take the bug out -> (caught?, seconds)."""
    what, file, old, new, tests = mutant
    path = repo / file
    source = path.read_text()
    if source.count(old) != 1:
        raise SystemExit(f"{what}: the line to change is not once in {file} (the code moved: update MUTANTS)")
    path.write_text(source.replace(old, new))
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=repo, capture_output=True, text=True)
    finally:
        path.write_text(source)
    return p.returncode == 1, time.time() - t0  # 1: a test failed; anything else is not a catch


def main(argv):
    chosen = [int(a) for a in argv] or range(1, len(MUTANTS) + 1)
    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        for k in chosen:
            ok, seconds = caught(repo, MUTANTS[k - 1])
            verdict = "caught" if ok else "MISSED"
            print(f"{k:2d}. {verdict}  {seconds:4.0f} s  {MUTANTS[k - 1][0]}", flush=True)
            if not ok:
                missed.append(k)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} planted bugs caught"
          + (f"; missed: {', '.join(map(str, missed))}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
