"""Object hallucination: measure it with POPE and CHAIR, reduce it with contrastive decoding, and
hold every method against honest controls. `python hallucination.py [--ckpt=PATH] [--key=value ...]`

A vision-language model trained on a biased world (circles come with squares, triangles with stars,
diamonds with crosses) learns the bias along with the pixels, and says "square" where there is none.
In the shapes world the truth is exact, so hallucination is counted, not guessed:
    POPE (Li et al. 2023)      "is there a {shape}?", half about present shapes, half about absent
                               ones drawn at random, among the most frequent (popular), or among
                               those that co-occur most with what is present (adversarial).
    CHAIR (Rohrbach et al. 2018) shapes a caption names that are not in the scene, per mention
                               (CHAIR_i) and per caption (CHAIR_s), beside object recall, all at one
                               fixed caption length, so no method wins by saying less.
Decoding methods are small functions on next-token logits. Every contrast keeps only the tokens that
pass the plausibility cut on the clean logits (p >= b * max p), so where one token passes it is the
answer whatever the second branch says; the second branch (a noised, blank or flipped image) runs only
for the rows where it can matter, in one batch with the clean rows, each row with its own KV cache:
    VCD (Leng et al. 2024)     (1+a)*logits(image) - a*logits(image under diffusion noise, t=500), cut
    the cut alone              the control: how much of VCD's gain is the cut, not the contrast
    no-image contrast          the same formula against a blank canvas (the language prior; as in
                               M3ID's unconditioned branch, without its length schedule)
    RITUAL (Woo et al. 2024)   logits(image) + k*logits(randomly flipped or rotated image), cut
and a data-side control: the same VLM trained on the unbiased world, decoded greedily.
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import vlm
from config import cli, config_help, parse_overrides
from data import UserError, at_least
from data.shapes import SHAPES, caption, object_match, parse_caption

POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass
class StudyConfig:
    ckpt: str = ""               # the study's VLM; default: out_dir/biased/ckpt.pt, trained first if missing
    control_ckpt: str = ""       # the same VLM on the unbiased world; default: out_dir/unbiased/ckpt.pt
    out_dir: str = "out-hallucination"
    seeds: int = 3               # evaluation seeds: scenes, absent objects, noise, transforms, sampling
    n_scenes: int = 300          # POPE scenes per split and seed: one yes and one no question each
    n_captions: int = 200        # CHAIR captions per seed
    caption_tokens: int = 40     # one fixed caption length for every method
    alpha: float = 1.0           # VCD contrast strength
    beta: float = 0.1            # plausibility cut
    noise_step: int = 500        # VCD's diffusion step (of 1000)
    kappa: float = 1.0           # RITUAL: weight of the transformed image's logits
    device: str = "auto"

    def __post_init__(self):
        at_least(self, 1, "seeds", "n_scenes", "n_captions", "caption_tokens")
        at_least(self, 0, "alpha", "kappa")
        if not 0 < self.beta <= 1:
            raise UserError(f"beta={self.beta} must be in (0, 1]")
        if not 0 <= self.noise_step < 1000:
            raise UserError(f"noise_step={self.noise_step} must be in [0, 1000)")


# ---------------------------------------------------------------------------------------------
# Decoding methods: functions on logits

def noise_coefficients(t, steps=1000):
    """VCD's forward diffusion at step t: x_t = a * x_0 + s * eps -> (a, s), sigmoid beta schedule."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    return alpha_bar.sqrt().item(), (1 - alpha_bar).sqrt().item()


def plausible(logits, beta=0.1):
    """VCD's adaptive plausibility constraint: the tokens with p >= beta * max p (temperature 1) -> bool."""
    return logits >= math.log(beta) + logits.max(-1, keepdim=True).values


def plausibility_cut(logits, beta=0.1):
    """The clean logits with every implausible token at -inf."""
    return logits.masked_fill(~plausible(logits, beta), float("-inf"))


