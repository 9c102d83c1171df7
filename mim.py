"""What to predict and what to hide: the targets and the masks of masked image modeling.

mae.py predicts each hidden patch's pixels, normalised per patch, and hides a random 75%. Half of the
field's papers change one of those two choices. This file is mae.py's MAE with both made a key; each
choice is one function, and with the defaults it is the MAE, bit for bit.

What a hidden patch is predicted as (--target):
  pixels     the raw patch (MAE without norm_pix_loss; SimMIM, Xie et al. 2021)
  norm_pix   the patch normalised by its own mean and variance (MAE, He et al. 2021: the default)
  tokens     the patch's code: its nearest entry in a k-means codebook of patches, learned with a
             cross-entropy over the codes (BEiT, Bao et al. 2021, predicts a dVAE's codes; a fitted
             codebook plays the dVAE here)
  features   a frozen teacher's patch features, layer-normalised, with smooth-L1 (MaskDistill, Peng et
             al. 2022, "A Unified View of Masked Image Modeling"; dBOT, Liu et al. 2022, "Exploring
             Target Representations for Masked Autoencoders": a randomly initialised teacher does
             nearly as well, and a student becomes the next stage's teacher)
Which patches are hidden (--masking), beside mae.py's random, block and grid:
  colour     ColorMAE (Hinojosa et al. 2024): band-pass ("green") filtered noise, thresholded at the
             ratio: data-independent, hidden patches in blobs, neither scattered nor one block
  hard       HPM (Wang et al. 2023, "Hard Patches Mining"): the decoder also predicts each patch's
             loss; the hardest patches are hidden, a share rising from 0 to hard_share (easy to hard)
  attention  AttMask (Kakogeorgiou et al. 2022): the patches a teacher's cls token attends to most

Read `Config`, then `MIM.patch_loss` (the four targets), `MIM.mask_scores` with `colour_noise`,
`hard_noise` and `attention_scores` (the three masks), `kmeans` (the codebook) and `evaluate` (five
probes: shape, colour, size, position, count, beside a random encoder and raw pixels). docs/mim.md has
the lesson: what each choice teaches the encoder on the shapes world, three seeds each.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import mae
from data import to_tensor
from lib.checkpoints import load_encoder
from lib.common import UserError, at_least, one_of
from mae import MAE, Data, ViTEncoder, best_constant_loss, init_weights, patchify, probes

TARGETS = ("pixels", "norm_pix", "tokens", "features")


@dataclass
class Config(mae.Config):
    target: str = "norm_pix"       # pixels | norm_pix | tokens (BEiT) | features (MaskDistill, dBOT)
    codebook_size: int = 256       # tokens: codes in the k-means codebook of patches
    init_codebook: str = "kmeans"  # tokens: fitted when training starts (a checkpoint carries its own)
    init_teacher: str = ""         # features, attention: an mae or mim checkpoint; empty = a random teacher
    hard_share: float = 0.5        # hard: share of the hidden patches picked by predicted loss, at the end...
    hard_ramp: int = 1000          # ...of this many steps over which it rises from 0 (HPM's easy to hard)
    maskings = mae.Config.maskings + ("colour", "hard", "attention")

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "target", TARGETS)
        at_least(self, 2, "codebook_size")
        at_least(self, 0, "hard_ramp")
        if not 0 <= self.hard_share <= 1:
            raise UserError(f"hard_share={self.hard_share} must be in [0, 1]")
        if not self.norm_pix_loss and self.target == "norm_pix":
            raise UserError("--norm_pix_loss=False: here that is --target=pixels")
        self.norm_pix_loss = self.target == "norm_pix"  # what mae.py's target() reads
        if self.init_teacher and not self.has_teacher:
            raise UserError(f"--init_teacher does nothing with --target={self.target} and "
                            f"--masking={self.masking}; it serves --target=features and --masking=attention")

    @property
    def has_teacher(self):
        return self.target == "features" or self.masking == "attention"


train_defaults = mae.train_defaults


def requires(cfg, out_dir):
    """The teacher's checkpoint read now, so that a wrong one is one line before anything starts."""
    if cfg.init_teacher:
        load_encoder(teacher_encoder(cfg), cfg.init_teacher, "--init_teacher")
    return cfg, []


def teacher_encoder(cfg):
    return ViTEncoder(cfg.img_size, cfg.patch_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.mlp_ratio)


# ---------------------------------------------------------------------------------------------
# The codebook (tokens) and the masks' scores (random_masking keeps the lowest-scoring patches)

