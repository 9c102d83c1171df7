"""Masked autoencoders: hide 75% of an image's patches and learn to paint them back.

He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (facebookresearch/mae). An image
is cut into patches; a random 75% are removed and only the visible quarter goes through a ViT
encoder, which is why MAE is cheap to train. A narrow decoder gets the encoded patches back in
place, a shared learned mask token for each removed one, and regresses the removed patches'
pixels, normalised per patch (`norm_pix_loss`). The loss counts masked patches only. What the
encoder learns to make this possible is a representation; a linear probe on it measures that.

This file also defines the Transformer `Block` that every idea in the repo uses: images, text and
both at once go through the same block ("an image is a foreign language").
"""
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import stream_indices, to_tensor
from lib.common import UserError, at_least, divisible, one_of


@dataclass
class Config:
    dataset: str = "shapes"       # shapes | folder | cifar10
    data_path: str = ""           # an image folder, or a CIFAR-10 tarball (path or URL)
    img_size: int = 64            # pixels a side (images are resized to it)
    n_train: int = 20000          # shapes scenes rendered (and cached) for training
    n_val: int = 1000             # held-out shapes scenes
    patch_size: int = 8           # pixels a side of each patch (a token)
    n_layer: int = 4              # encoder blocks
    n_head: int = 4               # encoder heads
    n_embd: int = 128             # encoder width
    decoder_n_layer: int = 2      # decoder blocks (the decoder is narrow: it is thrown away)
    decoder_n_head: int = 4       # decoder heads
    decoder_n_embd: int = 64      # decoder width
    mlp_ratio: float = 4.0        # MLP width / model width
    mask_ratio: float = 0.75      # share of patches hidden from the encoder
    masking: str = "random"       # random | block (BEiT) | grid
    norm_pix_loss: bool = True    # predict each patch normalised by its own mean and variance
    maskings = ("random", "block", "grid")  # not a key: what --masking may name here (mim.py adds more)

    def __post_init__(self):
        at_least(self, 1, "img_size", "n_train", "n_val", "patch_size", "n_layer", "n_head", "n_embd",
                 "decoder_n_layer", "decoder_n_head", "decoder_n_embd")
        if self.mlp_ratio <= 0:
            raise UserError(f"mlp_ratio={self.mlp_ratio} must be positive")
        divisible(self, "img_size", "patch_size")
        if not 0 <= self.mask_ratio < 1:
            raise UserError(f"mask_ratio={self.mask_ratio} must be in [0, 1)")
        one_of(self, "masking", self.maskings)
        one_of(self, "dataset", ("shapes", "folder", "cifar10"))
        if self.dataset == "folder" and not self.data_path:
            raise UserError("--dataset=folder needs --data_path=DIR, the folder of your png/jpg images")
        if self.dataset == "shapes" and self.data_path:
            raise UserError(f"--data_path={self.data_path} does nothing in the shapes world; "
                            f"add --dataset=folder")
        if int((self.img_size // self.patch_size) ** 2 * (1 - self.mask_ratio)) < 1:
            raise UserError(f"mask_ratio={self.mask_ratio} leaves no visible patch of "
                            f"{(self.img_size // self.patch_size) ** 2}")
        divisible(self, "n_embd", "n_head")
        divisible(self, "decoder_n_embd", "decoder_n_head")


# what train.py uses unless told otherwise: ~4 minutes on 2 CPU cores
train_defaults = dict(batch_size=64, lr=2e-3, min_lr=1e-4, max_iters=2400, warmup_iters=100,
                      weight_decay=0.05, eval_interval=400, eval_iters=8)


# ---------------------------------------------------------------------------------------------
# The Transformer block, shared by every idea

class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        """(B, T, C) -> q, k, v, each (B, h, T, hd)."""
        B, T, C = x.shape
        return self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)

    def forward(self, x, attn_mask=None, is_causal=False, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.heads(x)  # 3 x (B, h, T, hd)
        if kv_cache is not None:  # generation: the new positions also attend to every cached one
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)  # (B, h, T_cached + T, hd)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        # a mask and is_causal together are ambiguous in SDPA: callers pass one or the other
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=is_causal and attn_mask is None)  # (B, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def weights(self, x, attn_mask):
        """The attention probabilities forward() uses, (B, h, T, T), for looking at where tokens attend
        (SDPA does not return them). attn_mask: bool, True = may attend."""
        q, k, _ = self.heads(x)  # (B, h, T, hd)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, h, T, T)
        return scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x)). kv_cache: a dict this
    layer keeps its keys and values in, for generation one token at a time."""

    def __init__(self, dim, n_head, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_head)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, attn_mask=None, is_causal=False, kv_cache=None):
        x = x + self.attn(self.norm1(x), attn_mask, is_causal, kv_cache)
        return x + self.mlp(self.norm2(x))


def init_weights(m):
    """MAE's init: xavier_uniform on every Linear (the patch projection is one), zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Patches, positions and masking