def contrastive_logits(logits, logits_cd, alpha=1.0, beta=0.1):
    """VCD: (1+alpha)*logits - alpha*logits_cd, with the plausibility cut computed on the clean logits."""
    return ((1 + alpha) * logits - alpha * logits_cd).masked_fill(~plausible(logits, beta), float("-inf"))


def transform(img, k):
    """RITUAL's random transformations that keep what is in a scene: k = 0, 1 flips, 2, 3 quarter turns."""
    return img.flip(-1) if k == 0 else img.flip(-2) if k == 1 else torch.rot90(img, k - 1, (-2, -1))


@dataclass(frozen=True)
class Method:
    second: str = ""      # the second branch's image: "noised", "blank", "transformed", or none
    mix: object = None    # (clean logits, second logits) -> scores, implausible tokens (on the clean) at -inf
    cut: bool = False     # the plausibility cut on the clean logits (every two-branch method has it)
    sample: bool = False  # sample at T=1 (Gumbel max), else greedy


def methods(sc):
    a, b, k = sc.alpha, sc.beta, sc.kappa
    vcd = lambda l, l2: contrastive_logits(l, l2, a, b)  # noqa: E731
    return {
        "greedy": Method(),
        "sampling": Method(sample=True),
        "cut only (sampling)": Method(cut=True, sample=True),
        "VCD (sampling)": Method("noised", vcd, True, True),
        "VCD (greedy)": Method("noised", vcd, True, False),
        "no-image contrast (sampling)": Method("blank", vcd, True, True),
        "RITUAL (sampling)": Method("transformed", lambda l, l2: (l + k * l2).masked_fill(~plausible(l, b), float("-inf")),
                                    True, True),  # the cut on the clean logits, as in RITUAL's code
    }


def second_branch(images, second, sc, gen):
    """-> rows (n,) -> (the second branch's images, image_index) for those rows. The random draws (a
    noise seed, a transformation per row) are made up front, so they never depend on which rows ask."""
    B = len(images)
    if second == "noised":  # VCD: x_t = a * x_0 + s * eps, eps drawn once per image
        a, s = noise_coefficients(sc.noise_step)
        seeds = torch.randint(2 ** 62, (B,), generator=gen).tolist()
        eps = lambda r: torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(seeds[r]))  # noqa: E731
        return lambda rows: (a * images[rows] + s * torch.stack([eps(r) for r in rows.tolist()]).to(images.device), None)
    if second == "transformed":
        ks = torch.randint(0, 4, (B,), generator=gen).tolist()
        return lambda rows: (torch.stack([transform(images[r], ks[r]) for r in rows.tolist()]), None)
    # the blank canvas is one image for every row: the vision tower reads it once
    return lambda rows: (vlm.blank_like(images[:1]), torch.zeros_like(rows))


