"""Object hallucination: measure it with POPE and CHAIR, reduce it with contrastive decoding, and
hold every method against honest controls. `python hallucination.py [--ckpt=PATH] [--key=value ...]`

A vision-language model trained on a biased world (circles come with squares, triangles with stars,
diamonds with crosses) learns the bias along with the pixels, and says "square" where there is none.
In the shapes world the truth is exact, so hallucination is counted, not guessed (`study/measures.py`: POPE's
yes/no questions on three splits, CHAIR on captions of one fixed length). Every decoding method
(`study/decoding.py`: greedy, sampling, the plausibility cut alone, VCD, a no-image contrast, RITUAL, M3ID,
DeCo) runs on the same model and questions, beside a data-side control: the same VLM trained on the
unbiased world, decoded greedily. `--data_path=DIR`: the study on a user's folder (its `objects`).
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import vlm
from data.captioned import read_folder, read_pope_file
from data import to_tensor
from data.pairs import CAPTION_PROMPT, shapes_tokenizer
from data.shapes import SHAPES, caption
from lib.checkpoints import load_checkpoint, load_model, run_left, weights_path
from lib.common import UserError, at_least, check_writable, draw_grid, pick_device, pyplot, savefig
from lib.config import cli, config_help, parse_overrides, usage
from study.decoding import METHODS, decode
from study.measures import (POPE_SPLITS, chair, chair_of, marked, object_stats, parse_yes_no, pope_metrics,
                      pope_questions, pope_rule)


@dataclass
class StudyConfig:
    ckpt: str = ""               # the study's VLM, a path or weights by name; default out_dir/biased/ckpt.pt
    data_path: str = ""          # a user's folder (data/captioned.py): the study on its images and objects
    pope_file: str = ""          # with data_path: a POPE question file of that folder's images, asked too
    control_ckpt: str = ""       # the same VLM on the unbiased world; default: out_dir/unbiased/ckpt.pt
    out_dir: str = "out-hallucination"  # where the study writes (and trains its models, if not given)
    seeds: int = 3               # evaluation seeds: scenes, absent objects, noise, transforms, sampling
    n_scenes: int = 300          # POPE scenes per split and seed: one yes and one no question each
    n_captions: int = 200        # CHAIR captions per seed
    caption_tokens: int = 40     # one fixed caption length for every method
    alpha: float = 1.0           # VCD contrast strength
    beta: float = 0.1            # plausibility cut
    noise_step: int = 500        # VCD's diffusion step (of 1000)
    kappa: float = 1.0           # RITUAL: weight of the transformed image's logits
    m3id_lambda: float = 0.02    # M3ID: how fast its contrast grows with the tokens generated
    deco_alpha: float = 0.6      # DeCo: weight of the anchor layer's logits
    deco_top_k: int = 20         # DeCo: candidates, the final logits' top k ...
    deco_top_p: float = 0.9      # ... then top p
    device: str = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps

    def __post_init__(self):
        at_least(self, 1, "seeds", "n_scenes", "n_captions", "caption_tokens", "deco_top_k")
        at_least(self, 0, "alpha", "kappa", "m3id_lambda", "deco_alpha")
        if not 0 < self.deco_top_p <= 1:
            raise UserError(f"deco_top_p={self.deco_top_p} must be in (0, 1]")
        if not 0 < self.beta <= 1:
            raise UserError(f"beta={self.beta} must be in (0, 1]")
        if not 0 <= self.noise_step < 1000:
            raise UserError(f"noise_step={self.noise_step} must be in [0, 1000)")
        if self.pope_file and not self.data_path:
            raise UserError("--pope_file asks about a folder's images: give --data_path=DIR too")
        for key in ("ckpt", "control_ckpt", "halved_ckpt"):  # trained weights by name: their path
            if getattr(self, key, ""):
                setattr(self, key, str(weights_path(getattr(self, key))))


# ---------------------------------------------------------------------------------------------
# POPE and CHAIR for one method and seed

@torch.no_grad()
def ask(model, data, images, questions, method, study, gen, device, batch_size=200):
    """Each question about its own image (uint8 (N, H, W, 3)), answered by a decoding method in at most
    three tokens -> (the raw answers, the first step's scores (V,) each). What POPE, BEAF and the map
    ask with."""
    raws, firsts = [], []
    for k in range(0, len(questions), batch_size):
        prompt = data.encode(questions[k:k + batch_size], left_pad=True).to(device)
        imgs = to_tensor(images[k:k + batch_size], device)  # (b, 3, H, W)
        tokens, first, _ = decode(model, imgs, prompt, method, study, 3, gen)
        raws += model.texts(tokens)
        firsts += list(first)
    return raws, firsts


def pope_sets(data, study, seed, stats):
    """POPE's three splits made from the val objects, and the user's own question file when given ->
    {set: [(split, image, question, label, question_id)]}, the file's split by split."""
    sets = {}
    for split in POPE_SPLITS:
        qs = pope_questions(data.objects("val"), split, study.n_scenes, seed, *stats)
        sets[split] = [("val", i, data.exist_question(o), label, k) for k, (i, o, label) in enumerate(qs)]
    if study.pope_file:
        sets["file"] = read_pope_file(study.pope_file, data.records["train"] + data.records["val"])
    return sets


def yes_no_tokens(tok):
    """The first tokens of " yes" and " no", which the P(yes) vs P(no) reading compares; None where
    both start with the same token (a folder model's tokenizer from before its texts kept their
    leading space: " yes" was " " + "yes"), so that the reading cannot tell them apart."""
    yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
    return None if yes == no else (yes, no)


def by_prob(scores, yes_no):
    """The P(yes) vs P(no) reading of one answer's first-step scores (None where it cannot be made)."""
    if yes_no is None:
        return None
    return "yes" if scores[yes_no[0]] > scores[yes_no[1]] else "no"


def pope_run(model, data, name, method, study, seed, stats, gen, device):
    """POPE on the three splits (and a question file) -> (flat dict of figures, one record per question)."""
    yes_no = yes_no_tokens(model.tok)
    out, records = {}, []
    for split, qs in pope_sets(data, study, seed, stats).items():
        mine = []
        for part in ("train", "val"):  # a batch reads images of one split
            asked = [q for q in qs if q[0] == part]
            images = data.images(part)[np.array([q[1] for q in asked], dtype=int)]
            raws, firsts = ask(model, data, images, [q[2] for q in asked], method, study, gen, device)
            mine += [{"scene": q[1], "split": split, "question": q[2], "label": q[3], "question_id": q[4],
                      "method": name, "seed": seed, "parsed": parse_yes_no(raw), "raw": raw,
                      "by_prob": by_prob(s, yes_no)} for q, raw, s in zip(asked, raws, firsts)]
        records += mine
        labels = [r["label"] for r in mine]
        by_text = pope_metrics(labels, [r["parsed"] for r in mine])
        out.update({f"pope_{split}_{k}": v for k, v in by_text.items()})
        by_rule = pope_metrics(labels, [pope_rule(r["raw"]) for r in mine])
        out.update({f"pope_{split}_rule_{k}": by_rule[k] for k in ("accuracy", "f1")})  # as papers report
        if yes_no is not None:
            read = pope_metrics(labels, [r["by_prob"] for r in mine])
            out.update({f"pope_{split}_prob_{k}": v for k, v in read.items() if k != "unparsable"})
    return out, records


@torch.no_grad()
def chair_run(model, data, method, study, seed, gen, device, batch_size=200):
    """CHAIR on captions of study.caption_tokens tokens -> flat dict of figures, a few captions kept."""
    rng = np.random.default_rng([seed, 7])
    pool = np.array([i for i, objs in enumerate(data.objects("val")) if objs is not None])  # annotated
    scenes = pool[rng.choice(len(pool), size=min(study.n_captions, len(pool)), replace=False)]
    texts = []
    for k in range(0, len(scenes), batch_size):
        idx = scenes[k:k + batch_size]
        b = data.make_batch("val", idx, [(CAPTION_PROMPT, "")] * len(idx), device)
        tokens, _, _ = decode(model, b["images"], b["prompt"], method, study, study.caption_tokens, gen,
                              image_index=b["image_index"])
        texts += model.texts(tokens)
    out = chair_of(data, "val", scenes, texts)
    out["captions"] = dict(zip(map(int, scenes[:8]), texts[:8]))
    return out


def run_method(model, data, name, method, study, seed, stats, device):
    """POPE, then CHAIR, for one method and seed (one random stream for both) -> (figures, records)."""
    gen = torch.Generator().manual_seed(seed)
    figures, records = pope_run(model, data, name, method, study, seed, stats, gen, device)
    figures.update(chair_run(model, data, method, study, seed, gen, device))
    return figures, records


@torch.no_grad()
def image_attention(model, images, prompt, answer, image_index=None):
    """For each answer token: the share of attention (mean over layers and heads) that the position
    predicting it pays to the image tokens (mae.Attention.weights, block by block)."""
    x, key_valid, n_prefix = model.sequence(model.image_tokens(images, image_index), prompt, answer)
    mask = vlm.prefix_lm_mask(key_valid, n_prefix)  # (B, 1, S, S)
    n_img = x.shape[1] - prompt.shape[1] - answer.shape[1]
    states, shares = [], []
    model.run(x, mask, states=states)
    for blk, block_input in zip(model.blocks, states):
        w = blk.attn.weights(blk.norm1(block_input), mask)  # (B, h, S, S): the attention blk used
        shares.append(w[..., :n_img].sum(-1).mean(1))  # (B, S)
    return vlm.answer_positions(torch.stack(shares).mean(0), answer.shape[1])  # (B, A)


# ---------------------------------------------------------------------------------------------
# The study: models, the table, the pictures

STUDY_CONF = Path(__file__).parent / "config/vlm_study.conf"
# the world each is trained on: the study's, the unbiased control, and (for study/cures.py) the bias halved
STUDY_MODELS = {"biased": [], "unbiased": ["--cooccur=0", "--skew=0"], "halved": ["--cooccur=0.45"]}


def study_args(name, data_path=""):
    """The `train.py vlm` arguments of the study's model `name` (its folder aside)."""
    world = ["--dataset=folder", f"--data_path={data_path}"] if name == "folder" else STUDY_MODELS[name]
    return [str(STUDY_CONF), *world]


def vlm_configs(args):
    """`train.py vlm ARGS`'s configs, every key and value checked -> (TrainConfig, vlm.Config)."""
    import train  # the study's deliberate use of the loop: it trains its own models
    _, tc, mc, _ = train.configs("vlm", args)
    return tc, mc


def check_study_checkpoint(path, world=True):
    """A VLM the study can ask, or a one-line error: it answers (the prefix objective, not mlm) and, with
    world, it was trained on the shapes world (the study's scenes are the world's) -> its model config."""
    model = load_checkpoint(path, "vlm")["config"]["model"]
    if model["objective"] != "prefix":
        raise UserError(f"{path} is an --objective={model['objective']} model; the study asks questions of "
                        f"one that answers (--objective=prefix)")
    if world and model["dataset"] != "shapes":
        raise UserError(f"{path} was trained on the folder {model['data_path']}; here the shapes world's "
                        f"model is needed")
    return model


def study_n_eval(path, out_dir, name):
    """How many val scenes the study's model will have, known before anything trains."""
    path = Path(path or Path(out_dir) / name / "ckpt.pt")
    if path.exists():
        return check_study_checkpoint(path)["n_eval"]
    return vlm_configs(study_args(name))[1].n_eval


def train_or_finish(folder, args, what):
    """`python train.py vlm ARGS` into folder, unless a finished run is there; an interrupted one is
    finished -> the checkpoint's path."""
    import train  # the study's deliberate use of the loop: it trains its own models
    left = run_left("vlm", args, folder)
    if left:
        print(f"{'finishing' if '--init_from=resume' in left else 'training'} {what}: "
              f"python train.py {' '.join(left)}", flush=True)
        train.main(left)
    return Path(folder) / "ckpt.pt"


def study_model(path, out_dir, name, device, data_path=""):
    """A trained VLM from `path`, or the study's config trained into out_dir/name first."""
    path = Path(path or Path(out_dir) / name / "ckpt.pt")
    if path.parent == Path(out_dir) / name:  # the study's own: train it, or finish an interrupted run
        train_or_finish(path.parent, study_args(name, data_path), f"the study's {name} model")
    _, model, cfg, ckpt = load_model("vlm", path, device)
    if cfg.objective != "prefix":
        raise UserError(f"{path} is an --objective={cfg.objective} model; "
                        f"POPE and CHAIR need one that answers")
    return model, cfg, ckpt


def mean_std(rows, key):
    v = np.array([r[key] for r in rows])
    return float(v.mean()), float(v.std())


COLUMNS = []  # (key, header): each POPE split's accuracy, F1 and yes ratio, then CHAIR
for s in POPE_SPLITS:
    COLUMNS += [(f"pope_{s}_accuracy", f"{s[:3]} acc"), (f"pope_{s}_f1", f"{s[:3]} f1"),
                (f"pope_{s}_yes_ratio", f"{s[:3]} yes")]
COLUMNS += [("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("recall", "recall")]
FILE_COLUMNS = [("pope_file_accuracy", "file acc"), ("pope_file_f1", "file f1"),
                ("pope_file_rule_accuracy", "file rule acc")]  # --pope_file's questions


def table(results, columns=COLUMNS, plain=()):
    """{method: [figures per seed]} -> a markdown table of mean ± spread (std over seeds), in %
    but for the keys in `plain`."""
    lines = ["| method | " + " | ".join(label for _, label in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, rows in results.items():
        cells = []
        for key, _ in columns:
            m, s = mean_std(rows, key)
            cells.append(f"{m:.2f} ± {s:.2f}" if key in plain else f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bars(results, path):
    names = list(results)
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.5))
    panels = (("pope_random_f1", "POPE F1, random"), ("pope_adversarial_f1", "POPE F1, adversarial"),
              ("chair_i", "CHAIR_i (lower is better)"))
    for ax, (key, title) in zip(axes, panels):
        m = [100 * mean_std(results[n], key)[0] for n in names]
        s = [100 * mean_std(results[n], key)[1] for n in names]
        colours = ["tab:gray" if "unbiased" in n else "tab:blue" for n in names]
        ax.barh(range(len(names)), m, xerr=s, color=colours)
        ax.set(yticks=range(len(names)), title=title)
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    savefig(fig, path)


@torch.no_grad()
def greedy_and_vcd_captions(model, data, study, device, n=400):
    """The first n val scenes captioned greedily and with VCD -> (batch, greedy texts, VCD texts)."""
    idx = np.arange(min(len(data.shapes["val"]), n))
    b = data.make_batch("val", idx, [(CAPTION_PROMPT, "")] * len(idx), device)
    gen = torch.Generator().manual_seed(0)
    texts = []
    for name in ("greedy", "VCD (greedy)"):
        tokens = decode(model, b["images"], b["prompt"], METHODS[name], study, study.caption_tokens, gen,
                        image_index=b["image_index"])[0]
        texts.append(model.texts(tokens))
    return b, *texts


def caption_grid(val, greedy, vcd, show, path):
    """Scenes with their greedy and VCD captions under them, hallucinated shapes marked."""
    texts = [f"val {i}\ngreedy: {marked(greedy[i], val.scene(i))}\nVCD: {marked(vcd[i], val.scene(i))}"
             for i in show]
    draw_grid(val.images[show], texts, path, cols=len(show),
              footer="[shape✗] = a shape the scene does not have (counted per shape, so of two 'squares' "
                     "where there is one, the second is marked)")


@torch.no_grad()
def attention_plot(model, data, b, greedy, bad, good, path):
    """The attention each caption token pays to the image: a hallucinated caption beside a correct one."""
    val = data.shapes["val"]
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    for i, label in ((bad, "hallucinated"), (good, "correct")):
        answer = data.encode([greedy[i]], left_pad=False).to(b["prompt"].device)
        row = slice(i, i + 1)
        share = image_attention(model, b["images"], b["prompt"][row], answer, b["image_index"][row])[0]
        words = [model.tok.token_str(t).strip() for t in answer[0].tolist()]
        ax.plot(share.cpu().numpy(), "o-", label=f"{label} (val {i})")
        for x, (w, y) in enumerate(zip(words, share.tolist())):
            bad_word = label == "hallucinated" and w in SHAPES and SHAPES.index(w) not in val.scene(i)[:, 0]
            ax.annotate(w, (x, y), fontsize=6, rotation=60, color="red" if bad_word else "black")
    ax.set(xlabel="caption token", ylabel="attention on image tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    savefig(fig, path)


def pictures(model, data, study, device, out_dir, n=6):
    """Scenes where greedy decoding hallucinates (and correct ones), and the attention of one of each
    -> (files written, captions looked at, how many hallucinate)."""
    val = data.shapes["val"]
    b, greedy, vcd = greedy_and_vcd_captions(model, data, study, device)
    bad = [i for i in range(len(greedy)) if chair([greedy[i]], [val.scene(i)])["chair_s"] > 0]
    good = [i for i in range(len(greedy)) if greedy[i] == caption(val.scene(i))]
    written = []
    if bad or good:
        caption_grid(val, greedy, vcd, (bad + good)[:n], Path(out_dir) / "captions.png")
        written.append("captions.png")
    if bad and good:
        attention_plot(model, data, b, greedy, bad[0], good[0], Path(out_dir) / "attention.png")
        written.append("attention.png")
    return written, len(greedy), len(bad)


def write_pope_files(data, records, folder):
    """Seed 0's questions and every method's answers in POPE's own formats (RUCAIBox/POPE): per split a
    question file {question_id, image, text, label} a line, and per method an answer file {question_id,
    text, answer}, read by POPE's evaluate.py as a paper's are (a --pope_file's answers: file_*)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [r["file_name"] for r in data.records["val"]] if hasattr(data, "records") else None
    for split in dict.fromkeys(r["split"] for r in records):
        rows = [r for r in records if r["split"] == split and r["seed"] == 0]
        first = [r for r in rows if r["method"] == rows[0]["method"]]
        if split != "file":  # the user's question file is theirs already
            with open(folder / f"{split}_questions.jsonl", "w") as f:
                for r in first:
                    image = names[r["scene"]] if names else f"val/{r['scene']}"
                    line = {"question_id": r["question_id"], "image": image, "text": r["question"]}
                    f.write(json.dumps({**line, "label": r["label"]}) + "\n")
        for method in dict.fromkeys(r["method"] for r in rows):
            slug = "".join(c if c.isalnum() else "_" for c in method).strip("_")
            with open(folder / f"{split}_{slug}_answers.jsonl", "w") as f:
                for r in (r for r in rows if r["method"] == method):
                    answer = {"question_id": r["question_id"], "text": r["raw"], "answer": r["raw"]}
                    f.write(json.dumps(answer) + "\n")  # text: LLaVA's key; answer: POPE's own


def check_study(study, out_dir):
    """Every setting checked before any model trains or anything is written."""
    check_writable(out_dir)
    if study.data_path:  # a user's folder: read and checked now, and the model must be of it
        records = read_folder(study.data_path)
        if study.pope_file:
            read_pope_file(study.pope_file, records)
        model_cfg = load_checkpoint(study.ckpt, "vlm")["config"]["model"] if study.ckpt else None
        if model_cfg and Path(model_cfg.get("data_path") or ".").resolve() != Path(study.data_path).resolve():
            raise UserError(f"{study.ckpt} was not trained on {study.data_path} (its data: "
                            f"{model_cfg.get('data_path') or 'the shapes world'}); its words are that data's")
        return
    for name, path in (("biased", study.ckpt), ("unbiased", study.control_ckpt)):
        n_eval = study_n_eval(path, out_dir, name)
        if study.n_scenes > n_eval:
            raise UserError(f"n_scenes={study.n_scenes}: the {name} model's val split has {n_eval} scenes")
    prompt = len(shapes_tokenizer().encode(" " + CAPTION_PROMPT))
    if prompt + study.caption_tokens > vlm.MAX_TEXT:
        raise UserError(f"caption_tokens={study.caption_tokens}: the model reads at most {vlm.MAX_TEXT} text "
                        f"tokens, {prompt} of them the caption prompt; "
                        f"use --caption_tokens={vlm.MAX_TEXT - prompt} or less")


def main(argv):
    if "-h" in argv or "--help" in argv:
        return usage(__doc__.split("\n\n")[0] + "\n" + config_help(StudyConfig), argv)
    study = StudyConfig(**parse_overrides(argv, StudyConfig))
    device, out_dir = pick_device(study.device), Path(study.out_dir)
    check_study(study, out_dir)
    model, cfg, ckpt = study_model(study.ckpt, out_dir, "folder" if study.data_path else "biased", device,
                                   study.data_path)
    data = vlm.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    stats = object_stats(data.objects("train"), len(data.vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(name, model, m) for name, m in METHODS.items()]
    if not study.data_path:  # the data-side control: the same recipe on the unbiased world
        runs.append(("unbiased data, greedy", study_model(study.control_ckpt, out_dir, "unbiased", device)[0],
                     METHODS["greedy"]))
    results, records, timing = {}, [], {}
    t_start = time.time()
    for name, m_model, method in runs:
        t0 = time.time()
        results[name] = []
        for seed in range(study.seeds):
            figures, recs = run_method(m_model, data, name, method, study, seed, stats, device)
            results[name].append(figures)
            records += recs
        timing[name] = time.time() - t0
        r = results[name]
        print(f"{name:<30} POPE acc random {100 * mean_std(r, 'pope_random_accuracy')[0]:.1f} "
              f"adversarial F1 {100 * mean_std(r, 'pope_adversarial_f1')[0]:.1f} | CHAIR_i "
              f"{100 * mean_std(r, 'chair_i')[0]:.1f} | {timing[name]:.0f} s", flush=True)
    print(f"\n{table(results, COLUMNS + (FILE_COLUMNS if study.pope_file else []))}\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"config": asdict(study), "checkpoint": str(study.ckpt or out_dir / "biased/ckpt.pt"),
         "world": {"cooccur": cfg.cooccur, "skew": cfg.skew}, "methods": results, "seconds": timing,
         "shape_frequency": stats[0].tolist(), "cooccurrence": stats[1].tolist()}, indent=1))
    with open(out_dir / "pope.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    plot_bars(results, out_dir / "methods.png")
    write_pope_files(data, records, out_dir / "pope")
    written, seen = [], ""
    if not study.data_path:  # the pictures read the shapes world's scenes
        written, n_captions, n_bad = pictures(model, data, study, device, out_dir)
        seen = f"{n_bad} of {n_captions} greedy captions hallucinate; "
    files = ", ".join(["results.json", "pope.jsonl", "pope/", "methods.png", *written])
    print(f"{seen}wrote {files} to {out_dir} in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    cli(main)
