"""Look at what a trained model does: `python sample.py mae|mim|mlm|vlm|clip|gen [--key=value ...]`.

mae: a PNG grid, one row per held-out scene (or --image=PATH[,PATH...]):
     original | masked | reconstruction | reconstruction with the visible patches pasted back,
     and the masked-patch loss of each image printed.
mim: the same, with the model's own masking (colour, hard, attention); a tokens model paints each
     hidden patch with its predicted code's patch; a features model has no pixels to show.
     `python sample.py masks RUN_DIR ... OUT.png` draws several runs' masks on the same scenes.
mlm: --prompt="a red [MASK] and a blue square" prints the top candidates for each blank;
     --generate writes text from an all-[MASK] sequence (or fills the prompt's blanks) and shows
     the intermediate steps, so you see the text appear.
vlm: held-out scenes (--scenes=0,5,9 of --split=val|ood) or --image=PATH[,PATH...] with --prompt
     (default: describe the image.); prints each answer and saves a PNG grid with prompt and answer
     under each image. An --objective=mlm model fills the [MASK] blanks of a caption instead.
clip: the same scenes (or --image), each with its three best captions among the split's, and the true one.
gen: scenes drawn from those scenes' captions (or --prompt="a large red circle"; --steps, --temperature,
     --method=maskgit|mdlm),
     each with what the world's reader finds in it.
"""
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from data import to_tensor
from data.pairs import CAPTION_PROMPT
from lib.checkpoints import load_model
from lib.common import (UserError, at_least, check_writable, draw_grid, load_idea, one_of, pick_device,
                        pyplot, savefig)
from lib.config import cli, config_help, parse_overrides, usage


@dataclass
class SampleConfig:
    out_dir: str = ""              # where the checkpoint is, and the pictures go; default out-<idea>
    ckpt: str = "ckpt_best.pt"     # or ckpt.pt, the latest; or the name of trained weights (weights/NAME.pt)
    device: str = "auto"           # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    seed: int = 0                  # for sampling and for the masks
    n: int = 8                     # how many held-out examples
    image: str = ""                # mae, vlm, clip: your own image file(s), comma-separated
    scenes: str = ""               # vlm, clip: held-out scene indices, comma-separated (default: the first n)
    split: str = "val"             # vlm, clip: val (the world's bias) | ood (no bias); a folder: train|val
    mask_ratio: float = -1.0       # mae: -1 = the ratio the model trained with
    prompt: str = ""               # mlm: text with [MASK] blanks; vlm: the question; gen: a caption
    generate: bool = False         # mlm: write text by unmasking
    method: str = "maskgit"        # mlm, gen: maskgit (the most confident first) | mdlm (a random order)
    steps: int = 16                # mlm, gen: unmasking steps
    temperature: float = 1.0       # sampling temperature; 0 = the most likely token
    top_k: int = 0                 # 0 = no cut; --prompt shows max(top_k, 5) candidates

    def __post_init__(self):
        at_least(self, 1, "n", "steps")
        at_least(self, 0, "top_k", "temperature")
        if self.mask_ratio != -1 and not 0 <= self.mask_ratio < 1:
            raise UserError(f"mask_ratio={self.mask_ratio} must be in [0, 1), or -1 for the model's own")
        one_of(self, "split", ("train", "val", "ood"))
        one_of(self, "method", ("maskgit", "mdlm"))
        pick_device(self.device)


def load(idea, opts):
    """The run's checkpoint, checked, and out_dir checked writable before any work -> load_model's
    (module, model, cfg, ckpt). The best checkpoint falls back to the latest where it is missing
    (a run stopped before its first evaluation finished writing it)."""
    out_dir = Path(opts.out_dir or f"out-{idea}")
    path = out_dir / opts.ckpt
    if opts.ckpt == "ckpt_best.pt" and not path.exists() and (out_dir / "ckpt.pt").exists():
        print(f"no {path}; using {out_dir / 'ckpt.pt'}, the latest")
        path = out_dir / "ckpt.pt"
    loaded = load_model(idea, path, pick_device(opts.device))
    check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # trained weights by name: the pictures go to out-<idea>
    return loaded


def as_pixels(model, cfg, pred, target):
    """What the decoder said of each patch, as pixels (N, L, p*p*3): norm-pix predictions with each
    patch's own statistics put back (as the MAE demo does), a code's patch, or None (features)."""
    kind = getattr(cfg, "target", "norm_pix")  # mim.py's; an MAE's is norm_pix or pixels
    if kind == "tokens":
        return model.codebook[pred.argmax(-1)]
    if kind == "features":
        return None
    if cfg.norm_pix_loss:
        return pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    return pred


