"""Checkpoints and the folders they live in: written atomically, read with weights_only=True (a
checkpoint never runs code), checked for their idea, and a run's folder locked while it trains.

nanochat keeps the same beside its common.py, in checkpoint_manager.py.
"""
import dataclasses
import errno
import os
from dataclasses import asdict
from pathlib import Path

import torch

from data.bpe import Tokenizer
from lib.common import UserError, check_writable, load_idea, written_whole

CKPT_KEYS = ("model", "optimizer", "scaler", "config", "iter", "best_val_loss", "rng", "history")
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # trained models a class can start from


def save_atomic(obj, path):
    """torch.save(obj), or a str's text, to path: whole or not at all, and a full disk is one line."""
    try:
        with written_whole(path) as tmp:  # a crash mid-write never leaves a half checkpoint behind
            if isinstance(obj, str):
                Path(tmp).write_text(obj)
            else:
                torch.save(obj, tmp)
    except RuntimeError as e:  # torch's writer says only "unexpected pos ..." when the disk is full
        if "inline_container" not in str(e):
            raise
        raise OSError(errno.ENOSPC, "torch could not finish writing it (a full disk?)", str(path)) from None


def weights_path(path):
    """A checkpoint's path, or the bare name of a model in weights/: `--ckpt=vlm` reads weights/vlm.pt
    where there is no file of that name."""
    path, named = Path(path), WEIGHTS / f"{Path(path).name}.pt"
    return named if not path.is_file() and path.suffix == "" and named.is_file() else path


def load_checkpoint(path, idea, also=()):
    """A checkpoint of `idea` (a run's, or trained weights from weights/), or a one-line error:
    missing, unreadable, or another idea's (ideas in `also` are welcome too)."""
    path = weights_path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first (python train.py {idea}) or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint at all, ...
        raise UserError(f"cannot read checkpoint {path}: {e.__class__.__name__}") from None
    if not isinstance(ckpt, dict) or "idea" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    if ckpt["idea"] != idea and ckpt["idea"] not in also:
        raise UserError(f"{path} is a {ckpt['idea']!r} checkpoint, not {idea!r}")
    missing = [k for k in (("model", "config") if ckpt.get("weights_only") else CKPT_KEYS) if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or set(ckpt["config"]) != {"train", "model"}:
        what = ", ".join(missing) or "its config"
        raise UserError(f"{path} lacks {what}: not a complete train.py checkpoint")
    return ckpt


def load_encoder(vit, path, flag):
    """Copy the encoder of a checkpoint of `train.py mae` (or `mim`, or `clip`'s image tower) into a ViT
    (mae.ViTEncoder): a tower that starts from what the MAE learned. flag: the option that named
    path, for the error."""
    state = load_checkpoint(path, "mae", ("mim", "clip"))["model"]
    weights = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    own = vit.state_dict()
    for k in [*own, *sorted(weights.keys() - own.keys())]:  # the tower's own first, then what it lacks
        if k not in weights or k not in own or weights[k].shape != own[k].shape:
            got = tuple(weights[k].shape) if k in weights else "nothing"
            want = tuple(own[k].shape) if k in own else "nothing"
            raise UserError(f"{flag}={path}: encoder.{k} is {got} there, {want} here; match "
                            f"img_size, patch_size and vision_n_layer/n_head/n_embd to the MAE's")
    vit.load_state_dict(weights)


def run_left(idea, args, folder):
    """What `python train.py idea ARGS` into folder still has to do -> the train.py arguments: the whole
    run where folder holds no checkpoint, a resume where the run there was interrupted, none ([]) where
    it finished. The one "train it, or finish it" that the VLM's MAE and the study's models share."""
    path = Path(folder) / "ckpt.pt"
    if not path.exists() and (Path(folder) / "ckpt_best.pt").exists():
        raise UserError(f"{folder} holds ckpt_best.pt but no ckpt.pt: a run continues only from its latest "
                        f"checkpoint; move that folder away to train it again")
    if not path.exists():
        return [idea, *args, f"--out_dir={folder}"]
    ckpt = load_checkpoint(path, idea)
    if ckpt["iter"] < ckpt["config"]["train"]["max_iters"]:  # interrupted: finish it
        return [idea, "--init_from=resume", f"--out_dir={folder}"]
    return []


def without_init(cfg):
    """The config with every init_* key (where training started from) emptied: a checkpoint's weights
    replace them, so loading or resuming never needs those files again."""
    empty = {f.name: "" for f in dataclasses.fields(cfg) if f.name.startswith("init_")}
    return dataclasses.replace(cfg, **empty)


def config_from(module, ckpt):
    """A checkpoint's model config as the idea's Config, or a one-line error if this code changed."""
    try:
        return module.Config(**ckpt["config"]["model"])
    except TypeError as e:  # a key this version does not know
        raise UserError(f"the checkpoint's config does not fit this code ({e})") from None


def saved_tokenizer(ckpt):
    """The words a checkpoint's model was trained with -> {"tokenizer": Tokenizer} for its Model, or {}
    (an idea without words, or a checkpoint from before checkpoints carried them)."""
    if ckpt is None or ckpt.get("tokenizer") is None:
        return {}
    return {"tokenizer": Tokenizer.from_state(ckpt["tokenizer"])}


def load_model(idea, path, device="cpu"):
    """-> (module, model in eval mode on `device`, its Config, the checkpoint). The model reads with the
    tokenizer it was trained with, whatever its data holds now."""
    module = load_idea(idea)
    ckpt = load_checkpoint(path, idea)
    cfg = config_from(module, ckpt)
    try:
        model = module.Model(without_init(cfg), **saved_tokenizer(ckpt))
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"the checkpoint does not fit this code: {str(e).splitlines()[0]}") from None
    return module, model.to(device).eval(), cfg, ckpt