def kmeans(x, k, iters=20, seed=0):
    """Lloyd's algorithm from k-means++ seeds: x (M, d) -> codebook (k, d). k-means++ picks each seed
    with probability proportional to its squared distance from the seeds so far, so that the many
    identical background patches do not take most of the codes."""
    g = torch.Generator().manual_seed(seed)
    first = x[torch.randint(len(x), (1,), generator=g)]  # (1, d)
    codes, d2 = [first], ((x - first) ** 2).sum(1)  # (M,)
    for _ in range(k - 1):
        pick = x[torch.multinomial(d2 + 1e-12, 1, generator=g)]  # (1, d)
        codes.append(pick)
        d2 = torch.minimum(d2, ((x - pick) ** 2).sum(1))
    codes = torch.cat(codes)  # (k, d)
    for _ in range(iters):
        nearest = torch.cdist(x, codes).argmin(1)  # (M,)
        sums = torch.zeros_like(codes).index_add_(0, nearest, x)  # (k, d)
        counts = torch.bincount(nearest, minlength=k)[:, None]  # (k, 1)
        codes = torch.where(counts > 0, sums / counts.clamp(min=1), codes)  # an empty code stays put
    return codes


def nearest_code(patches, codebook):
    """(N, L, d) patches -> (N, L) index of each one's nearest code."""
    return torch.cdist(patches.flatten(0, 1), codebook).argmin(1).view(patches.shape[:2])


def fit_codebook(cfg, n=500):
    """k-means over the patches of n training images: the shapes world's first n scenes drawn with
    world seed 0 (a sample of the world apart from training's, as BEiT's dVAE was), or a folder's."""
    from data.shapes import ShapesSplit, World
    if cfg.dataset == "shapes":
        images = ShapesSplit(World(img_size=cfg.img_size, seed=0), "train", n, verbose=False).images
    else:
        images = Data(cfg, verbose=False).images["train"][:n]
    patches = patchify(to_tensor(images, "cpu"), cfg.patch_size).flatten(0, 1)  # (n*L, p*p*3)
    return kmeans(patches, cfg.codebook_size)


def colour_noise(N, grid, device, band=(1.5, 3.0)):
    """ColorMAE's green noise as scores: white noise on the patch grid, band-pass filtered (spatial
    frequencies whose radius, in cycles per grid, lies in band) -> (N, L). Kept patches gather where
    the noise is low: blobs about a wavelength apart, whatever the image shows."""
    white = torch.rand(N, grid, grid)
    f = torch.fft.fftfreq(grid) * grid  # cycles per grid: 0, 1, ..., -1
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()  # (grid, grid)
    passband = ((radius >= band[0]) & (radius <= band[1])).float()
    green = torch.fft.ifft2(torch.fft.fft2(white) * passband).real  # (N, grid, grid)
    return green.reshape(N, grid * grid).to(device)  # (N, L)


def hard_noise(predicted_loss, mask_ratio, share):
    """HPM's mask as scores: the int(share * hidden) patches of highest predicted loss score above
    every other patch (hidden for sure); every other patch draws a uniform score (hidden at random)."""
    N, L = predicted_loss.shape
    n_hard = int(share * (L - int(L * (1 - mask_ratio))))
    hardest = predicted_loss.topk(n_hard, dim=1).indices  # (N, n_hard)
    noise = torch.rand(N, L, device=predicted_loss.device)  # (N, L)
    return noise.scatter(1, hardest, 2.0)


def attention_scores(vit, imgs):
    """AttMask's scores: how much the cls token of the last block of a ViT attends to each patch, the
    mean over heads, every patch seen -> (N, L). Hiding the highest hides what the teacher looks at."""
    x = vit.patch_embed(patchify(imgs, vit.p)) + vit.pos_embed[:, 1:]  # (N, L, D)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1)  # (N, 1, D)
    x = torch.cat([cls, x], dim=1)  # (N, 1+L, D)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    everything = torch.ones(1, 1, x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
    weights = last.attn.weights(last.norm1(x), everything)  # (N, h, 1+L, 1+L)
    return weights[:, :, 0, 1:].mean(1)  # (N, L)