@torch.no_grad()
def sample_mae(opts, idea="mae"):
    from data.images import load_image
    from mae import patchify, unpatchify
    module, model, cfg, ckpt = load(idea, opts)
    device = next(model.parameters()).device
    if opts.image:
        paths = opts.image.split(",")
        images = np.stack([load_image(p, cfg.img_size) for p in paths])
        names = [Path(p).name for p in paths]
    else:
        data = module.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False)
        images = data.images["val"][:opts.n]
        names = [f"val {i}" for i in range(len(images))]
    imgs = to_tensor(images, device)  # (N, 3, H, W)
    torch.manual_seed(opts.seed)
    ratio = cfg.mask_ratio if opts.mask_ratio < 0 else opts.mask_ratio
    noise = model.mask_scores(imgs) if idea == "mim" else None  # mim.py's maskings score the patches
    latent, mask, ids_restore = model.encoder(imgs, ratio, cfg.masking, noise)
    pred = model.forward_decoder(latent, ids_restore)  # (N, L, width)
    pred = pred[..., :-1] if cfg.masking == "hard" else pred  # HPM's last output: the predicted loss
    loss = model.forward_loss(imgs, pred, mask)  # (N,)
    p = cfg.patch_size
    target = patchify(imgs, p)
    said = as_pixels(model, cfg, pred, target)
    m = mask.unsqueeze(-1)  # (N, L, 1)
    panels = {"original": imgs, "masked": unpatchify(target * (1 - m) + 0.3 * m, p)}
    if said is not None:
        panels.update({"reconstruction": unpatchify(said, p),
                       "reconstruction + visible": unpatchify(target * (1 - m) + said * m, p)})
    for name, l in zip(names, loss.tolist()):
        print(f"{name}: masked-patch loss {l:.4f}")
    print(f"mean masked-patch loss {loss.mean().item():.4f} at mask ratio {ratio} ({cfg.masking})")
    N = len(names)
    fig, axes = pyplot().subplots(N, len(panels), figsize=(2 * len(panels), 2 * N + 0.4), squeeze=False)
    for r in range(N):
        for c, (title, x) in enumerate(panels.items()):
            ax = axes[r, c]
            ax.imshow(((x[r].permute(1, 2, 0).cpu().float() + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(f"{names[r]}\nloss {loss[r]:.3f}", fontsize=8)
    out = Path(opts.out_dir or f"out-{idea}") / f"sample_{idea}.png"
    savefig(fig, out)
    print(f"wrote {out}")


@torch.no_grad()
def sample_mlm(opts):
    from mlm import unmask
    _, model, cfg, _ = load("mlm", opts)
    tok, device = model.tok, next(model.parameters()).device
    if not opts.prompt and not opts.generate:
        raise UserError('give --prompt="text with [MASK]" and/or --generate')
    # BPE words carry their leading space (" circle"): "a [MASK]" must not leave a lone " " token
    prompt = opts.prompt if tok.kind == "char" else opts.prompt.replace(" [MASK]", "[MASK]")
    ids = tok.encode(prompt) if prompt else [tok.mask_id] * cfg.block_size
    if len(ids) > cfg.block_size:
        raise UserError(f"the prompt is {len(ids)} tokens; this model reads at most {cfg.block_size}")
    ids = torch.tensor([ids], device=device)

    def show(x):
        return tok.decode(x[0].tolist()).replace("[MASK]", "░")
    torch.manual_seed(opts.seed)
    if not opts.generate:  # one pass: the distribution at every blank
        probs = torch.softmax(model.logits(ids)[0] / max(opts.temperature, 1e-6), -1)  # (T, V)
        if not (ids == tok.mask_id).any():
            raise UserError("the prompt has no [MASK] to fill")
        print(f"most likely: {show(show_blanks(tok, ids[0], probs, max(opts.top_k, 5))[None])}")
        return
    print(f"step  0: {show(ids)}")
    out = unmask(model, ids, opts.steps, opts.method, opts.temperature, opts.top_k,
                 callback=lambda k, x: print(f"step {k:2d}: {show(x)}"))
    print(f"\n{show(out)}")


def show_blanks(tok, ids, probs, k, indent=""):
    """Print the k likeliest tokens at each [MASK] of ids (T,), given probs (T, V) -> ids, blanks filled."""
    for n, i in enumerate((ids == tok.mask_id).nonzero().flatten().tolist(), 1):
        p, top = probs[i].topk(k)
        candidates = ", ".join(f"{tok.token_str(t)!r} {q:.2f}" for t, q in zip(top.tolist(), p.tolist()))
        print(f"{indent}[MASK] #{n}: {candidates}")
    return torch.where(ids == tok.mask_id, probs.argmax(-1), ids)


def scene_images(opts, cfg, data):
    """-> (uint8 images (N, H, W, 3), names, scene indices or None) from --image or --scenes."""
    from data.images import load_image
    if opts.image:
        paths = opts.image.split(",")
        return np.stack([load_image(p, cfg.img_size) for p in paths]), [Path(p).name for p in paths], None
    try:
        idx = [int(i) for i in opts.scenes.split(",")] if opts.scenes else list(range(opts.n))
    except ValueError:
        raise UserError(f"--scenes={opts.scenes!r}: expected comma-separated scene numbers") from None
    if opts.split not in data.splits:
        raise UserError(f"--split={opts.split}: this model's data has the splits {', '.join(data.splits)}")
    n = data.n_images(opts.split)
    if not opts.scenes and opts.n > n:
        raise UserError(f"--n={opts.n}: the {opts.split} split has {n} scenes")
    if not all(0 <= i < n for i in idx):
        raise UserError(f"--scenes: the {opts.split} split has scenes 0 to {n - 1}")
    return np.stack([data.images(opts.split)[i] for i in idx]), [f"{opts.split} {i}" for i in idx], idx


@torch.no_grad()
def sample_vlm(opts):
    import vlm
    module, model, cfg, ckpt = load("vlm", opts)
    device, tok = next(model.parameters()).device, model.tok
    data = vlm.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    images, names, idx = scene_images(opts, cfg, data)
    imgs = to_tensor(images, device)
    prompt = opts.prompt or CAPTION_PROMPT
    torch.manual_seed(opts.seed)
    if cfg.objective == "mlm":  # fill the blanks of a caption, given each image
        if "[MASK]" not in prompt:
            raise UserError('an --objective=mlm model fills blanks: --prompt="a large [MASK] circle"')
        ids = data.encode([prompt.replace(" [MASK]", "[MASK]")] * len(names), left_pad=False).to(device)
        logits = model.logits(imgs, ids[:, :0], ids)[:, -ids.shape[1]:]  # (N, T, V): the text's positions
        probs = torch.softmax(logits / max(opts.temperature, 1e-6), -1)
        answers = []
        for r, name in enumerate(names):
            print(f"{name}:")
            filled = show_blanks(tok, ids[r], probs[r], max(opts.top_k, 5), indent="  ")
            answers.append(tok.decode([t for t in filled.tolist() if t != tok.pad_id]).strip())
            print(f"  most likely: {answers[-1]}")
    else:
        prompt_ids = data.encode([prompt] * len(names), left_pad=True).to(device)
        out = model.generate(imgs, prompt_ids, 40, opts.temperature, opts.top_k)
        answers = model.texts(out)
        for name, a in zip(names, answers):
            print(f"{name}: {a}")
    texts = [f"{name}\nQ: {prompt}\nA: {a}" for name, a in zip(names, answers)]
    if idx is not None:
        texts = [f"{t}\ntrue: {data.reference(opts.split, i)}" for t, i in zip(texts, idx)]
    out_path = Path(opts.out_dir or "out-vlm") / "sample_vlm.png"
    draw_grid(images, texts, out_path)
    print(f"wrote {out_path}")


@torch.no_grad()
def sample_clip(opts):
    """Each image's three best captions among every caption of the split (the candidates a retrieval
    chooses from), with their cosines, beside the true one; a PNG grid."""
    import clip
    _, model, cfg, ckpt = load("clip", opts)
    device = next(model.parameters()).device
    data = clip.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    images, names, idx = scene_images(opts, cfg, data.source)
    _, vectors, texts = clip.embed(model, data, opts.split, device)
    candidates = list(dict.fromkeys(texts))  # each caption once
    vectors = vectors[[texts.index(t) for t in candidates]]  # (C, E)
    model.eval()
    sims = model.encode_image(to_tensor(images, device)).float().cpu() @ vectors.T  # (N, C)
    best = sims.topk(min(3, len(candidates)), dim=1)
    lines = []
    for r, name in enumerate(names):
        said = [f"{v:.2f} {candidates[j]}" for v, j in zip(best.values[r].tolist(), best.indices[r].tolist())]
        true = [f"true: {texts[idx[r]]}"] if idx is not None else []
        lines.append("\n".join([name, *said, *true]))
        print(lines[-1].replace("\n", "\n  "))
    out_path = Path(opts.out_dir or "out-clip") / "sample_clip.png"
    draw_grid(images, lines, out_path)
    print(f"wrote {out_path}")


def sample_gen(opts):
    """Scenes drawn from held-out captions (--split, --n or --scenes) or from --prompt (a caption of your
    own; "" draws unconditionally), each with what the world's reader finds in it; a PNG grid."""
    import gen
    from data.shapes import caption, read_scene
    _, model, cfg, ckpt = load("gen", opts)
    data = gen.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    if opts.split not in ("val", "ood"):
        raise UserError(f"--split={opts.split}: choose val or ood")
    if opts.prompt or opts.image:
        if opts.image:
            raise UserError("gen draws pictures; --image has nothing to do here (give --prompt=CAPTION)")
        texts, names = [opts.prompt] * opts.n, [f"asked: {opts.prompt}"] * opts.n
    else:
        _, _, idx = scene_images(opts, cfg, data.source)
        texts = [caption(data.shapes[opts.split].scene(i)) for i in idx]
        names = [f"{opts.split} {i}: {t}" for i, t in zip(idx, texts)]
    t0 = time.time()
    drawn = gen.draw(model, texts, opts.steps, opts.temperature, opts.seed, opts.method)
    seconds = time.time() - t0
    world = data.shapes[opts.split].world
    if not (opts.prompt or opts.image):  # held-out captions: judge the lot
        figures = gen.judge(world, drawn, [data.shapes[opts.split].scene(i) for i in idx])
        print(f"{len(drawn)} scenes, {opts.method}, {opts.steps} steps, temperature {opts.temperature}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
              + f"; {1000 * seconds / len(drawn):.1f} ms a scene")
    lines = []
    for name, img in zip(names[:16], drawn):  # the grid shows 16 at most
        objs, dist = read_scene(world, img)
        read = caption(objs) if len(objs) else "(nothing)"
        lines.append(f"{name}\ndrawn: {read}\nfarthest cell: {dist.max():.0f}")
        print(lines[-1].replace("\n", "\n  "))
    out_path = Path(opts.out_dir or "out-gen") / "sample_gen.png"
    draw_grid(drawn[:16], lines, out_path)
    print(f"wrote {out_path}")


@torch.no_grad()
def masks(argv):
    """python sample.py masks RUN_DIR [RUN_DIR ...] OUT.png: the masks of runs of `train.py mim` on the
    same held-out scenes, one column per run (its masking, its teacher or loss head), one row per scene."""
    from mae import patchify, unpatchify
    if len(argv) < 2 or Path(argv[-1]).suffix.lower() != ".png":
        raise UserError("give the run folders of train.py mim and then the .png to draw their masks into")
    *runs, png = argv
    check_writable(Path(png).parent)
    loaded = [load_model("mim", Path(run) / "ckpt_best.pt") for run in runs]  # each checked first
    module, _, cfg, ckpt = loaded[0]
    images = module.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).images["val"][:4]
    imgs = to_tensor(images, "cpu")  # (4, 3, H, W)
    fig, axes = pyplot().subplots(len(imgs), len(runs) + 1, figsize=(1.6 * (len(runs) + 1), 1.6 * len(imgs)),
                                  squeeze=False)
    columns = [("original", imgs)]
    for run, (_, model, run_cfg, _) in zip(runs, loaded):
        torch.manual_seed(0)
        _, mask, _ = model.encoder(imgs, run_cfg.mask_ratio, run_cfg.masking, model.mask_scores(imgs))
        m = mask.unsqueeze(-1)  # (4, L, 1): 1 = hidden, drawn grey
        target = patchify(imgs, run_cfg.patch_size)
        columns.append((f"{run_cfg.masking}\n{Path(run).name}", unpatchify(target * (1 - m) + 0.3 * m,
                                                                           run_cfg.patch_size)))
    for c, (title, x) in enumerate(columns):
        for r in range(len(imgs)):
            axes[r, c].imshow(((x[r].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[0, c].set_title(title, fontsize=8)
    savefig(fig, png)
    print(f"wrote {png}")
    return 0


SAMPLERS = {"mae": sample_mae, "mim": partial(sample_mae, idea="mim"), "mlm": sample_mlm,
            "vlm": sample_vlm, "clip": sample_clip, "gen": sample_gen}


def main(argv):
    if argv and argv[0] == "masks":
        return masks(argv[1:])
    if not argv or "-h" in argv or "--help" in argv:
        text = ("usage: python sample.py IDEA [--key=value ...]   IDEA: " + ", ".join(SAMPLERS) + "\n"
                "       python sample.py masks RUN_DIR [RUN_DIR ...] OUT.png   (runs of train.py mim: "
                "their masks on the same scenes)")
        return usage(text + "\n" + config_help(SampleConfig), argv)
    idea = argv[0]
    if idea not in SAMPLERS:
        load_idea(idea)  # the clear error for a misspelt idea
        raise UserError(f"sample.py has no sampler for {idea!r} yet")
    SAMPLERS[idea](SampleConfig(**parse_overrides(argv[1:], SampleConfig)))
    return 0


if __name__ == "__main__":
    cli(main)
