"""What MeRGAN's scripts share (`mergan_jtr.py`, `mergan_ra.py`, `dgr.py` without classes): flags,
data-dependent defaults, Table 1's digit nets (C. Wu et al., "Memory Replay GANs", NeurIPS 2018;
docs/mergan.md); Table 2's are in mergan_lsun.py, imported when asked for. The speed branch
`draw_batches` (plain form: --plain-step) is tested equal (docs/core.md)."""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C


def add_mergan_args(p):
    """The flags the MeRGAN scripts and dgr.py share; each script adds its method's own."""
    p.add_argument("--lambda-gp", type=C.non_negative, default=10.0,
                   help="gradient-penalty weight in Eq. (5) (paper: 10)")
    p.add_argument("--critic-iters", type=C.at_least(1), default=5,
                   help="critic steps per generator step (paper: 5)")
    p.add_argument("--lr", type=C.positive, default=1e-4, help="Adam learning rate, both nets "
                   "(paper: 1e-4, betas 0 and 0.9)")
    p.add_argument("--dim", type=C.at_least(1), default=None,
                   help="width of generator and critic (paper: 32 for dcgan, 64 for resnet)")
    p.add_argument("--arch", default="auto", choices=["auto", "dcgan", "resnet"],
                   help="networks: dcgan = the digit nets (Table 1), resnet = the 64x64 LSUN "
                   "nets (Table 2); auto: resnet for 64x64 images, else dcgan")
    p.add_argument("--final-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="after the last task also report Table 2's Rev acc and the Frechet "
                   "distance of generated to real test images (default: on for lsun)")
    p.add_argument("--inception-fid", action="store_true", help="with --final-metrics, also "
                   "Inception FID (needs torchvision's Inception-v3 weights, downloaded once)")
    p.add_argument("--plain-step", action="store_true", help="draw the fakes with one "
                   "generator call per critic step (draw_batches' plain form): the same "
                   "images to float rounding, more kernel launches on a GPU")
    C.add_cuda_graph_arg(p)  # --cuda-graphs / --no-cuda-graphs (default)


RUN_FLAGS = ("cuda_graphs", "final_metrics", "inception_fid")  # may change on --resume


def mergan_defaults(args):
    """Data-dependent defaults, as the authors' train.sh and code: the ResNet for 64x64 images, else
    the digit DCGAN; authors_iters; REDUCE_BATCH for the digit nets; Table 2's metrics for lsun."""
    size = args.image_size or (64 if args.dataset in ("folder", "lsun") else 32)
    if args.arch == "auto":
        args.arch = "resnet" if size == 64 else "dcgan"
    if args.dim is None:
        args.dim = 64 if args.arch == "resnet" else 32
    if args.iters is None:
        args.iters = authors_iters(args.dataset)
    if args.final_metrics is None:
        args.final_metrics = args.dataset == "lsun"
    if getattr(args, "reduce_batch", 0) is None:  # dgr.py: no per-class batches, no flag
        args.reduce_batch = args.arch == "dcgan"


def authors_iters(dataset):
    """Iterations per task in the authors' train.sh: MNIST 4001, SVHN 8001, LSUN 20001."""
    return {"svhn": 8001, "synth-color": 8001, "lsun": 20001}.get(dataset, 4001)


class CondBatchNorm2d(nn.Module):
    """Conditional BN: batch norm with a per-class scale and offset. As the authors' TF code (tflib
    `cond_batchnorm`), it ALWAYS normalises with batch statistics (no running averages: `.eval()`
    changes nothing). The authors give each replay and evaluation batch one class; here statistics
    are per class within a batch, that protocol in one call. n_classes=None: plain BN;
    per_class_affine=False: one shared scale and offset (the authors' LSUN generator). groups,
    n_groups: other rows that share statistics (JT's mixed batches as one, as joint.py)."""

    def __init__(self, channels, n_classes=None, eps=1e-5, per_class_affine=True):
        super().__init__()
        k = n_classes if n_classes and per_class_affine else 1
        self.n_classes, self.eps = n_classes, eps
        self.scale = nn.Parameter(torch.ones(k, channels))
        self.offset = nn.Parameter(torch.zeros(k, channels))

    def grouping(self, y=None, groups=None, n_groups=None, dtype=torch.float32):
        """Rows sharing statistics: (group id per row, K x N matrix averaging each group's rows);
        None: all (plain BN). Computed once per generator forward, for all layers (`normalise`)."""
        if groups is None and (y is None or not self.n_classes or self.n_classes == 1):
            return None
        if groups is None:  # the default: statistics per class
            groups, n_groups = y, self.n_classes
        member = (groups == torch.arange(n_groups, device=groups.device)[:, None]).to(dtype)
        return groups, member / member.sum(1, keepdim=True).clamp(min=1)           # K x N

    def forward(self, x, y=None, groups=None, n_groups=None):
        return self.normalise(x, y, self.grouping(y, groups, n_groups, x.dtype))

    def normalise(self, x, y, grouping):
        if grouping is None:
            return F.batch_norm(x, None, None, self.scale[0], self.offset[0], training=True,
                                eps=self.eps)
        groups, average = grouping
        n, c = x.shape[:2]
        mean = (average @ x.mean((2, 3)))[groups].view(n, c, 1, 1)  # each row's group mean
        centred = x - mean
        var = (average @ centred.square().mean((2, 3)))[groups]     # biased, as BN
        # normalise, scale and shift in one pass: centred * (scale / std) + offset
        if len(self.scale) > 1:  # per class
            scale, offset = self.scale[y], self.offset[y].view(n, c, 1, 1)
        else:
            scale, offset = self.scale[0], self.offset[0].view(1, c, 1, 1)
        a = (scale * torch.rsqrt(var + self.eps)).view(n, c, 1, 1)
        return torch.addcmul(offset, centred, a)