def rank_loss(predicted, loss, mask):
    """HPM's loss for the loss predictor: over every pair (i, j) of hidden patches, a logistic loss on
    predicted_i - predicted_j against "patch i's loss is the larger" -> (N,). Relative, so the head
    learns which patches are hard, not the loss's scale, which falls all through training."""
    diff = predicted[:, :, None] - predicted[:, None, :]  # (N, L, L)
    harder = (loss[:, :, None] > loss[:, None, :]).float()  # (N, L, L)
    pairs = mask[:, :, None] * mask[:, None, :]  # (N, L, L): both hidden
    bce = F.binary_cross_entropy_with_logits(diff, harder, reduction="none")  # (N, L, L)
    return (bce * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


# ---------------------------------------------------------------------------------------------
# The model: the MAE, its decoder's output as wide as the target, and what the target needs

class MIM(MAE):
    def __init__(self, cfg):
        super().__init__(cfg)
        p, K = cfg.patch_size, cfg.codebook_size
        width = {"tokens": K, "features": cfg.n_embd}.get(cfg.target, p * p * 3)
        width += cfg.masking == "hard"  # HPM: one more output per patch, its predicted loss
        if width != p * p * 3:  # (with the defaults nothing changes: the MAE, bit for bit)
            self.decoder_pred = nn.Linear(cfg.decoder_n_embd, width)
            init_weights(self.decoder_pred)
        if cfg.target == "tokens":  # a buffer: checkpoints carry the codebook the model was trained on
            fitted = cfg.init_codebook == "kmeans"
            self.register_buffer("codebook", fit_codebook(cfg) if fitted else torch.zeros(K, p * p * 3))
        if cfg.has_teacher:  # frozen: it gives targets or scores, never gradients
            self.teacher = teacher_encoder(cfg).apply(init_weights)
            nn.init.normal_(self.teacher.cls_token, std=0.02)
            if cfg.init_teacher:
                load_encoder(self.teacher, cfg.init_teacher, "--init_teacher")
            self.teacher.requires_grad_(False)
        if cfg.masking == "hard":  # training steps taken, for the easy-to-hard share (kept on resume)
            self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def patch_loss(self, imgs, pred):
        """Each patch's loss under this target -> (N, L); the masked mean is taken by the caller."""
        if self.cfg.target == "tokens":
            codes = nearest_code(patchify(imgs, self.cfg.patch_size), self.codebook)  # (N, L)
            return F.cross_entropy(pred.float().transpose(1, 2), codes, reduction="none")  # (N, L)
        if self.cfg.target == "features":
            with torch.no_grad():
                z = self.teacher(imgs)[0][:, 1:]  # (N, L, D): the teacher sees every patch
            return F.smooth_l1_loss(pred.float(), F.layer_norm(z, z.shape[-1:]), reduction="none").mean(-1)
        return super().patch_loss(imgs, pred)  # pixels, norm_pix: mae.py's squared error

    @torch.no_grad()
    def mask_scores(self, imgs):
        """-> (N, L) scores for random_masking, or None where the encoder draws them (random, block, grid)."""
        N, grid, device = len(imgs), self.encoder.grid, imgs.device
        if self.cfg.masking == "colour":
            return colour_noise(N, grid, device)
        if self.cfg.masking == "attention":
            return attention_scores(self.teacher, imgs)  # the most attended score highest: hidden
        if self.cfg.masking == "hard":
            latent, _, ids_restore = self.encoder(imgs)  # every patch seen (this file's choice)
            predicted = self.forward_decoder(latent, ids_restore)[..., -1]  # (N, L)
            share = self.cfg.hard_share * min(1.0, self.step.item() / max(1, self.cfg.hard_ramp))
            return hard_noise(predicted, self.cfg.mask_ratio, share)
        return None

    def forward(self, imgs):
        cfg = self.cfg
        noise = self.mask_scores(imgs)
        latent, mask, ids_restore = self.encoder(imgs, cfg.mask_ratio, cfg.masking, noise)
        out = self.forward_decoder(latent, ids_restore)  # (N, L, width)
        if cfg.masking != "hard":
            return self.forward_loss(imgs, out, mask).mean(), {}
        pred = out[..., :-1]  # (N, L, width - 1), and the last output is the predicted loss
        per_patch = self.patch_loss(imgs, pred)  # (N, L)
        loss = (per_patch * mask).sum(1) / mask.sum(1)  # (N,): hidden patches only
        rank = rank_loss(out[..., -1], per_patch.detach(), mask).mean()
        if self.training:
            self.step += 1
        return loss.mean() + rank, {"rank_loss": rank.detach()}


Model = MIM


# ---------------------------------------------------------------------------------------------
# Evaluation: the same probes as the MAE's, and what a codebook keeps

@torch.no_grad()
def codebook_figures(model, data, n=512):
    """How well the codes describe held-out patches: the share of codes in use, and the mean squared
    error of putting each patch's code in its place (pixels in [-1, 1]) beside a one-code baseline."""
    patches = patchify(to_tensor(data.images["val"][:n], "cpu"), model.cfg.patch_size)  # (n, L, d)
    codebook = model.codebook.cpu()
    codes = nearest_code(patches, codebook)  # (n, L)
    error = ((codebook[codes] - patches) ** 2).mean().item()
    return {"codebook_use": codes.unique().numel() / len(codebook), "codebook_mse": error,
            "one_code_mse": patches.var(dim=(0, 1), unbiased=False).mean().item()}


def evaluate(model, data, device, n_probe=4000):
    pixels = model.cfg.target in ("pixels", "norm_pix")
    out = {"best_constant_loss": best_constant_loss(model, data)} if pixels else {}
    if model.cfg.target == "tokens":
        out.update(codebook_figures(model, data))
    if data.shapes:
        out.update(probes(model.encoder, "mim", data, device, n_probe))
    return out


monitor = mae.monitor