@torch.no_grad()
def decode(model, images, prompt, method, sc, max_new_tokens, gen, gate=True):
    """One method over a batch -> (tokens (B, T), first-step scores (B, V), rows the second branch read).

    Every step is one batched forward over the clean rows and the second branch's rows, each row with
    its own KV cache. The second branch can only reorder the tokens that pass the plausibility cut on
    the clean logits; where one token passes, every method here picks it. So (gate=True) a row joins
    the second branch only when two or more first pass: it reads the second image, its prompt and
    the tokens so far in one pass (vlm.start) and joins the batch. The tokens are those of running
    both branches for every row from the start (gate=False), which a test checks."""
    B, dev = images.shape[0], images.device
    logits, state = model.start(images, prompt)  # (B, V); rows B.. will be the second branch's
    rows = torch.zeros(0, dtype=torch.long, device=dev)  # the clean row each second-branch row belongs to
    if method.second:
        second_images = second_branch(images, method.second, sc, gen)
    out, done, first = [], torch.zeros(B, dtype=torch.bool, device=dev), None
    for _ in range(max_new_tokens):
        clean = logits[:B]
        keep = plausible(clean, sc.beta) if method.cut else None  # (B, V); every two-branch method cuts
        scores = clean.masked_fill(~keep, float("-inf")) if method.cut else clean
        if method.second:
            need = ~done & ((keep.sum(-1) > 1) | (not gate))  # (B,)
            joining = need.clone()
            joining[rows] = False
            joining = joining.nonzero()[:, 0]
            if len(joining):
                answer = torch.stack(out, 1)[joining] if out else prompt[joining, :0]  # (n, t): not done, no padding
                imgs, index = second_images(joining)
                l2, s2 = model.start(imgs, prompt[joining], answer, index)
                rows, state, logits = torch.cat([rows, joining]), vlm.cat_states(state, s2), torch.cat([logits, l2])
            where = torch.zeros(B, dtype=torch.long, device=dev)
            where[rows] = B + torch.arange(len(rows), device=dev)  # each row's second-branch logits
            r = need.nonzero()[:, 0]
            scores[r] = method.mix(clean[r], logits[where[r]])
        first = scores if first is None else first
        if method.sample:
            u = torch.rand(scores.shape, generator=gen).to(dev)
            token = (scores.log_softmax(-1) - torch.log(-torch.log(u.clamp(1e-10, 1)))).argmax(-1)  # Gumbel max
        else:
            token = scores.argmax(-1)
        out.append(torch.where(done, model.tok.pad_id, token))
        done |= token == model.tok.eot_id
        if done.all() or len(out) == max_new_tokens:
            break
        logits = model.step(state, torch.cat([token, token[rows]]))  # every branch, one forward
    return torch.stack(out, 1), first, len(rows)


# ---------------------------------------------------------------------------------------------
# POPE and CHAIR

def shape_stats(data):
    """From the training split: shape frequency and P(shape b present | shape a present)."""
    objs = data.shapes["train"].objects[:, :, 0]  # (N, max_objects), -1 = none
    present = np.stack([(objs == s).any(1) for s in range(len(SHAPES))], 1).astype(np.float64)  # (N, 6)
    freq = present.mean(0)
    cooc = (present.T @ present) / np.maximum(present.sum(0)[:, None], 1)  # (6, 6): row a, column b
    return freq, cooc


def pope_questions(data, split, n_scenes, seed, freq, cooc):
    """-> [(scene, shape, label)], one present and one absent shape per scene: exactly half 'yes'."""
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split)])
    scenes = rng.choice(len(data.shapes["val"]), size=n_scenes, replace=False)
    out = []
    for i in scenes.tolist():
        shapes = sorted(set(data.shapes["val"].scene(i)[:, 0].tolist()))
        absent = [s for s in range(len(SHAPES)) if s not in shapes]
        if not absent:
            continue
        if split == "random":
            no = int(rng.choice(absent))
        elif split == "popular":
            no = max(absent, key=lambda s: freq[s])
        else:  # the absent shape that co-occurs most with those present
            no = max(absent, key=lambda s: max(cooc[p, s] for p in shapes))
        out += [(i, int(rng.choice(shapes)), "yes"), (i, no, "no")]
    return out


def pope_metrics(labels, answers):
    """labels, answers: lists of 'yes'/'no' (answers may hold None: unparsable, counted as not 'yes')."""
    tp = sum(l == "yes" and a == "yes" for l, a in zip(labels, answers))
    fp = sum(l == "no" and a == "yes" for l, a in zip(labels, answers))
    fn = sum(l == "yes" and a != "yes" for l, a in zip(labels, answers))
    n = len(labels)
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"accuracy": sum(l == a for l, a in zip(labels, answers)) / n, "precision": p, "recall": r,
            "f1": 2 * p * r / max(1e-9, p + r), "yes_ratio": sum(a == "yes" for a in answers) / n,
            "unparsable": sum(a is None for a in answers)}