def export_weights(idea, src, dst, device="cpu"):
    """A run's checkpoint -> trained weights a class can start from: the model in half precision, its
    config and its words, no optimizer (a few MB), and the idea's monitor measured on those very
    weights, which `check_weights` must find again -> that figure."""
    ckpt = load_checkpoint(src, idea)
    half = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    keep = {k: ckpt.get(k) for k in ("config", "tokenizer", "data_fingerprint", "iter", "best_val_loss")}
    out = {"idea": idea, "weights_only": True, "model": half, **keep}
    out["check"] = check_weights(idea, out, device)
    save_atomic(out, dst)
    return out["check"]


def check_weights(idea, ckpt, device="cpu"):
    """What the idea's monitor says of a checkpoint's model (as it loads: half precision read back
    into float32) -> its figures, {} for an idea without a monitor."""
    module = load_idea(idea)
    if not hasattr(module, "monitor"):
        return {}
    model = module.Model(without_init(config_from(module, ckpt)), **saved_tokenizer(ckpt))
    model.load_state_dict(ckpt["model"])
    data = module.Data(model.cfg, seed=ckpt["config"]["train"]["seed"], verbose=False)
    with torch.random.fork_rng(devices=[]):
        return module.monitor(model.to(device), data, device)


# ---------------------------------------------------------------------------------------------
# A run's folder

def check_out_dir(out_dir, fresh):
    """Before anything is written: out_dir must be (or become) a writable folder, and a run from
    scratch never lands on a trained checkpoint."""
    check_writable(out_dir)
    old = [n for n in ("ckpt.pt", "ckpt_best.pt") if (Path(out_dir) / n).exists()]
    if fresh and old:
        raise UserError(f"{out_dir} already holds {' and '.join(old)}; continue it with --init_from=resume, "
                        f"or train into another --out_dir (or delete the old one)")


def lock_out_dir(out_dir, fresh):
    """Every check has passed: make out_dir and hold an exclusive lock on it for this process's
    lifetime (the OS drops it if we die), so a second run into the same folder is refused instead
    of racing this one; then check it again, under the lock. -> the held handle."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; unique temp names still keep saves whole
        check_out_dir(out_dir, fresh)
        return None
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another run is training in {out_dir}; "
                        f"wait for it, or use another --out_dir") from None
    check_out_dir(out_dir, fresh)
    for tmp in Path(out_dir).glob("*.pt.*.tmp"):  # under the lock, these are dead writers' leftovers
        tmp.unlink()
    return fd


def check_resume_shapes(model, ckpt, model_cfg):
    """A resume whose config changes a parameter's shape fails here, naming the key and both values."""
    own = model.state_dict()
    old = ckpt["config"]["model"]
    for name, saved in ckpt["model"].items():
        if name in own and own[name].shape != saved.shape:
            changed = [f"{k}={v} (checkpoint: {old[k]})" for k, v in asdict(model_cfg).items()
                       if k in old and old[k] != v]
            raise UserError(f"cannot resume: {', '.join(changed) or name} changes the shape of {name} "
                            f"from {tuple(saved.shape)} to {tuple(own[name].shape)}; drop the override "
                            f"or start a new --out_dir")
    missing = sorted(set(own) ^ set(ckpt["model"]))
    if missing:
        raise UserError(f"cannot resume: the checkpoint's weights do not match this model "
                        f"({missing[0]}, ...)")


def main(argv):
    """python -m lib.checkpoints IDEA RUN/ckpt.pt weights/NAME.pt: a run's model as trained weights."""
    from lib.config import usage
    if len(argv) != 3 or "-h" in argv or "--help" in argv:
        return usage("usage: python -m lib.checkpoints IDEA RUN/ckpt.pt weights/NAME.pt   (a run's model "
                     "as weights a class can start from: half precision, no optimizer)", argv)
    idea, src, dst = argv
    if Path(dst).suffix != ".pt" or not Path(dst).parent.is_dir():
        raise UserError(f"{dst}: give a .pt path in an existing folder")
    check_writable(Path(dst).parent)
    figures = export_weights(idea, src, dst)
    size = Path(dst).stat().st_size / 2 ** 20
    print(f"wrote {dst} ({size:.1f} MB); on these weights: {figures or 'no monitor for ' + idea}")
    return 0


if __name__ == "__main__":
    from lib.config import cli
    cli(main)