def get_1d_sincos_pos_embed(dim, pos):
    """positions (L,) -> (L, dim): [sin(pos * omega), cos(pos * omega)], omega = 1/10000**(k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (D/2,)
    out = pos.reshape(-1, 1).double() * omega  # (L, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (L, D)


def get_2d_sincos_pos_embed(dim, grid_size, cls_token=False):
    """-> (grid*grid [+1], dim) fixed embedding: half the channels encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([get_1d_sincos_pos_embed(dim // 2, cols), get_1d_sincos_pos_embed(dim // 2, rows)],
                    dim=1)  # (L, D): first half w (column), second half h (row)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # (1+L, D)
    return emb.float()


def patchify(imgs, p):
    """(N, 3, H, W) -> (N, L, p*p*3), values in a patch ordered (row i, column j, channel c)."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x, p, channels=3):
    """(N, L, p*p*3) -> (N, 3, H, W), the exact inverse of patchify (square images)."""
    N, L, _ = x.shape
    h = w = int(math.isqrt(L))
    x = x.reshape(N, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
    return x.reshape(N, channels, h * p, w * p)


def random_masking(x, mask_ratio, noise=None):
    """Keep a random int(L*(1-mask_ratio)) tokens of each sample.

    x: (N, L, D). noise: optional (N, L) scores, lowest kept (other strategies shape it).
    -> x_masked (N, len_keep, D), mask (N, L) with 1 = removed, 0 = kept,
       ids_restore (N, L) that puts a shuffled sequence back in order.
    """
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)  # (N, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # small noise first: kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (N, len_keep)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, len_keep, D)
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (N, L), back in patch order
    return x_masked, mask, ids_restore


def block_noise(N, grid, mask_ratio, device):
    """BEiT's block-wise masking as random_masking scores: patches inside rectangles score high.

    Rectangles (area >= 4 patches, aspect in [0.3, 3.3]) are dropped until they cover the target
    count; random_masking then keeps exactly len_keep, the lowest-scoring patches.
    """
    L = grid * grid
    target = L - int(L * (1 - mask_ratio))
    blocked = torch.zeros(N, grid, grid)
    for n in range(N):
        while blocked[n].sum() < target:
            u = torch.rand(3).tolist()  # torch's RNG, so checkpoints capture it
            area = 4 + u[0] * max(1, target - blocked[n].sum().item() - 3)
            aspect = math.exp(math.log(0.3) + u[1] * 2 * math.log(1 / 0.3))
            h = min(grid, max(1, round(math.sqrt(area * aspect))))
            w = min(grid, max(1, round(math.sqrt(area / aspect))))
            top, left = (int(torch.randint(0, grid - s + 1, ())) for s in (h, w))
            blocked[n, top:top + h, left:left + w] = 1
    return (blocked.view(N, L) + 0.5 * torch.rand(N, L)).to(device)  # (N, L)


def grid_noise(N, grid, device):
    """Keep one patch of every 2x2 cell (a regular grid at 75% masking), with a random phase."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    phase = torch.randint(0, 2, (N, 2, 1, 1))
    keep = ((rows + phase[:, 0]) % 2 == 0) & ((cols + phase[:, 1]) % 2 == 0)  # (N, grid, grid)
    return ((~keep).float().view(N, -1) + 0.5 * torch.rand(N, grid * grid)).to(device)  # (N, L)


# ---------------------------------------------------------------------------------------------
# The model

class ViTEncoder(nn.Module):
    """Patch embedding + fixed 2D sin-cos positions + cls token + blocks + LayerNorm.

    With mask_ratio=0 every patch token comes back in order: the vision tower of the VLM.
    """

    def __init__(self, img_size, patch_size, n_layer, n_head, n_embd, mlp_ratio=4.0):
        super().__init__()
        self.p, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Linear(patch_size * patch_size * 3, n_embd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        pos_embed = get_2d_sincos_pos_embed(n_embd, self.grid, True)[None]  # (1, 1+L, D)
        self.register_buffer("pos_embed", pos_embed)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)

    def forward(self, imgs, mask_ratio=0.0, masking="random", noise=None):
        """noise: (N, L) scores to keep the lowest of, made by the caller (mim.py's maskings); else
        masking names how they are drawn: random (uniform), block or grid."""
        x = self.patch_embed(patchify(imgs, self.p))  # (N, L, D)
        x = x + self.pos_embed[:, 1:]
        N, L, _ = x.shape
        if mask_ratio > 0:
            if noise is None and masking == "block":
                noise = block_noise(N, self.grid, mask_ratio, x.device)
            elif noise is None and masking == "grid":
                noise = grid_noise(N, self.grid, x.device)
            x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (N, len_keep, D); None: uniform
        else:
            mask = torch.zeros(N, L, device=x.device)
            ids_restore = torch.arange(L, device=x.device).expand(N, L)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, 1+len_keep, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def reinit(self):
        """Weights drawn afresh, as a new MAE draws them: the probes' random-init control."""
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=0.02)


class MAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        p, D, Dd = cfg.patch_size, cfg.n_embd, cfg.decoder_n_embd
        self.encoder = ViTEncoder(cfg.img_size, p, cfg.n_layer, cfg.n_head, D, cfg.mlp_ratio)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        grid = cfg.img_size // p
        decoder_pos_embed = get_2d_sincos_pos_embed(Dd, grid, True)[None]  # (1, 1+L, Dd)
        self.register_buffer("decoder_pos_embed", decoder_pos_embed)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_n_head, cfg.mlp_ratio) for _ in range(cfg.decoder_n_layer))
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred = nn.Linear(Dd, p * p * 3)
        self.apply(init_weights)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)  # (N, 1+len_keep, Dd)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)  # (N, L-len_keep, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (N, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (N, L, p*p*3), cls dropped

    def target(self, imgs):
        target = patchify(imgs, self.cfg.patch_size)  # (N, L, p*p*3)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in the paper's code
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def patch_loss(self, imgs, pred):
        """Mean squared error of each patch -> (N, L) (mim.py's other targets change only this)."""
        return ((pred.float() - self.target(imgs)) ** 2).mean(dim=-1)

    def forward_loss(self, imgs, pred, mask):
        """The patch loss averaged over masked patches -> (N,) per image."""
        return (self.patch_loss(imgs, pred) * mask).sum(1) / mask.sum(1)  # (N,)

    def forward(self, imgs):
        latent, mask, ids_restore = self.encoder(imgs, self.cfg.mask_ratio, self.cfg.masking)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask).mean(), {}


