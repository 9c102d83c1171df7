"""A fused vision-language model: image patches and words in one Transformer.

An image is a foreign language (ViLT, Kim et al. 2021): a ViT (`mae.ViTEncoder`) turns the picture into
patch tokens, a small MLP projects them to the text width (LLaVA 1.5, nanoVLM), and one stack of the same
`mae.Block` reads [image tokens, prompt, answer]. As in PaliGemma's prefix-LM, the image and the prompt
attend to each other in both directions and the answer is causal; the loss counts answer tokens only, each
text (a caption or a one-word answer) weighing the same. Generation keeps each layer's keys and values (a
KV cache), so each new token costs one position, not the whole sequence.

`--objective=mlm` trains ViLT/UNITER's other task instead: the caption, masked as BERT masks
(`mlm.mask_tokens`), beside the image, everything attending to everything. It settles what `mlm.py` left
open: a masked colour cannot be known from the words, but it can from the pixels.

The shapes world is biased (some shapes bring a partner); `evaluate` asks questions and reads captions on
held-out scenes of the biased `val` split and of the `ood` split, where the bias is broken, and compares
attribute-word accuracy with the real image against a blank one: the language prior alone.
`hallucination.py` builds on `start`/`step`, which take any image, noised or blank."""
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.captioned import FolderPairs, folder_tokenizer, read_folder
from data.pairs import CAPTION_PROMPT, ShapesPairs, blank_like, length_groups, shapes_tokenizer
from data.shapes import COLOUR_NAMES, SHAPES, SIZES, caption, object_match, parse_caption, questions
from lib.checkpoints import load_checkpoint, load_encoder, run_left
from lib.common import UserError, at_least, divisible, f1, one_of
from mae import MAE, Block, ViTEncoder, get_1d_sincos_pos_embed, get_2d_sincos_pos_embed, init_weights
from mae import Config as MAEConfig
from mlm import filter_logits, mask_tokens, masked_loss, word_mask

MAX_TEXT = 128  # text positions (prompt + answer)