class Generator(nn.Module):
    """MeRGAN's digit DCGAN with conditional BN (docs/mergan.md): z (nz=128) -> Linear ->
    4x4 x 4dim -> cBN, ReLU -> [ConvT 5x5 s2, cBN, ReLU] ... -> ConvT 5x5 s2 -> tanh; dim=32 at
    32 px: 128 -> 64 -> 32 -> channels; 64 px: one more block; n_classes=None: unconditional."""

    def __init__(self, channels=1, n_classes=10, dim=32, nz=128, image_size=32):
        super().__init__()
        n_up = int(math.log2(image_size // 4))
        if 4 * 2 ** n_up != image_size:
            raise C.UserError(f"image size {image_size} must be 4 x a power of two (32, 64)")
        widths = [dim * 2 ** i for i in reversed(range(n_up))]   # e.g. [128, 64, 32]
        self.nz, self.top, self.n_classes = nz, widths[0], n_classes
        self.fc = nn.Linear(nz, 4 * 4 * widths[0])
        self.bns = nn.ModuleList([CondBatchNorm2d(w, n_classes) for w in widths])
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i], widths[i + 1], 5, 2, 2, output_padding=1)
             for i in range(n_up - 1)]
            + [nn.ConvTranspose2d(widths[-1], channels, 5, 2, 2, output_padding=1)])

    def forward(self, z, y=None, groups=None, n_groups=None):
        """Images for noise z and labels y; groups, n_groups: see CondBatchNorm2d."""
        h = self.fc(z).view(len(z), self.top, 4, 4)
        grouping = self.bns[0].grouping(y, groups, n_groups, h.dtype)  # once, for every layer
        for bn, up in zip(self.bns, self.ups):
            h = up(F.relu(bn.normalise(h, y, grouping)))  # ConvTranspose2d 5x5, stride 2
        return torch.tanh(h)


def draw_batches(G, z, y, batch, per_class=True, plain=False):
    """G(z, y) for consecutive batches of `batch` rows, each normalised as its own batch (per class;
    per_class=False: as one, JT's; y None: unconditional), e.g. all critic steps' fakes of an
    iteration. Plain form (--plain-step): one G call per batch. SPEED BRANCH: one call whose
    batch-norm groups are the (batch, class) pairs: the same images (tested), fewer launches."""
    if plain:
        out = []
        for i in range(0, len(z), batch):
            zb, yb = z[i:i + batch], None if y is None else y[i:i + batch]
            out.append(G(zb, yb) if per_class or yb is None else G(zb, yb, torch.zeros_like(yb), 1))
        return torch.cat(out)
    block = torch.arange(len(z), device=z.device) // batch   # which batch each row is in
    n_blocks = -(-len(z) // batch)
    if y is not None and per_class and G.n_classes:
        return G(z, y, block * G.n_classes + y, n_blocks * G.n_classes)
    return G(z, y, block, n_blocks)


class Critic(nn.Module):
    """MeRGAN's digit critic: 5x5 s2 convs (dim, 2dim, 4dim), LeakyReLU 0.2, no normalisation
    (WGAN-GP), two linear heads: the critic D (one score), the auxiliary classifier C (n_classes
    logits; None: none). forward returns (score N, logits N x n_classes or None)."""

    def __init__(self, channels=1, n_classes=10, dim=32, image_size=32):
        super().__init__()
        n_down = int(math.log2(image_size // 4))
        widths = [channels] + [dim * 2 ** i for i in range(n_down)]
        self.convs = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 5, 2, 2)
                                    for i in range(n_down)])
        feat = widths[-1] * 4 * 4
        self.critic = nn.Linear(feat, 1)
        self.classifier = nn.Linear(feat, n_classes) if n_classes else None

    def forward(self, x):
        h = x
        for conv in self.convs:  # Conv2d 5x5, stride 2
            h = F.leaky_relu(conv(h), 0.2)
        h = h.flatten(1)
        logits = self.classifier(h) if self.classifier is not None else None
        return self.critic(h).squeeze(1), logits


def mergan_networks(arch, channels, n_classes, dim, image_size, critic_classes):
    """Table 1's generator and critic (critic_classes: its classifier head's size, None: none)."""
    assert arch == "dcgan", "--arch resnet: use mergan_lsun.mergan_networks"
    return (Generator(channels, n_classes, dim, image_size=image_size),
            Critic(channels, critic_classes, dim, image_size=image_size))
