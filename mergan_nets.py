"""What MeRGAN's two scripts, `mergan_jtr.py` and `mergan_ra.py`, share: flags, networks,
Table 2's data and measures.

Paper: C. Wu et al., "Memory Replay GANs", NeurIPS 2018 (docs/mergan.md). The authors' nets:

  - Table 1 (digits): a DCGAN generator with conditional batch norm (`Generator`) and a
    WGAN-GP critic with an auxiliary classifier head (`Critic`);
  - Table 2 (LSUN, 64x64): WGAN-GP's ResNets (`ResNetGenerator`, `ResNetCritic`);
  - Table 2's data, LSUN's lmdb files (`load_lsun`, `common.load_dataset('lsun')`), and its
    rows besides Acc: reverse accuracy and Frechet distances (`table2_report`);
  - the flags and data-dependent defaults of both scripts (`add_mergan_args`,
    `mergan_defaults`).

The digit nets carry two speed branches (`conv5_s2`, `Critic.input_gradient`), and
`draw_batches` one, each beside the plain form it replaces (--plain-step) and tested equal.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C


def add_mergan_args(p, table2=True):
    """The flags both MeRGAN scripts share (the paper's WGAN-GP settings, the networks, Table
    2's report, the speed branches); each script adds its method's own. table2=False (dgr.py,
    the digit nets only): without --arch, --final-metrics and --inception-fid."""
    p.add_argument("--lambda-gp", type=C.non_negative, default=10.0,
                   help="gradient-penalty weight in Eq. (5) (paper: 10)")
    p.add_argument("--critic-iters", type=C.at_least(1), default=5,
                   help="critic steps per generator step (paper: 5)")
    p.add_argument("--lr", type=C.positive, default=1e-4, help="Adam learning rate, both nets "
                   "(paper: 1e-4, betas 0 and 0.9)")
    p.add_argument("--dim", type=C.at_least(1), default=None,
                   help="width of generator and critic (paper: 32 for dcgan, 64 for resnet)")
    if table2:
        p.add_argument("--arch", default="auto", choices=["auto", "dcgan", "resnet"],
                       help="networks: dcgan = the digit nets (Table 1), resnet = the 64x64 "
                            "LSUN nets (Table 2); auto: resnet for 64x64 images, else dcgan")
        p.add_argument("--final-metrics", action=argparse.BooleanOptionalAction, default=None,
                       help="after the last task also report Table 2's Rev acc and the "
                            "Frechet distance of generated to real test images (default: on "
                            "for lsun)")
        p.add_argument("--inception-fid", action="store_true",
                       help="with --final-metrics, also Inception FID (needs torchvision's "
                            "Inception-v3 weights, downloaded once)")
    p.add_argument("--plain-step", action="store_true", help="the textbook forms only: "
                   "autograd's gradient penalty, plain 5x5 convolutions, torch's for-loop "
                   "Adam and one generator call per critic step, without the speed "
                   "branches (same numbers to float rounding, slower)")
    C.add_cuda_graph_arg(p)  # --cuda-graphs / --no-cuda-graphs (default)


RUN_FLAGS = ("cuda_graphs", "final_metrics", "inception_fid")  # may change on --resume


def mergan_defaults(args):
    """Defaults that depend on the data (the authors' train.sh and code): the 64x64 ResNet
    for 64x64 images, else the digit DCGAN; iterations per task MNIST 4001, SVHN 8001, LSUN
    20001; REDUCE_BATCH on for the digit nets; Table 2's metrics on for lsun."""
    size = args.image_size or (64 if args.dataset in ("folder", "lsun") else 32)
    if args.arch == "auto":
        args.arch = "resnet" if size == 64 else "dcgan"
    if args.dim is None:
        args.dim = 64 if args.arch == "resnet" else 32
    if args.iters is None:
        args.iters = authors_iters(args.dataset)
    if args.final_metrics is None:
        args.final_metrics = args.dataset == "lsun"
    if args.reduce_batch is None:  # the authors: True for mnist/svhn, False for lsun
        args.reduce_batch = args.arch == "dcgan"


def authors_iters(dataset):
    """Iterations per task in the authors' train.sh: MNIST 4001, SVHN 8001, LSUN 20001."""
    return {"svhn": 8001, "synth-color": 8001, "lsun": 20001}.get(dataset, 4001)


# Devices on which conv5_s2 / conv_transpose5_s2 regroup; elsewhere (a GPU, whose cuDNN
# kernels need no help) they are the plain ops: the regrouping would add about 120 kernel
# launches per MeRGAN iteration (benchmarks/op_count.py).
SPACE_TO_DEPTH = ("cpu",)


def conv5_s2(x, weight, bias=None):
    """F.conv2d(x, weight, bias, stride=2, padding=2) for a 5x5 kernel, computed on the CPU
    as a 3x3 stride-1 convolution over 2x2 pixel blocks ("space-to-depth"): the kernel is
    padded to 6x6 and image and kernel are regrouped into 4x the channels. The same sums
    (tests compare), but about 2.5x faster on the CPU when x has 1-3 channels, where
    oneDNN's 5x5 stride-2 kernels are slow. Used for the critic's first layer."""
    if x.device.type not in SPACE_TO_DEPTH:
        return F.conv2d(x, weight, bias, stride=2, padding=2)
    w = F.pixel_unshuffle(F.pad(weight, (0, 1, 0, 1)), 2)        # out x 4in x 3 x 3
    return F.conv2d(F.pixel_unshuffle(F.pad(x, (2, 2, 2, 2)), 2), w, bias)


def conv_transpose5_s2(x, weight, bias=None):
    """F.conv_transpose2d(x, weight, bias, stride=2, padding=2, output_padding=1), the
    adjoint of `conv5_s2`, computed the same way (transposed 3x3 conv to 4x the channels,
    then pixel shuffle and crop). Used for the generator's last layer (1-3 output
    channels) and the first layer of the critic's input gradient."""
    if x.device.type not in SPACE_TO_DEPTH:
        return F.conv_transpose2d(x, weight, bias, stride=2, padding=2, output_padding=1)
    w = F.pixel_unshuffle(F.pad(weight, (0, 1, 0, 1)), 2)        # in x 4out x 3 x 3
    h = F.pixel_shuffle(F.conv_transpose2d(x, w), 2)[:, :, 2:-2, 2:-2]
    return h if bias is None else h + bias.view(1, -1, 1, 1)


class CondBatchNorm2d(nn.Module):
    """Batch norm with a per-class scale and offset (conditional BN).

    As in the authors' TF code (tflib `cond_batchnorm`), it ALWAYS normalises with batch
    statistics: in training, in replay and in generation; no running averages exist, so
    `.eval()` changes nothing. The authors give every replay and evaluation batch a single
    class; here the statistics are computed per class within the batch, which is exactly
    that protocol (a mixed batch = one single-class batch per class) in one call.
    With n_classes=None it is plain, unconditional batch norm. per_class_affine=False keeps
    the per-class statistics but one shared scale and offset (the authors' LSUN generator,
    which gets the label through z instead).
    groups, n_groups: which rows share statistics, when not the rows of one class: a tensor
    of group ids in [0, n_groups). The paper's JT (mergan_jtr.py --mode jt) normalises its
    mixed-class batches as one (all zeros, n_groups 1), as the authors' joint.py does.
    """

    def __init__(self, channels, n_classes=None, eps=1e-5, per_class_affine=True):
        super().__init__()
        k = n_classes if n_classes and per_class_affine else 1
        self.n_classes, self.eps = n_classes, eps
        self.scale = nn.Parameter(torch.ones(k, channels))
        self.offset = nn.Parameter(torch.zeros(k, channels))

    def grouping(self, y=None, groups=None, n_groups=None, dtype=torch.float32):
        """Which rows share statistics, as (group id per row, K x N matrix that averages the
        rows of each group); None: the whole batch (plain BN). A generator computes it once
        per forward and gives it to each of its layers (`normalise`)."""
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
    """MeRGAN's digit generator (DCGAN with conditional BN), docs/mergan.md "The networks".

    z (nz=128) -> Linear -> 4x4 x 4dim -> cBN, ReLU -> [ConvT 5x5 s2, cBN, ReLU] ... ->
    ConvT 5x5 s2 -> tanh. dim=32 at 32x32 gives 128 -> 64 -> 32 -> channels, the authors'
    net. image_size 64 adds one up-sampling block. n_classes=None: unconditional.
    fast=False (--plain-step): the last layer is nn.ConvTranspose2d itself; fast=True
    computes the same sums through `conv_transpose5_s2` (a speed branch, tested equal).
    """

    def __init__(self, channels=1, n_classes=10, dim=32, nz=128, image_size=32, fast=True):
        super().__init__()
        self.fast = fast
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
        """Images for noise z and labels y; groups/n_groups: rows that share batch-norm
        statistics (default: the rows of one class; CondBatchNorm2d)."""
        h = self.fc(z).view(len(z), self.top, 4, 4)
        grouping = self.bns[0].grouping(y, groups, n_groups, h.dtype)  # once, for every layer
        for bn, up in zip(self.bns, self.ups):
            h = F.relu(bn.normalise(h, y, grouping))
            if self.fast and up is self.ups[-1]:  # SPEED BRANCH: the same sums as up(h),
                h = conv_transpose5_s2(h, up.weight, up.bias)  # faster for 1-3 channels
            else:
                h = up(h)                          # plain: ConvTranspose2d 5x5, stride 2
        return torch.tanh(h)


def draw_batches(G, z, y, batch, per_class=True, plain=False):
    """G(z, y) for rows that are consecutive batches of `batch` rows, each normalised as a
    batch of its own (per class within it; per_class=False: as one, JT's batches; y None:
    an unconditional G): e.g. the fakes of all critic steps of an iteration, drawn at once
    because G does not change during them.
    Plain form (plain=True, --plain-step): one G call per batch. SPEED BRANCH: one call
    whose batch-norm groups are the (batch, class) pairs: the same images (tests compare)
    with the launches of one call."""
    if plain:
        out = []
        for i in range(0, len(z), batch):
            zb, yb = z[i:i + batch], None if y is None else y[i:i + batch]
            out.append(G(zb, yb) if per_class or yb is None else
                       G(zb, yb, torch.zeros_like(yb), 1))
        return torch.cat(out)
    block = torch.arange(len(z), device=z.device) // batch   # which batch each row is in
    n_blocks = -(-len(z) // batch)
    if y is not None and per_class and G.n_classes:
        return G(z, y, block * G.n_classes + y, n_blocks * G.n_classes)
    return G(z, y, block, n_blocks)


class Critic(nn.Module):
    """MeRGAN's digit critic: 5x5 s2 convs (dim, 2dim, 4dim), LeakyReLU 0.2, no
    normalisation (WGAN-GP), two linear heads on the shared features: the critic D (one
    score) and the auxiliary classifier C (n_classes logits; None: no classifier head).
    forward returns (score N, logits N x n_classes or None). fast=False (--plain-step): the
    first layer is nn.Conv2d itself and the gradient penalty uses autograd; fast=True
    computes the same through `conv5_s2` and `input_gradient` (speed branches, tested equal).
    """

    def __init__(self, channels=1, n_classes=10, dim=32, image_size=32, fast=True):
        super().__init__()
        self.fast = fast
        n_down = int(math.log2(image_size // 4))
        widths = [channels] + [dim * 2 ** i for i in range(n_down)]
        self.convs = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 5, 2, 2)
                                    for i in range(n_down)])
        feat = widths[-1] * 4 * 4
        self.critic = nn.Linear(feat, 1)
        self.classifier = nn.Linear(feat, n_classes) if n_classes else None

    def forward(self, x):
        h = x
        for conv in self.convs:
            if self.fast and conv is self.convs[0]:  # SPEED BRANCH: the same sums as
                h = conv5_s2(h, conv.weight, conv.bias)  # conv(h), faster for 1-3 channels
            else:
                h = conv(h)                           # plain: Conv2d 5x5, stride 2
            h = F.leaky_relu(h, 0.2)
        h = h.flatten(1)
        logits = self.classifier(h) if self.classifier is not None else None
        return self.critic(h).squeeze(1), logits

    def input_gradient(self, x):
        """d score(x) / d x, written out layer by layer, with a graph through the weights
        (what the gradient penalty needs) but not through x.

        The critic is linear maps and LeakyReLUs, so its input gradient is
            grad_x = W_1^T (m_1 * W_2^T (m_2 * ... W_L^T (m_L * w_critic)))
        with m_l = 1 where the pre-activation a_l > 0, else 0.2 (PyTorch's convention at
        a_l = 0), and W_l^T a transposed convolution. The masks are piecewise constant in
        the weights, so their derivative is zero: they are computed without a graph. This is
        the same value and the same weight gradient as autograd's double backward
        (tests/test_common.py checks both), at about two thirds of the cost: autograd also
        back-propagates the (zero) derivative of the masks through every forward conv."""
        masks = []
        with torch.no_grad():
            h = x
            for i, conv in enumerate(self.convs):
                a = conv5_s2(h, conv.weight, conv.bias) if i == 0 else conv(h)
                masks.append(torch.where(a > 0, 1.0, 0.2))
                h = F.leaky_relu(a, 0.2) if i < len(self.convs) - 1 else a  # last: shape only
        g = self.critic.weight.view(1, *h.shape[1:]).expand(len(x), *h.shape[1:])
        for i in reversed(range(len(self.convs))):  # W_l^T: 5x5, stride 2, padding 2
            w = self.convs[i].weight
            g = (conv_transpose5_s2(g * masks[i], w) if i == 0 else
                 F.conv_transpose2d(g * masks[i], w, stride=2, padding=2, output_padding=1))
        return g


# The 64x64 networks of the LSUN experiment (Table 2): the authors' gan64_model.py uses
# WGAN-GP's 64x64 ResNet ("GoodGenerator"/"GoodDiscriminator"): 4 residual blocks up in G
# (batch norm), 4 down in D (layer norm, the right norm for a gradient penalty), DIM 64,
# the label one-hot concatenated to z. ResNetGenerator/ResNetCritic keep the interface of
# Generator/Critic: G(z, y) -> images, D(x) -> (scores, logits), G.nz.
class ResBlockUp(nn.Module):
    """BN, ReLU, 2x nearest upsampling, conv 3x3, BN, ReLU, conv 3x3; plus a shortcut
    (upsampling and a 1x1 conv; done in the other order here, which is the same map)."""

    def __init__(self, c_in, c_out, n_classes):
        super().__init__()
        self.bn1 = CondBatchNorm2d(c_in, n_classes, per_class_affine=False)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn2 = CondBatchNorm2d(c_out, n_classes, per_class_affine=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, y, grouping=None):
        h = self.conv1(F.interpolate(F.relu(self.bn1.normalise(x, y, grouping)),
                                     scale_factor=2))
        h = self.conv2(F.relu(self.bn2.normalise(h, y, grouping)))
        return F.interpolate(self.shortcut(x), scale_factor=2) + h


class ResBlockDown(nn.Module):
    """LN, ReLU, conv 3x3, LN, ReLU, conv 3x3, 2x2 mean pooling; plus a shortcut (mean
    pooling, 1x1 conv). LN = the authors' layer norm: statistics over (C, H, W) per image,
    scale and offset per channel, which is GroupNorm with one group."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.ln1 = nn.GroupNorm(1, c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1, bias=False)
        self.ln2 = nn.GroupNorm(1, c_in, eps=1e-5)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.relu(self.ln1(x)))
        h = F.avg_pool2d(self.conv2(F.relu(self.ln2(h))), 2)
        return self.shortcut(F.avg_pool2d(x, 2)) + h


def resnet_widths(image_size, dim):
    """Channels from 4x4 up to image_size: 64x64 -> [8, 8, 4, 2, 1] x dim (the authors')."""
    n = int(math.log2(image_size // 4))
    if 4 * 2 ** n != image_size or n < 1:
        raise C.UserError(f"image size {image_size} must be 4 x a power of two (16, 32, 64)")
    return [8 * dim] + [min(8, 2 ** (n - 1 - i)) * dim for i in range(n)]


class ResNetGenerator(nn.Module):
    """[z, one_hot(y)] -> Linear -> 4x4 x 8dim -> ResBlockUp x 4 (8, 8, 4, 2, 1 x dim at
    64x64) -> BN, ReLU, conv 3x3 -> tanh. The batch norms use batch statistics per class,
    as the Generator's (the authors' single-class batches), with one shared scale/offset."""

    def __init__(self, channels=3, n_classes=10, dim=64, nz=128, image_size=64):
        super().__init__()
        w = resnet_widths(image_size, dim)
        self.nz, self.n_classes, self.top = nz, n_classes, w[0]
        self.fc = nn.Linear(nz + (n_classes or 0), 4 * 4 * w[0])
        self.blocks = nn.ModuleList([ResBlockUp(w[i], w[i + 1], n_classes)
                                     for i in range(len(w) - 1)])
        self.bn = CondBatchNorm2d(w[-1], n_classes, per_class_affine=False)
        self.out = nn.Conv2d(w[-1], channels, 3, padding=1)

    def forward(self, z, y=None, groups=None, n_groups=None):
        """Images for noise z and labels y; groups/n_groups as in Generator.forward."""
        grouping = self.bn.grouping(y, groups, n_groups, z.dtype)  # once, for every layer
        if self.n_classes:  # the authors' conditioning: the label's one-hot joins z
            z = torch.cat([z, F.one_hot(y, self.n_classes).to(z.dtype)], 1)
        h = self.fc(z).view(len(z), self.top, 4, 4)
        for block in self.blocks:
            h = block(h, y, grouping)
        return torch.tanh(self.out(F.relu(self.bn.normalise(h, y, grouping))))


class ResNetCritic(nn.Module):
    """conv 3x3 (channels -> dim) -> ResBlockDown x 4 (1, 2, 4, 8, 8 x dim at 64x64) ->
    flatten 4x4 x 8dim -> the critic head (1 score) and the classifier head (n_classes
    logits; None: none). No normalisation across the batch, as WGAN-GP requires."""

    def __init__(self, channels=3, n_classes=10, dim=64, image_size=64):
        super().__init__()
        w = list(reversed(resnet_widths(image_size, dim)))
        w[0] = dim
        self.input = nn.Conv2d(channels, dim, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlockDown(w[i], w[i + 1]) for i in range(len(w) - 1)])
        self.critic = nn.Linear(w[-1] * 4 * 4, 1)
        self.classifier = nn.Linear(w[-1] * 4 * 4, n_classes) if n_classes else None

    def forward(self, x):
        h = self.input(x)
        for block in self.blocks:
            h = block(h)
        h = h.flatten(1)
        logits = self.classifier(h) if self.classifier is not None else None
        return self.critic(h).squeeze(1), logits


def mergan_networks(arch, channels, n_classes, dim, image_size, critic_classes, fast=True):
    """MeRGAN's generator and critic: arch 'dcgan' (the digit nets, Table 1) or 'resnet'
    (the LSUN nets, Table 2). critic_classes: size of the classifier head (None: none).
    fast=False (--plain-step): the digit nets without their speed branches."""
    if arch == "resnet":
        return (ResNetGenerator(channels, n_classes, dim, image_size=image_size),
                ResNetCritic(channels, critic_classes, dim, image_size=image_size))
    return (Generator(channels, n_classes, dim, image_size=image_size, fast=fast),
            Critic(channels, critic_classes, dim, image_size=image_size, fast=fast))


# MeRGAN Table 2: four LSUN scene categories, one per task, in this order; the authors use
# 100,000 training images per category and LSUN's validation images (300 each) for testing.
LSUN_CATEGORIES = ("bedroom", "kitchen", "church_outdoor", "tower")
LSUN_PER_CLASS = 100_000


def load_lsun(root, train, size, per_class=LSUN_PER_CLASS):
    """common.load_dataset's `lsun`: Table 2's categories from LSUN's lmdb files in root
    (<category>_train_lmdb / _val_lmdb, as LSUN's download.py writes them): the first
    `per_class` images of each category (every validation image), resized and centre-
    cropped, cached as uint8 tensors in <root>/lsun-cache/. Not torchvision's LSUN class: it
    writes a key cache into the working directory, named by the letters of the root only."""
    split = "train" if train else "val"
    cache = os.path.join(root, "lsun-cache", f"{split}-{size}px-{per_class}.pt")
    if os.path.exists(cache):
        try:
            d = torch.load(cache, map_location="cpu")
            return d["x"], d["y"], list(LSUN_CATEGORIES)
        except Exception:
            pass  # a broken cache is rebuilt below
    paths = [os.path.join(root, f"{c}_{split}_lmdb") for c in LSUN_CATEGORIES]
    missing = [os.path.basename(p) for p in paths if not os.path.isdir(p)]
    if missing:
        raise C.UserError(f"dataset 'lsun' not found in {root} (missing {', '.join(missing)}; "
                        "expected the lmdb folders of LSUN's download.py, e.g. `python "
                        "download.py -c bedroom` then unzip; or export the categories as "
                        "image folders and use --dataset folder)")
    try:
        import lmdb
    except ImportError:
        raise C.UserError("dataset 'lsun' reads LSUN's lmdb databases: pip install lmdb")
    import io
    from PIL import Image
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    xs, ys = [], []
    for label, path in enumerate(paths):
        print(f"lsun: decoding {os.path.basename(path)} ...", flush=True)
        try:
            db = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as err:  # e.g. an empty folder: no data.mdb
            raise C.UserError(f"lsun: {path} is not an lmdb database ({err}); unzip LSUN's "
                              "download there")
        n = len(ys)
        with db.begin(write=False) as txn:
            for i, (_, value) in enumerate(txn.cursor()):
                if train and i >= per_class:
                    break
                try:
                    with Image.open(io.BytesIO(value)) as im:
                        xs.append(tf(im.convert("RGB")))
                except (OSError, ValueError) as err:
                    raise C.UserError(f"lsun: image {i} of {path} cannot be decoded ({err})")
                ys.append(label)
        db.close()
        if len(ys) == n:
            raise C.UserError(f"lsun: {path} holds no images")
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    C.atomic_save({"x": x, "y": y}, cache)
    return x, y, list(LSUN_CATEGORIES)


# ------------------------------------------------------------------------------------------
# Table 2's measures besides Acc
# ------------------------------------------------------------------------------------------
def authors_classifier_body(channels):
    """MeRGAN's own evaluator (common.make_classifier("authors"), --evaluator authors) as
    (layers, feature size): for grey images its MNIST MLP (the 32x32 image flattened,
    1024-512-256-128, pretrain/mnist_test.py), for colour ones its SVHN net (3x3 convs
    32-32 | pool | 64-64 | pool | 128-128-128 | pool, then 512-128, pretrain/svhn_test.py).
    The adaptive poolings are the identity at 32 px."""
    if channels == 1:
        widths = [32 * 32, 1024, 512, 256, 128]
        body = [nn.AdaptiveAvgPool2d(32), nn.Flatten()]
        for w_in, w_out in zip(widths, widths[1:]):
            body += [nn.Linear(w_in, w_out), nn.ReLU()]
        return body, 128
    body, c_in = [], channels
    for block in ([32, 32], [64, 64], [128, 128, 128]):
        for c_out in block:
            body += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            c_in = c_out
        body.append(nn.MaxPool2d(2))
    body += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128 * 16, 512), nn.ReLU(),
             nn.Linear(512, 128), nn.ReLU()]
    return body, 128


def reverse_accuracy(generate, classes, n, nz, test, n_classes, device, steps=1500, width=32,
                     seed=0, x=None):
    """Rev acc (MeRGAN Table 2): train a fresh classifier on n generated images per class
    (labels = the conditioning classes), test it on the real test images of those classes.
    x: those images (n per class, in the order of `classes`) if already generated."""
    if x is None:
        x = torch.cat([C.generate_class(generate, c, n, nz, device) for c in classes])
    y = torch.cat([torch.full((n,), c, dtype=torch.long, device=device) for c in classes])
    model = C.train_classifier(x, y, n_classes, device, steps=steps, width=width, seed=seed)
    tx, ty = test.subset(classes)
    return C.accuracy(model, tx, ty)


def generated_set_metrics(args, env, generate, classes, nz):
    """Metrics of a whole generated set, over every class in `classes`, with --eval-samples
    generated images per class (MeRGAN's Table 2 rows besides Acc):
    - rev_acc: a fresh classifier trained on the generated images (labels = the
      conditioning classes), tested on the real test images of those classes (%);
    - fd_evaluator: Frechet distance between evaluator features of generated and real test
      images (offline; the evaluator's feature layer stands in for Inception);
    - fid_inception (args.inception_fid): the same on torchvision's Inception-v3 features."""
    dev, n = env.device, args.eval_samples
    gen = torch.cat([C.generate_class(generate, c, n, nz, dev) for c in classes])
    width, steps = C.classifier_budget(args.dataset, len(gen))
    tx, _ = env.test.subset(classes)
    res = {"rev_acc": reverse_accuracy(generate, classes, n, nz, env.test, env.n_classes, dev,
                                       steps=steps, width=width, x=gen),
           "rev_acc_steps": steps,
           "fd_evaluator": C.frechet_distance(C.features(env.evaluator, gen),
                                              C.features(env.evaluator, tx))}
    if getattr(args, "inception_fid", False):
        inception = C.inception_features(dev)
        res["fid_inception"] = C.frechet_distance(inception(gen), inception(tx))
    return res


def table2_report(run, paper=None):
    """After the last task of `run` (a common.TaskRun): `generated_set_metrics` over every
    class (Table 2's rows: Rev acc, Frechet distances), added to metrics.json and printed
    beside `paper` = {"acc", "rev_acc", "fid"} if given. Returns metrics.json's dict."""
    t0, env = time.time(), run.env
    final = generated_set_metrics(run.args, env, run.generate, run.all_classes, run.nz)
    metrics = run.write_metrics(seconds=time.time() - t0, **final)
    paper = paper or {}
    rows = [["Acc (%)", metrics["avg_acc"][-1], paper.get("acc")],
            ["Rev acc (%)", final["rev_acc"], paper.get("rev_acc")],
            ["FD, evaluator features", final["fd_evaluator"], None]]
    if "fid_inception" in final:
        rows.append(["FID, Inception (torchvision)", final["fid_inception"], None])
    rows.append(["FID (paper, TF Inception)", None, paper.get("fid")])
    print(f"\nafter task {len(env.tasks)}, all {len(run.all_classes)} classes "
          f"({run.args.eval_samples} generated images per class):")
    print(C.fmt_table(["metric", "ours", "paper"], rows))
    return metrics