# ---------------------------------------------------------------------------------------------
# Data and evaluation: the rest of the face train.py calls

Model = MAE


class Data:
    """Images for one dataset, held as uint8 arrays; batches are a pure function of their position."""
    unit = "images"

    def __init__(self, cfg, seed=0, verbose=True):
        from data.shapes import ShapesSplit, World
        from data.images import cifar10_splits, folder_splits
        self.cfg, self.seed, self.shapes = cfg, seed, {}
        if cfg.dataset == "shapes":
            world = World(img_size=cfg.img_size, seed=seed)
            self.shapes = {s: ShapesSplit(world, s, n, verbose=verbose)
                           for s, n in (("train", cfg.n_train), ("val", cfg.n_val))}
            self.images = {s: d.images for s, d in self.shapes.items()}
        else:
            load = folder_splits if cfg.dataset == "folder" else cifar10_splits
            self.images = load(cfg.data_path, cfg.img_size)

    def batch(self, split, pos, batch_size, device):
        imgs = self.images[split]
        idx = np.sort(stream_indices(len(imgs), self.seed + (split != "train"), pos * batch_size, batch_size))
        return to_tensor(imgs[idx], device)

    def items(self, batch):
        return batch.shape[0]


@torch.no_grad()
def features(encoder, images, device, chunk=256):
    """Mean-pooled patch tokens of a frozen encoder, no masking -> (N, D). An encoder with a cls token
    returns it first; it is not a patch."""
    first = 0 if getattr(encoder, "cls_token", None) is None else 1
    out = [encoder(to_tensor(images[i:i + chunk], device))[0][:, first:].mean(1).float().cpu()
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


def linear_probe(x, y, steps=300, weight_decay=1e-3):
    """Logistic regression on standardised features, fitted to its optimum with L-BFGS: x (N, D), y (N,)
    or (N, K) in {0, 1} (K labels at once) -> a function mapping (M, D) features to logits (> 0: yes).
    The one probe of the course: the MAE's features here, the VLM's layers in study/causes.py."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    labels = y.float().view(len(y), -1)  # (N, K)
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(x.shape[1], labels.shape[1])
    nn.init.normal_(head.weight, std=0.01, generator=g)
    nn.init.zeros_(head.bias)
    z = (x - mean) / std
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(z), labels)
        loss = loss + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    @torch.no_grad()
    def logits(x_new):
        return head((x_new - mean) / std).view(len(x_new), *y.shape[1:])  # (M,) or (M, K)
    return logits


def probe_labels(split):
    """What the probes ask of a shapes split -> {what: float (N, K) labels}: which shapes, colours and
    sizes appear, which of the grid's cells hold an object, and the count as "at least 2, 3, ... objects"."""
    from data.shapes import COLOURS, SHAPES, SIZES
    count = (split.objects[:, :, 0] >= 0).sum(1)  # (N,)
    at_least_k = [count >= k for k in range(2, split.world.max_objects + 1)]
    return {"shape": split.presence(0, len(SHAPES)), "colour": split.presence(1, len(COLOURS)),
            "size": split.presence(2, len(SIZES)), "position": split.presence(3, split.world.grid ** 2),
            "count": np.stack(at_least_k, 1).astype(np.float32)}


def probes(encoder, name, data, device, n_probe=4000):
    """Linear probes of a frozen encoder's mean-pooled features, beside two controls: a random-init
    encoder of the same shapes and 4x4-pooled raw pixels -> {'probe_{what}_{name}': accuracy on val,
    over every label of that kind}."""
    train, test = data.shapes["train"], data.shapes["val"]
    n = min(n_probe, len(train))
    torch.manual_seed(0)  # the random-init control: this encoder's shapes, the same draw for every model
    random_encoder = copy.deepcopy(encoder)
    random_encoder.reinit()

    def pixels(images):  # (N, H, W, 3) uint8 -> (N, 3*H/4*W/4): 4x4-pooled raw pixels
        return F.avg_pool2d(torch.from_numpy(np.array(images)).float().permute(0, 3, 1, 2), 4).flatten(1)

    feats = {}
    for key, enc in ((name, encoder), ("random_init", random_encoder)):
        feats[key] = (features(enc, train.images[:n], device), features(enc, test.images, device))
    feats["pixels"] = (pixels(train.images[:n]), pixels(test.images))
    out = {}
    for what, y_train in probe_labels(train).items():
        y_train, y_val = torch.from_numpy(y_train[:n]), torch.from_numpy(probe_labels(test)[what])
        for key, (f_train, f_val) in feats.items():
            said = linear_probe(f_train, y_train)(f_val) > 0  # (N_val, K)
            out[f"probe_{what}_{key}"] = (said.float() == y_val).float().mean().item()
    return out


def best_constant_loss(model, data, n=512):
    """The loss of the best single prediction for every patch, the mean target: its variance."""
    target = model.target(to_tensor(data.images["val"][:n], "cpu"))  # (N, L, p*p*3)
    return target.var(dim=(0, 1), unbiased=False).mean().item()


def evaluate(model, data, device, n_probe=4000):
    """Beyond the loss: the best constant prediction as the baseline, and linear probes."""
    out = {"best_constant_loss": best_constant_loss(model, data)}
    if data.shapes:
        out.update(probes(model.encoder, "mae", data, device, n_probe))
    return out


@torch.no_grad()
def monitor(model, data, device, n=256):
    """Cheaply, at every evaluation (and when trained weights are checked): the masked-patch loss on
    the first n val images under one fixed mask (seed 0) -> {'val_mask_loss': loss}."""
    model.eval()
    torch.manual_seed(0)  # train.py and check_weights keep the training RNG apart
    loss = model(to_tensor(data.images["val"][:n], device))[0].item()
    model.train()
    return {"val_mask_loss": loss}