@dataclass
class Config:
    img_size: int = 64           # pixels a side
    patch_size: int = 8          # pixels a side of each patch
    dataset: str = "shapes"      # shapes (the world) | folder: --data_path=DIR (data/captioned.py)
    data_path: str = ""          # the folder, with --dataset=folder
    n_train: int = 20000         # training scenes (images, shared with `train.py mae`'s cache)
    n_captioned: int = 0         # 0 = every training scene has text; else only the first n (scarce labels)
    n_eval: int = 500            # held-out scenes per split (val, ood) for evaluation
    vision_n_layer: int = 0      # the tower (mae.ViTEncoder, train.py mae's shapes); 0 = patches straight in
    vision_n_head: int = 4       # the tower's heads
    vision_n_embd: int = 128     # the tower's width
    merge: int = 2               # pixel shuffle: each k x k patches become one image token (nanoVLM)
    n_layer: int = 6             # the fused stack over [image, prompt, answer]
    n_head: int = 4              # the fused stack's heads
    n_embd: int = 128            # the fused stack's width
    mlp_ratio: float = 4.0       # MLP width / model width (tower and stack)
    objective: str = "prefix"    # prefix (answer given image + prompt) | mlm (masked captions, ViLT)
    texts_per_image: int = 4     # prefix: each image comes with its caption and this many - 1 questions
    mask_prob: float = 0.15      # mlm: the share of caption tokens masked (BERT)
    init_vision: str = "auto"    # the tower starts from: a mae, mim or clip ckpt, none (random), or auto:
                                 # out-mae beside out_dir, trained first (train.py mae) if none matches
    freeze_vision: bool = False  # keep the tower as initialised
    mae_weight: float = 0.0      # > 0: add this times MAE's masked-patch loss on the same tower (joint)
    mae_max_iters: int = 0       # --init_vision=auto: the MAE's training iterations; 0 = train.py mae's
    cooccur: float = 0.5         # the world's bias (data/shapes.py); 0 and 0 = an unbiased world
    skew: float = 0.5            # how unequal the shapes' frequencies are; 0 = uniform
    noise: float = 0.0           # the world's perception knob (pixels only): Gaussian noise std / 255
    loss_mean: str = "text"      # prefix: every text weighs the same (text), or every answer token (token)

    def __post_init__(self):
        at_least(self, 1, "img_size", "patch_size", "merge", "texts_per_image", "n_train", "n_eval",
                 "vision_n_head", "vision_n_embd", "n_layer", "n_head", "n_embd")
        at_least(self, 0, "n_captioned", "cooccur", "skew", "vision_n_layer", "mae_weight", "mae_max_iters",
                 "noise")
        divisible(self, "img_size", "patch_size")
        if (self.img_size // self.patch_size) % self.merge:
            grid = self.img_size // self.patch_size
            raise UserError(f"merge={self.merge} does not divide the {grid}-patch grid")
        divisible(self, "n_embd", "n_head")
        divisible(self, "vision_n_embd", "vision_n_head")
        one_of(self, "objective", ("prefix", "mlm"))
        one_of(self, "dataset", ("shapes", "folder"))
        if self.dataset == "shapes" and self.data_path:
            raise UserError(f"--data_path={self.data_path} does nothing in the shapes world; "
                            f"add --dataset=folder")
        one_of(self, "loss_mean", ("text", "token"))
        if not 0 <= self.cooccur <= 1:
            raise UserError(f"cooccur={self.cooccur} must be in [0, 1]")
        if not 0 < self.mask_prob < 1:
            raise UserError(f"mask_prob={self.mask_prob} must be in (0, 1)")
        if self.mae_weight and not self.vision_n_layer:
            raise UserError(f"mae_weight={self.mae_weight} trains the tower as an MAE too, and "
                            f"vision_n_layer=0 has none")
        if self.n_captioned > self.n_train:
            raise UserError(f"n_captioned={self.n_captioned} is more than n_train={self.n_train}")
        if self.mlp_ratio <= 0:
            raise UserError(f"mlp_ratio={self.mlp_ratio} must be positive")

    def check_flags(self, given):
        """Before any work: keys given that would do nothing (the world's, with a folder) are a mistake."""
        world = [k for k in given if k in ("n_train", "n_captioned", "n_eval", "cooccur", "skew", "noise")]
        if self.dataset == "folder" and world:
            raise UserError(f"--{world[0]} is the shapes world's; a folder brings its own images and objects")
        if self.dataset == "folder" and self.data_path:  # read now, not after the MAE trained on its images
            read_folder(self.data_path)


# about 43 minutes on 2 cores shared with a second run (README, docs/vlm.md); batch_size = images
train_defaults = dict(batch_size=48, lr=2e-3, min_lr=1e-4, max_iters=2000, warmup_iters=100,
                      weight_decay=0.05, eval_interval=125, eval_iters=8)


def requires(cfg, out_dir):
    """--init_vision=auto: the MAE of `train.py mae` (its shapes fitted to this tower) beside out_dir,
    as out-mae/ckpt.pt, or out-mae-<shapes> when out-mae holds another; for a user's folder, an MAE of
    the folder's own images, out-mae-folder-<folder>-<shapes> -> (the config with that path as its
    init_vision, the runs train.py makes first [(idea, args)]: none where a finished one is there)."""
    if cfg.init_vision == "auto" and cfg.vision_n_layer == 0:  # encoder-free: no tower to start
        return replace(cfg, init_vision="none"), []
    if cfg.init_vision != "auto":
        if cfg.init_vision not in ("", "none"):  # checked now, before any data is prepared (and said so)
            load_encoder(MAE(mae_config(cfg)).encoder, cfg.init_vision, "--init_vision")
        return cfg, []
    mae_cfg = mae_config(cfg)
    shapes = {k: getattr(mae_cfg, k) for k in ("img_size", "patch_size", "n_layer", "n_head", "n_embd",
                                          "mlp_ratio")}
    args = [f"--{k}={v}" for k, v in shapes.items()]
    args += [f"--max_iters={cfg.mae_max_iters}"] if cfg.mae_max_iters else []
    key, here = "-".join(str(v) for v in shapes.values()), Path(out_dir).parent
    if cfg.dataset == "folder":  # the tower learns to see from the folder's own pictures
        data = str(Path(cfg.data_path).resolve())
        shapes.update(dataset="folder", data_path=data)
        args += ["--dataset=folder", f"--data_path={data}"]
        folders = [here / f"out-mae-folder-{hashlib.sha1(data.encode()).hexdigest()[:8]}-{key}"]
    else:
        shapes["dataset"] = "shapes"
        args += [f"--n_train={cfg.n_train}"]
        folders = [here / "out-mae", here / f"out-mae-{key}"]
    for folder in folders:
        path = folder / "ckpt.pt"
        if not path.exists() or all(load_checkpoint(path, "mae")["config"]["model"].get(k) == v
                                    for k, v in shapes.items()):  # none yet, or one of these shapes and data
            left = run_left("mae", args, folder)
            return replace(cfg, init_vision=str(path)), [(left[0], left[1:])] if left else []
    raise UserError(f"{folder} holds an MAE of other shapes than this tower; move it, or give "
                    f"--init_vision=PATH (or none)")


def mae_config(cfg):
    """The `train.py mae` model whose encoder has this VLM's tower shapes (its defaults otherwise)."""
    return MAEConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, n_layer=cfg.vision_n_layer,
                     n_head=cfg.vision_n_head, n_embd=cfg.vision_n_embd, mlp_ratio=cfg.mlp_ratio)