def parse_yes_no(text):
    """Strict: 'yes' or 'no' only as the first word, else None (never silently a yes)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return words[0] if words and words[0] in ("yes", "no") else None


def chair(captions, scenes):
    """captions: texts; scenes: object arrays. -> CHAIR_i, CHAIR_s, recall (shapes as the objects;
    a shape said twice where there is one counts one hallucination)."""
    mentions = hallucinated = bad_captions = hits = n_objects = 0
    for text, objs in zip(captions, scenes):
        said = [(-1, -1, shape) for _, _, shape in parse_caption(text)]
        tp, n_said, n_true = object_match(said, objs)
        mentions, hallucinated = mentions + n_said, hallucinated + n_said - tp
        bad_captions += n_said > tp
        hits, n_objects = hits + tp, n_objects + n_true
    return {"chair_i": hallucinated / max(1, mentions), "chair_s": bad_captions / max(1, len(captions)),
            "recall": hits / max(1, n_objects)}


@torch.no_grad()
def run_method(model, data, name, method, sc, seed, freq, cooc, device, records, batch_size=200):
    """POPE on the three splits and CHAIR captions for one method and seed -> flat dict of figures."""
    gen = torch.Generator().manual_seed(seed)
    yes, no = (model.tok.encode(" yes")[0], model.tok.encode(" no")[0])
    out = {}
    for split in POPE_SPLITS:
        qs = pope_questions(data, split, sc.n_scenes, seed, freq, cooc)
        labels, by_text, by_prob = [], [], []
        for k in range(0, len(qs), batch_size):
            chunk = qs[k:k + batch_size]
            b = data.make_batch("val", np.array([c[0] for c in chunk]),
                                [(f"is there a {SHAPES[c[1]]}?", "") for c in chunk], device)
            tokens, first, _ = decode(model, vlm.row_images(b), b["prompt"], method, sc, 3, gen)
            for (scene, shape, label), raw, s in zip(chunk, model.texts(tokens), first):
                labels.append(label)
                by_text.append(parse_yes_no(raw))
                by_prob.append("yes" if s[yes] > s[no] else "no")
                records.append({"scene": scene, "split": split, "question": f"is there a {SHAPES[shape]}?",
                                "label": label, "method": name, "seed": seed, "parsed": by_text[-1], "raw": raw})
        out.update({f"pope_{split}_{k}": v for k, v in pope_metrics(labels, by_text).items()})
        out.update({f"pope_{split}_prob_{k}": v for k, v in pope_metrics(labels, by_prob).items() if k != "unparsable"})
    rng = np.random.default_rng([seed, 7])
    scenes = rng.choice(len(data.shapes["val"]), size=min(sc.n_captions, len(data.shapes["val"])), replace=False)
    texts = []
    for k in range(0, len(scenes), batch_size):
        idx = scenes[k:k + batch_size]
        b = data.make_batch("val", idx, [(vlm.CAPTION_PROMPT, "")] * len(idx), device)
        tokens, _, _ = decode(model, vlm.row_images(b), b["prompt"], method, sc, sc.caption_tokens, gen)
        texts += model.texts(tokens)
    out.update(chair(texts, [data.shapes["val"].scene(i) for i in scenes]))
    out["captions"] = dict(zip(map(int, scenes[:8]), texts[:8]))
    return out


@torch.no_grad()
def image_attention(model, images, prompt, answer):
    """For each answer token: the share of attention (mean over layers and heads) that the position
    predicting it pays to the image tokens (mae.Attention.weights, block by block)."""
    x, key_valid, n_prefix = model.sequence(images, prompt, answer)
    mask = vlm.prefix_lm_mask(key_valid, n_prefix)  # (B, 1, S, S)
    n_img = x.shape[1] - prompt.shape[1] - answer.shape[1]
    shares = []
    for blk in model.blocks:
        w = blk.attn.weights(blk.norm1(x), mask)  # (B, h, S, S)
        shares.append(w[..., :n_img].sum(-1).mean(1))  # (B, S)
        x = blk(x, attn_mask=mask)
    return torch.stack(shares).mean(0)[:, -answer.shape[1] - 1:-1]  # (B, A)


# ---------------------------------------------------------------------------------------------
# The study: models, the table, the pictures

def study_model(path, out_dir, name, extra):
    """A trained VLM from `path`, or the study's config trained into out_dir/name first."""
    from sample import load_model, SampleConfig
    import train
    path = Path(path or Path(out_dir) / name / "ckpt.pt")
    if path.parent == Path(out_dir) / name:  # the study's own: train it, or finish an interrupted run
        args = ["vlm", str(Path(__file__).parent / "config/vlm_study.conf"), *extra, f"--out_dir={path.parent}"]
        if not path.exists():
            print(f"training the study's {name} model: python train.py {' '.join(args)}", flush=True)
            train.main(args)
        else:
            ckpt = train.load_checkpoint(path, "vlm")
            if ckpt["iter"] < ckpt["config"]["train"]["max_iters"]:  # an interrupted run: finish it
                print(f"finishing the study's {name} model in {path.parent}", flush=True)
                train.main(args[:1] + ["--init_from=resume", f"--out_dir={path.parent}"])
    _, model, cfg, ckpt = load_model("vlm", SampleConfig(out_dir=str(path.parent), ckpt=path.name))
    if cfg.objective != "prefix":
        raise UserError(f"{path} is an --objective={cfg.objective} model; POPE and CHAIR need one that answers")
    return model, cfg, ckpt


