"""What a contrastive model cannot tell apart, beside a captioning VLM, on the same pairs:

    python -m study.negatives CLIP_CKPT [VLM_CKPT ...] [--split=ood]

For each held-out scene and each kind of hard negative (data.shapes.negative: an absent object added at
random, the popular one or the partner; a present object removed; two colours or two positions swapped),
how often a model scores the true caption above the edited one (ties count half; 50% is chance):
  CLIP             the cosine of image and caption (clip.py)
  CLIP per-object  F-CLIPScore: that cosine averaged with each object phrase's own
  VLM              the log-likelihood of the caption, end-of-text included, given the image and
                   "describe the image." (vlm.py's prefix-LM)
and each model again with a blank canvas for the image, the control: what the words alone decide
(a longer caption is less likely, so the VLM's likelihood wins every addition and loses every removal
on words alone). Its fair score is the last column: what the image adds to the caption's log-likelihood,
log p(caption | image) - log p(caption | blank) (pointwise mutual information, the quantity contrastive
decoding amplifies).
"""

import torch
import torch.nn.functional as F

import clip
import vlm
from data import to_tensor
from data.pairs import CAPTION_PROMPT, blank_like
from data.shapes import caption
from lib.checkpoints import load_model
from lib.common import UserError, pick_device
from lib.config import cli, usage

WORLD = ("img_size", "cooccur", "skew", "noise")


@torch.no_grad()
def caption_logprob(model, images, scenes, device, chunk=100):
    """A VLM's log p(caption, end-of-text | image, "describe the image.") for each image and scene -> (n,)."""
    tok, out = model.tok, []
    for i in range(0, len(scenes), chunk):
        texts = [caption(s) for s in scenes[i:i + chunk]]
        ids = [tok.encode(" " + t) + [tok.eot_id] for t in texts]
        A = max(len(x) for x in ids)
        answer = torch.tensor([x + [tok.pad_id] * (A - len(x)) for x in ids], device=device)  # (b, A)
        prompt = torch.tensor([tok.encode(" " + CAPTION_PROMPT)] * len(ids), device=device)  # (b, P)
        index = torch.arange(len(ids), device=device)
        logits, labels, rows = vlm.answer_targets(model, images[i:i + chunk], prompt, answer, index)
        logp = F.log_softmax(logits[0].float(), -1).gather(1, labels[0, :, None])[:, 0]  # (tokens,)
        out.append(torch.zeros(len(ids), device=device).index_add_(0, rows, logp).cpu())
    return torch.cat(out)


def table(clip_model, vlms, data, split, device):
    """-> {kind: {column: share}}, each model with the real images and with blank ones."""
    n = len(data.keep[split])
    images = to_tensor(data.images(split, range(n)), device)  # (n, 3, H, W)
    blank = blank_like(images)
    clip_model.eval()
    with torch.no_grad():
        vectors = {"": clip_model.encode_image(images).float().cpu(),
                   " (blank)": clip_model.encode_image(blank).float().cpu()}
    out = {}
    for kind, (rows, trues, edits) in clip.edited_scenes(data, split).items():
        row = out.setdefault(kind, {"scenes": len(rows)})
        for suffix, img in vectors.items():
            for name, per_object in (("CLIP", False), ("CLIP per-object", True)):
                true = clip.scores(clip_model, img[rows], trues, device, per_object)
                neg = clip.scores(clip_model, img[rows], edits, device, per_object)
                row[name + suffix] = clip.wins(true, neg)
        for name, model in vlms.items():
            true, neg = {}, {}
            for suffix, pixels in (("", images[rows]), (" (blank)", blank[rows])):
                true[suffix] = caption_logprob(model, pixels, trues, device)
                neg[suffix] = caption_logprob(model, pixels, edits, device)
                row[name + suffix] = clip.wins(true[suffix], neg[suffix])
            row[name + " (image - blank)"] = clip.wins(true[""] - true[" (blank)"], neg[""] - neg[" (blank)"])
    return out


def load(argv):
    """The command line -> (CLIP model, {name: VLM}, data, split), every file checked first."""
    split = "ood"
    paths = []
    for a in argv:
        if a.startswith("--split="):
            split = a.split("=", 1)[1]
        elif a.startswith("--"):
            raise UserError(f"unknown option {a}; the one option is --split=val|ood")
        else:
            paths.append(a)
    if split not in ("val", "ood"):
        raise UserError(f"--split={split}: choose val or ood")
    if not paths:
        raise UserError("give a checkpoint of train.py clip, then any checkpoints of train.py vlm")
    device = pick_device("auto")
    _, clip_model, cfg, ckpt = load_model("clip", paths[0], device)
    if cfg.dataset != "shapes":
        raise UserError(f"{paths[0]} was trained on a folder; hard negatives need the shapes world's truth")
    seed = ckpt["config"]["train"]["seed"]
    vlms = {}
    for k, path in enumerate(paths[1:]):
        _, model, vcfg, vckpt = load_model("vlm", path, device)
        differ = [key for key in WORLD if getattr(vcfg, key) != getattr(cfg, key)]
        if differ or vckpt["config"]["train"]["seed"] != seed or vcfg.dataset != "shapes":
            what = differ[0] if differ else "seed or dataset"
            raise UserError(f"{path} was trained on another world than {paths[0]} ({what}): train both alike")
        vlms[f"VLM {k + 1}" if len(paths) > 2 else "VLM"] = model
    data = clip.Data(cfg, seed=seed, verbose=False).read_with(ckpt)
    return clip_model, vlms, data, split, device


def main(argv):
    if not argv or "-h" in argv or "--help" in argv:
        return usage(__doc__.strip(), argv)
    clip_model, vlms, data, split, device = load(argv)
    rows = table(clip_model, vlms, data, split, device)
    columns = [c for c in next(iter(rows.values())) if c != "scenes"]
    print(f"true caption scored above the negative, {split} scenes (50% = chance)")
    print(f"{'negative':<16}{'scenes':>7}" + "".join(f"{c:>{max(9, len(c) + 2)}}" for c in columns))
    for kind, row in rows.items():
        print(f"{kind:<16}{row['scenes']:>7}"
              + "".join(f"{100 * row[c]:>{max(9, len(c) + 2)}.1f}" for c in columns))
    return 0


if __name__ == "__main__":
    cli(main)