# ---------------------------------------------------------------------------------------------
# The model

class VLM(nn.Module):
    def __init__(self, cfg, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tok = tokenizer or load_tokenizer(cfg)
        V, D = self.tok.vocab_size, cfg.n_embd
        self.vision = ViTEncoder(cfg.img_size, cfg.patch_size, cfg.vision_n_layer, cfg.vision_n_head,
                                 cfg.vision_n_embd, cfg.mlp_ratio)
        self.projector = nn.Sequential(nn.Linear(cfg.merge ** 2 * cfg.vision_n_embd, D), nn.GELU(),
                                       nn.Linear(D, D))
        self.global_proj = nn.Linear(cfg.vision_n_embd, D)  # the ViT's cls token: the whole image in one
        grid = cfg.img_size // cfg.patch_size // cfg.merge
        image_pos = get_2d_sincos_pos_embed(D, grid)[None]  # (1, L', D)
        self.register_buffer("image_pos", image_pos, persistent=False)
        self.wte = nn.Embedding(V, D)
        wpe = get_1d_sincos_pos_embed(D, torch.arange(MAX_TEXT)).float()  # (MAX_TEXT, D)
        self.register_buffer("wpe", wpe, persistent=False)
        self.blocks = nn.ModuleList(Block(D, cfg.n_head, cfg.mlp_ratio) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head_bias = nn.Parameter(torch.zeros(V))
        special_ids = torch.tensor(sorted(self.tok.special.values()))
        self.register_buffer("special_ids", special_ids, persistent=False)
        self.apply(init_weights)
        nn.init.normal_(self.wte.weight, std=D ** -0.5)  # as in mlm.py: tokens and sin-cos on equal terms
        nn.init.normal_(self.vision.cls_token, std=0.02)
        if cfg.mae_weight:  # MAE's decoder, reading this tower (the MAE's own encoder is not kept)
            self.mae = MAE(mae_config(cfg))
            del self.mae.encoder
        if cfg.init_vision not in ("", "none", "auto"):  # train.py resolves auto before it builds us
            load_encoder(self.vision, cfg.init_vision, "--init_vision")
        self.vision.requires_grad_(not cfg.freeze_vision)

    def image_tokens(self, images, image_index=None):
        """(N, 3, H, W) in [-1, 1] -> (N, 1 + L/merge^2, D): the cls token (a global summary, which
        "is there a ...?" reads far more easily than a search over patches), then the patch tokens,
        each merge x merge block concatenated into one (pixel shuffle: 4x fewer tokens), projected.
        image_index (B,): each text row's image, when rows share one (the tower reads it once)."""
        x = self.vision(images)[0]  # (B, 1+L, Dv)
        cls, x = x[:, :1], x[:, 1:]
        B, L, C = x.shape
        g, k = math.isqrt(L), self.cfg.merge
        x = x.view(B, g // k, k, g // k, k, C).permute(0, 1, 3, 2, 4, 5)  # (B, g/k, g/k, k, k, Dv)
        x = x.reshape(B, (g // k) ** 2, k * k * C)  # (B, L', k*k*Dv)
        img = torch.cat([self.global_proj(cls), self.projector(x) + self.image_pos], dim=1)  # (N, 1+L', D)
        return img if image_index is None else img[image_index]  # (B, 1+L', D)

    def embed(self, ids, pos):
        return self.wte(ids) * self.cfg.n_embd ** 0.5 + self.wpe[pos]  # (B, T, D)

    def run(self, x, attn_mask, caches=None, states=None):
        """The fused stack over x (B, T, D) -> logits (B, T, V). states, a list: the stack's input and each
        block's output (B, T, D) are appended to it, the per-layer states that the logit lens, the layer
        probes, DeCo's early exits and the attention plot read (states[i] is block i's output)."""
        for i, blk in enumerate(self.blocks):
            if states is not None:
                states.append(x)
            x = blk(x, attn_mask=attn_mask, kv_cache=caches[i] if caches is not None else None)
        if states is not None:
            states.append(x)
        return self.head(x)

    def head(self, x):
        """States (..., D) -> logits (..., V): the final norm and the head tied to the embedding; special
        tokens other than end-of-text are never predicted. On an earlier layer's state: the logit lens."""
        logits = self.ln_f(x) @ self.wte.weight.T + self.head_bias  # (..., V)
        banned = self.special_ids[self.special_ids != self.tok.eot_id]
        return logits.float().index_fill(-1, banned, float("-inf"))

    def sequence(self, img, prompt, answer):
        """[each row's image tokens img (B, L', D), prompt (left-padded), answer (right-padded)]
        -> x (B, S, D), key_valid (B, S), n_prefix."""
        text = torch.cat([prompt, answer], dim=1)  # (B, P+A)
        valid = text != self.tok.pad_id
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # padding does not move the positions
        if pos.max() >= MAX_TEXT:
            raise UserError(f"text of {pos.max() + 1} tokens; the model reads at most {MAX_TEXT}")
        x = torch.cat([img, self.embed(text, pos)], dim=1)  # (B, 1+L+P+A, D)
        key_valid = torch.cat([torch.ones_like(img[..., 0], dtype=torch.bool), valid], dim=1)  # (B, S)
        return x, key_valid, img.shape[1] + prompt.shape[1]

    def logits(self, images, prompt, answer, image_index=None):
        """Logits at every position (no cache) -> (B, S, V), with the objective's attention: the
        prefix-LM mask (the reference that `step` matches; answer_positions picks the answer's
        predictions), or for mlm everything attending to everything (ViLT; the answer is the last A)."""
        x, key_valid, n_prefix = self.sequence(self.image_tokens(images, image_index), prompt, answer)
        if self.cfg.objective == "mlm":
            return self.run(x, key_valid[:, None, None, :])
        return self.run(x, prefix_lm_mask(key_valid, n_prefix))

    def forward(self, batch):
        images, prompt, answer, index = (batch[k] for k in ("images", "prompt", "answer", "image_index"))
        if self.cfg.objective == "mlm":  # ViLT: masked caption words beside the image
            n_regular = self.tok.vocab_size - len(self.tok.special)
            answer, labels = mask_tokens(answer, self.tok.mask_id, n_regular, self.special_ids,
                                         self.cfg.mask_prob)
            logits = self.logits(images, prompt, answer, index)[:, -answer.shape[1]:]  # (B, A, V)
        else:  # the position before each answer token predicts it; image and prompt are never targets
            logits, labels, rows = answer_targets(self, images, prompt, answer, index)  # (1, N, V), (1, N)
        ce, loss, acc = masked_loss(logits, labels)
        if self.cfg.objective == "prefix" and self.cfg.loss_mean == "text":
            # a token mean lets a caption (13 tokens on average) outweigh "yes" (2) six to one: the
            # existence questions, 17% of the texts, got 4% of the gradient. Each text's mean, then theirs
            loss = (ce[0] / torch.bincount(rows)[rows]).sum() / len(prompt)
        if self.cfg.mae_weight:  # the tower also paints back its own masked patches (M3AE, VL-BEiT)
            latent, mask, ids_restore = self.vision(images, self.mae.cfg.mask_ratio)  # (N, 1+L/4, Dv)
            pred = self.mae.forward_decoder(latent, ids_restore)  # (N, L, p*p*3): MAE's own decoder
            loss = loss + self.cfg.mae_weight * self.mae.forward_loss(images, pred, mask).mean()
        return loss, {"acc": acc}

    def texts(self, out):
        """Generated ids (B, T) -> B strings, end-of-text and padding dropped."""
        drop = (self.tok.eot_id, self.tok.pad_id)
        texts = []
        for ids in out.tolist():
            texts.append(self.tok.decode([t for t in ids if t not in drop]).strip())
        return texts

    # -----------------------------------------------------------------------------------------
    # Generation with a KV cache: start() reads the prefix once, step() adds one token per row

    def start(self, images, prompt, answer=None, image_index=None, layers=False):
        """Read [image, prompt, answer so far] -> (logits (B, V) for the next answer token, state).
        Each row of the batch has its own cache row, so branches of one decoding method (a clean and
        a noised image, say) run as one batch, and rows can join a batch late (decoding.cat_states).
        layers=True: state["layers"] holds the per-layer states (run's states), step by step."""
        answer = prompt[:, :0] if answer is None else answer  # (B, A): no padding
        x, key_valid, n_prefix = self.sequence(self.image_tokens(images, image_index), prompt, answer)
        state = {"caches": [{} for _ in self.blocks], "layers": [] if layers else None}
        logits = self.run(x, prefix_lm_mask(key_valid, n_prefix), state["caches"], state["layers"])
        state["key_valid"] = key_valid
        n_prompt = (prompt != self.tok.pad_id).sum(1, keepdim=True)  # (B, 1)
        state["pos"] = n_prompt + answer.shape[1]  # the next text position
        return logits[:, -1], state

    def step(self, state, token):
        """Feed one token (B,) per row -> logits (B, V) for the next one; the state is updated."""
        if state["pos"].max() >= MAX_TEXT:
            raise UserError(f"generation reached {MAX_TEXT} text tokens, the most this model reads")
        x = self.embed(token[:, None], state["pos"])  # (B, 1, D)
        new = torch.ones_like(token[:, None], dtype=torch.bool)  # (B, 1)
        state["key_valid"] = torch.cat([state["key_valid"], new], 1)  # (B, S+1)
        state["pos"] = state["pos"] + 1
        if state.get("layers") is not None:
            state["layers"].clear()
        return self.run(x, state["key_valid"][:, None, None, :], state["caches"], state.get("layers"))[:, -1]

    @torch.no_grad()
    def generate(self, images, prompt, max_new_tokens=40, temperature=0.0, top_k=0, use_cache=True,
                 image_index=None):
        """Answers for a batch -> (B, <= max_new_tokens) ids, end-of-text and after it as padding.
        temperature 0 is greedy. use_cache=False recomputes the whole sequence each step (the slow
        reference). image_index: as in a batch, each row's image."""
        B = prompt.shape[0]
        eot, pad = self.tok.eot_id, self.tok.pad_id
        out = torch.full((B, 0), pad, dtype=torch.long, device=prompt.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        if use_cache:
            logits, state = self.start(images, prompt, image_index=image_index)
        else:
            logits = self.logits(images, prompt, out, image_index)[:, -1]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = F.softmax(filter_logits(logits, temperature, top_k), -1)  # (B, V)
                token = torch.multinomial(probs, 1)[:, 0]
            else:
                token = logits.argmax(-1)  # (B,)
            out = torch.cat([out, torch.where(done, pad, token)[:, None]], dim=1)
            done |= token == eot
            if done.all() or out.shape[1] == max_new_tokens:
                break
            if use_cache:
                logits = self.step(state, token)
            else:
                logits = self.logits(images, prompt, out, image_index)[:, -1]
        return out


def answer_targets(model, images, prompt, answer, index):
    """The prefix-LM's answer tokens: predictions, targets and rows -> (1, N, V), (1, N), (N,). Captions
    and short questions share a batch: padding each group of rows to its own longest (length_groups)
    spares the fused stack the padding, about a third of its tokens."""
    img = model.image_tokens(images, index)  # (B, L', D): each image read once
    pad, logits, labels, text_rows = model.tok.pad_id, [], [], []
    for rows, P, A in length_groups(prompt, answer, pad):
        a = answer[rows, :A]  # (b, A): right-padded, so the real tokens come first
        x, key_valid, n_prefix = model.sequence(img[rows], prompt[rows, -P:], a)
        out = answer_positions(model.run(x, prefix_lm_mask(key_valid, n_prefix)), A)  # (b, A, V)
        logits.append(out[a != pad])
        labels.append(a[a != pad])
        text_rows.append(rows[:, None].expand_as(a)[a != pad])
    return torch.cat(logits)[None], torch.cat(labels)[None], torch.cat(text_rows)


def Data(cfg, seed=0, verbose=True):
    """train.py's face: the VLM's image-text pairs, the shapes world's or a user's folder's."""
    return (FolderPairs if cfg.dataset == "folder" else ShapesPairs)(cfg, seed, verbose)


def load_tokenizer(cfg, verbose=False):
    """The words a VLM of cfg reads: the shapes world's BPE, or the BPE of the folder's own texts."""
    if cfg.dataset == "folder":
        return folder_tokenizer(cfg.data_path, verbose=verbose)
    return shapes_tokenizer(verbose)


Model = VLM


def answer_positions(x, A):
    """(B, S, ...) over [image, prompt, answer] -> (B, A, ...): each answer token's position before it."""
    return x[:, -A - 1:-1]


def prefix_lm_mask(key_valid, n_prefix):
    """(B, S) real-token flags -> (B, 1, S, S) bool: query i sees key j if j is real and either both
    are in the prefix (image and prompt, both directions) or j <= i (the answer, causal)."""
    S = key_valid.shape[1]
    i = torch.arange(S, device=key_valid.device)
    allowed = (i[None, :] < n_prefix) | (i[None, :] <= i[:, None])  # (S, S)
    return (allowed[None] & key_valid[:, None, :])[:, None]  # (B, 1, S, S)


# ---------------------------------------------------------------------------------------------
# Evaluation, what train.py reports: questions, captions, and how much of it comes from the image

@torch.no_grad()
def answer_questions(model, data, split, device, batch_size=256, n_scenes=None, kinds=None):
    """Every question (of `kinds`) of the split's first n_scenes held-out scenes, answered greedily
    -> {kind: accuracy, 'all': accuracy}."""
    items = []  # (scene, kind, question, answer)
    for i in range(min(n_scenes or 10 ** 9, len(data.shapes[split]))):
        qa = questions(data.world, split, i, data.shapes[split].scene(i))
        items += [(i, kind, q, a) for kind, q, a in qa if kinds is None or kind in kinds]
    right, total = {}, {}
    for k in range(0, len(items), batch_size):
        chunk = items[k:k + batch_size]
        b = data.make_batch(split, np.array([c[0] for c in chunk]), [(c[2], c[3]) for c in chunk], device)
        out = model.generate(b["images"], b["prompt"], 6, image_index=b["image_index"])
        for (_, kind, _, a), said in zip(chunk, model.texts(out)):
            right[kind] = right.get(kind, 0) + (said == a)
            total[kind] = total.get(kind, 0) + 1
    acc = {kind: right[kind] / total[kind] for kind in sorted(total)}
    acc["all"] = sum(right.values()) / sum(total.values())
    return acc


@torch.no_grad()
def caption_scores(model, data, split, device, batch_size=250, max_new_tokens=40):
    """Greedy captions of the split's held-out scenes -> object precision, recall, F1, exact match."""
    tp = n_said = n_true = exact = 0
    n = len(data.shapes[split])
    for k in range(0, n, batch_size):
        idx = np.arange(k, min(n, k + batch_size))
        b = data.make_batch(split, idx, [(CAPTION_PROMPT, "")] * len(idx), device)
        out = model.generate(b["images"], b["prompt"], max_new_tokens, image_index=b["image_index"])
        for i, text in zip(idx, model.texts(out)):
            objs = data.shapes[split].scene(i)
            t, s, g = object_match(parse_caption(text), objs)
            tp, n_said, n_true, exact = tp + t, n_said + s, n_true + g, exact + (text == caption(objs))
    p, r = tp / max(1, n_said), tp / max(1, n_true)
    return {"precision": p, "recall": r, "f1": f1(p, r), "exact": exact / n}


@torch.no_grad()
def attribute_accuracy(model, data, split, device, blank=False, batch_size=250):
    """Accuracy on the caption's attribute words (shapes, colours, sizes): teacher-forced for the
    prefix-LM, BERT-masked for the mlm objective. blank=True shows the empty canvas instead: what
    the language prior alone gets right."""
    is_attr = word_mask(model.tok, {*SHAPES, *COLOUR_NAMES, *SIZES}, device)
    right = total = 0
    n = len(data.shapes[split])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for k in range(0, n, batch_size):
            idx = np.arange(k, min(n, k + batch_size))
            pairs = [(CAPTION_PROMPT, caption(data.shapes[split].scene(i))) for i in idx]
            b = data.make_batch(split, idx, pairs, device)
            images = blank_like(b["images"]) if blank else b["images"]
            prompt, answer, A = b["prompt"], b["answer"], b["answer"].shape[1]
            if model.cfg.objective == "mlm":  # mask exactly the attribute words, so every one is asked
                inputs = answer.masked_fill(is_attr[answer], model.tok.mask_id)
                logits = model.logits(images, prompt, inputs, b["image_index"])[:, -A:]  # (B, A, V)
            else:
                logits = answer_positions(model.logits(images, prompt, answer, b["image_index"]), A)
            pred = logits.argmax(-1)  # (B, A)
            sel = is_attr[answer]
            right += ((pred == answer) & sel).sum().item()
            total += sel.sum().item()
    return right / max(1, total)


@torch.no_grad()
def folder_scores(model, data, device, n=200):
    """A user's folder: greedy answers to the first n held-out images' texts against theirs ->
    exact-match accuracy of captions and of answers."""
    rows, pairs = [], []
    for i, r in enumerate(data.records["val"][:n]):
        rows += [i] * len(data.texts(r))
        pairs += data.texts(r)
    said = []
    for k in range(0, len(pairs), 256):
        b = data.make_batch("val", np.array(rows[k:k + 256]), [(p, "") for p, _ in pairs[k:k + 256]], device)
        out = model.generate(b["images"], b["prompt"], 40, image_index=b["image_index"])
        said += model.texts(out)
    right = [s.strip(" .").lower() == a.strip(" .").lower() for s, (_, a) in zip(said, pairs)]
    is_caption = [p == CAPTION_PROMPT for p, _ in pairs]
    out = {}
    for name, keep in (("caption", is_caption), ("answer", [not c for c in is_caption])):
        if any(keep):
            out[f"val_{name}_exact"] = float(np.mean([r for r, k in zip(right, keep) if k]))
    return out


def evaluate(model, data, device):
    """Questions and captions on held-out val (biased) and ood (bias broken) scenes, and how much
    the model uses its eyes: attribute words with the real image vs a blank one. A user's folder:
    folder_scores."""
    model.eval()
    out = {}
    if model.cfg.dataset == "folder" and model.cfg.objective == "prefix":
        out = folder_scores(model, data, device)
    for split in ("val", "ood") if model.cfg.dataset == "shapes" else ():
        if model.cfg.objective == "prefix":
            for k, v in answer_questions(model, data, split, device).items():
                out[f"{split}_q_{k}"] = v
            for k, v in caption_scores(model, data, split, device).items():
                out[f"{split}_caption_{k}"] = v
        out[f"{split}_attr_acc_image"] = attribute_accuracy(model, data, split, device)
        out[f"{split}_attr_acc_blank"] = attribute_accuracy(model, data, split, device, blank=True)
    model.train()
    return out


@torch.no_grad()
def monitor(model, data, device, n_scenes=200):
    """Sight, cheaply, at every evaluation: the existence question of each of the first n_scenes `ood`
    scenes (balanced yes/no; the world's bias cannot help there) -> {'ood_exist': accuracy}."""
    if model.cfg.objective != "prefix" or model.cfg.dataset == "folder":
        return {}
    model.eval()
    acc = answer_questions(model, data, "ood", device, n_scenes=n_scenes, kinds=("exist",))["all"]
    model.train()
    return {"ood_exist": acc}