def mean_std(rows, key):
    v = np.array([r[key] for r in rows])
    return float(v.mean()), float(v.std())


COLUMNS = [(f"pope_{s}_{m}", f"{s[:3]} {m}") for s in POPE_SPLITS for m in ("accuracy", "f1", "yes_ratio")] + \
          [("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("recall", "recall")]


def table(results):
    head = "| method | " + " | ".join(label.replace("accuracy", "acc").replace("yes_ratio", "yes") for _, label in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, rows in results.items():
        cells = []
        for key, _ in COLUMNS:
            m, s = mean_std(rows, key)
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bars(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, (("pope_random_f1", "POPE F1, random"), ("pope_adversarial_f1", "POPE F1, adversarial"),
                                       ("chair_i", "CHAIR_i (lower is better)"))):
        m = [100 * mean_std(results[n], key)[0] for n in names]
        s = [100 * mean_std(results[n], key)[1] for n in names]
        ax.barh(range(len(names)), m, xerr=s, color=["tab:gray" if "unbiased" in n else "tab:blue" for n in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def marked(text, objs):
    """The caption with every hallucinated shape word marked [like this]."""
    present = objs[:, 0].tolist()
    words = []
    for w in text.split():
        shape = w.strip(",.").lower()
        if shape in SHAPES and SHAPES.index(shape) in present:
            present.remove(SHAPES.index(shape))
        elif shape in SHAPES:
            w = f"[{w.strip(',.')}✗]" + ("," if w.endswith(",") else "")
        words.append(w)
    return " ".join(words)


@torch.no_grad()
def pictures(model, data, sc, device, out_dir, n=6):
    """Scenes where greedy decoding hallucinates: the greedy and the VCD caption under each; and how
    much attention a hallucinated caption pays to the image, beside a correct one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sample import draw_grid
    val, idx = data.shapes["val"], np.arange(min(len(data.shapes["val"]), 400))
    b = data.make_batch("val", idx, [(vlm.CAPTION_PROMPT, "")] * len(idx), device)
    gen = torch.Generator().manual_seed(0)
    greedy, vcd = (model.texts(decode(model, vlm.row_images(b), b["prompt"], methods(sc)[name], sc, sc.caption_tokens, gen)[0])
                   for name in ("greedy", "VCD (greedy)"))
    bad = [i for i in idx if chair([greedy[i]], [val.scene(i)])["chair_s"] > 0]
    good = [i for i in idx if greedy[i] == caption(val.scene(i))]
    show = (bad + good)[:n]
    if show:
        draw_grid(val.images[show], [f"val {i}\ngreedy: {marked(greedy[i], val.scene(i))}\nVCD: {marked(vcd[i], val.scene(i))}"
                                     for i in show], Path(out_dir) / "captions.png", cols=n,
                  footer="[shape✗] = a shape the scene does not have (counted per shape, so of two 'squares' where "
                         "there is one, the second is marked)")
    if not bad or not good:
        return {"hallucinated_scenes": len(bad), "correct_scenes": len(good)}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, label in ((bad[0], "hallucinated"), (good[0], "correct")):
        answer = data.encode([greedy[i]], left_pad=False).to(device)
        share = image_attention(model, vlm.row_images(b)[i:i + 1], b["prompt"][i:i + 1], answer)[0]
        words = [model.tok.token_str(t).strip() for t in answer[0].tolist()]
        ax.plot(share.cpu().numpy(), "o-", label=f"{label} (val {i})")
        for x, (w, y) in enumerate(zip(words, share.tolist())):
            bad_word = label == "hallucinated" and w in SHAPES and SHAPES.index(w) not in val.scene(i)[:, 0]
            ax.annotate(w, (x, y), fontsize=6, rotation=60, color="red" if bad_word else "black")
    ax.set_xlabel("caption token")
    ax.set_ylabel("attention on image tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "attention.png", dpi=100)
    plt.close(fig)
    return {"hallucinated_scenes": len(bad), "correct_scenes": len(good)}


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[0])
        print(config_help(StudyConfig))
        return
    sc = StudyConfig(**parse_overrides(argv, StudyConfig))
    from train import pick_device
    device = pick_device(sc.device)
    out_dir = Path(sc.out_dir)
    model, cfg, ckpt = study_model(sc.ckpt, out_dir, "biased", [])
    control, _, _ = study_model(sc.control_ckpt, out_dir, "unbiased", ["--cooccur=0", "--skew=0"])
    model, control = model.to(device), control.to(device)
    data = vlm.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False)
    if sc.n_scenes > len(data.shapes["val"]):
        raise UserError(f"n_scenes={sc.n_scenes}: the model's val split has {len(data.shapes['val'])} scenes")
    freq, cooc = shape_stats(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(name, model, m) for name, m in methods(sc).items()] + \
           [("unbiased data, greedy", control, methods(sc)["greedy"])]
    results, records, timing = {}, [], {}
    t_start = time.time()
    for name, m_model, method in runs:
        t0 = time.time()
        results[name] = [run_method(m_model, data, name, method, sc, seed, freq, cooc, device, records)
                         for seed in range(sc.seeds)]
        timing[name] = time.time() - t0
        r = results[name]
        print(f"{name:<30} POPE acc random {100 * mean_std(r, 'pope_random_accuracy')[0]:.1f} "
              f"adversarial F1 {100 * mean_std(r, 'pope_adversarial_f1')[0]:.1f} | CHAIR_i "
              f"{100 * mean_std(r, 'chair_i')[0]:.1f} | {timing[name]:.0f} s", flush=True)
    print(f"\n{table(results)}\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"config": asdict(sc), "checkpoint": str(sc.ckpt or out_dir / "biased/ckpt.pt"), "world": {"cooccur": cfg.cooccur, "skew": cfg.skew},
         "methods": results, "seconds": timing, "shape_frequency": freq.tolist(), "cooccurrence": cooc.tolist()}, indent=1))
    with open(out_dir / "pope.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    plot_bars(results, out_dir / "methods.png")
    pics = pictures(model, data, sc, device, out_dir)
    print(f"{pics['hallucinated_scenes']} of 400 greedy captions hallucinate; wrote results.json, pope.jsonl, "
          f"methods.png, captions.png, attention.png to {out_dir} in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    cli(main)
