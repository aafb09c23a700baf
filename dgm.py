"""DGM: Dynamic Generative Memory, DGM-w (weight masks) and DGM-a (activation masks).

Paper: O. Ostapenko, M. Puscas, T. Klein, P. Jaehnichen, M. Nabi, "Learning to Remember: A
Synaptic Plasticity Driven Framework for Continual Learning", CVPR 2019 (arXiv:1904.03137).
Where the paper is less specific than the authors' code (SAP machine-learning-dgm,
`approaches/DGMw.py`, `DGMa.py`, `networks/net_DGM*.py`, `cfg/*.yml`), we follow the code;
docs/dgm.md maps every step to both and lists our departures.

One conditional generator G learns every task. For each task t it learns a binary mask
m_t = sigma(s * e_t) over its weights (DGM-w) or its units (DGM-a), HAT-style: s is annealed
from 1/s_max to s_max, so that the mask ends binary. What task t reserved (M <- max(M, m_t))
is frozen for later tasks, a sparsity term keeps each task from reserving more than it needs,
and after each task the network grows by what was reserved (constant free capacity). The
AC-GAN discriminator D is also the solver: its auxiliary head classifies the current task's
real data plus G's replays of every earlier class; its accuracy on the real test set of all
classes seen is DGM's A_t, reported as the authors do at the best validation check of the
task (a split held out of the training images), beside the final model's.

    python dgm.py --dataset mnist                 # DGM-w, the authors' MNIST config
    python dgm.py --dataset mnist --variant a     # DGM-a
    python dgm.py --dataset synth --classes 0,1,2 --iters 300 --eval-samples 320  # CPU minutes
    python dgm.py --dataset synth --replay none   # forgetting baseline: no replay for D
"""
import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import taskrun as R

# The authors' cfg/*.yml (docs/dgm.md, "Hyperparameters"), plus their per-config switches:
# keep_d (= not reinit_D), aux_g (the AC loss on G), the share of each class's training
# images held out for model selection (their loaders: 15% MNIST, 10% SVHN) and the epochs
# between validation checks (DGMw.py: every 2; DGMa.py: `epoch % 5 == 0`). Rows without an
# authors' config are our choices, marked "ours"; docs/dgm.md says why.
DIGITS = dict(lambda_gp=1.0, ndf=32, batch_size=64, keep_d=False, aux_g=False)
FOLDER = dict(epochs=101, lr=2e-4, lambda_ru=0.001, lambda_gp=0.6, ngf=64, ndf=128,
              batch_size=70, keep_d=True, aux_g=True, val_split=0.10)
CONFIGS = {
    ("mnist", "w"): dict(DIGITS, epochs=101, lr=2e-3, s_max=1e4, lambda_ru=0.08, ngf=6,
                         val_split=0.15, val_every=2),
    ("mnist", "a"): dict(DIGITS, epochs=101, lr=2e-3, s_max=1e5, lambda_ru=0.01, ngf=20,
                         val_split=0.15, val_every=5),
    ("svhn", "w"): dict(DIGITS, epochs=151, lr=5e-4, s_max=1e4, lambda_ru=0.001, ngf=6,
                        val_split=0.10, val_every=2),
    ("svhn", "a"): dict(DIGITS, epochs=151, lr=5e-4, s_max=1e5, lambda_ru=0.001, ngf=20,
                        val_split=0.10, val_every=5),                        # ours
    # `folder` (ours): the hyperparameters and switches of the authors' ImageNet-50 run
    # (32 px, D kept, AC loss on G) on OUR digit networks, not their ResNet G / ResNet-18 D:
    # not the paper's ImageNet-50 setting (docs/dgm.md).
    ("folder", "w"): dict(FOLDER, s_max=1e4, val_every=2),
    ("folder", "a"): dict(FOLDER, s_max=1e5, val_every=5),
}
# Datasets without a config borrow one: grey digits -> MNIST's, colour -> SVHN's. The offline
# sets (1,000 images per class = 16 batches an epoch) are for CPU budgets: fewer epochs.
BORROW = {"fashion": "mnist", "synth": "mnist", "cifar10": "svhn", "synth-color": "svhn"}
OFFLINE = {"synth": dict(epochs=20), "synth-color": dict(epochs=30)}
CLIP_GRAD = 10000.0   # authors: clip_grad_norm_(G, 10000)
THRES_COSH = 50.0     # authors / HAT: clamp of s*e inside cosh


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, iters=None, batch_size=None)
    p.add_argument("--variant", default="w", choices=["w", "a"],
                   help="w: DGM-w, a mask per weight; a: DGM-a, a mask per unit (activation)")
    p.add_argument("--epochs", type=C.at_least(1), default=None, help="epochs per task "
                   "(authors: 101 MNIST, 151 SVHN): the default --iters and s's schedule")
    p.add_argument("--lr", type=C.positive, default=None, help="Adam's of G and D, betas "
                   "0.5/0.999 (authors: 2e-3 MNIST, 5e-4 SVHN)")
    p.add_argument("--s-max", type=C.positive, default=None, help="final slope of the mask "
                   "sigmoid (authors: 1e4 DGM-w, 1e5 DGM-a)")
    p.add_argument("--lambda-ru", type=C.non_negative, default=None, help="weight of the "
                   "sparsity term R_t (authors: 0.08 MNIST DGM-w, 0.01 DGM-a, 0.001 SVHN)")
    p.add_argument("--lambda-gp", type=C.non_negative, default=None,
                   help="gradient-penalty weight (authors: 1.0 digits, 0.6 ImageNet)")
    p.add_argument("--ngf", type=C.at_least(1), default=None, help="G's width before any "
                   "growth: 4ngf, 2ngf, ngf channels (authors: 6 DGM-w, 20 DGM-a)")
    p.add_argument("--ndf", type=C.at_least(1), default=None,
                   help="discriminator width: ndf, 2ndf, 4ndf channels (authors: 32 digits)")
    p.add_argument("--nz", type=C.at_least(1), default=128, help="noise size; its first "
                   "n_classes entries hold the label's one-hot (authors)")
    p.add_argument("--replay", default="generated", choices=["generated", "none"],
                   help="generated: D's classifier also learns from G's replays of every "
                        "earlier class (DGM); none: the current task only (forgetting baseline)")
    p.add_argument("--replay-size", type=C.at_least(1), default=None, help="replays per "
                   "earlier class (default, authors: the task's training-set size)")
    p.add_argument("--d-norm", default="batch", choices=["batch", "none"],
                   help="BN in D's 2nd and 3rd conv: batch (the authors'; its statistics follow "
                        "every pass, the final model can collapse, A_t relies on the best "
                        "validation check) or none (WGAN-GP's advice: steadier; for --val-split "
                        "0); docs/dgm.md")
    p.add_argument("--keep-d", action=argparse.BooleanOptionalAction, default=None,
                   help="keep D's conv layers across tasks (heads are reset); --no-keep-d "
                        "re-initialises D per task. Default: the authors' (digits: no; folder: "
                        "keep)")
    p.add_argument("--aux-g", action=argparse.BooleanOptionalAction, default=None,
                   help="add the AC-GAN loss of G's images to G's loss (the authors' aux_G). "
                        "Default: theirs (digits: off; folder, their ImageNet run: on)")
    p.add_argument("--val-split", type=C.fraction, default=None,
                   help="share of each class's training images held out for model selection "
                        "(authors: 0.15 MNIST, 0.10 SVHN): A_t at the best check, beside the "
                        "final model's. 0: no split, the final model")
    p.add_argument("--val-every", type=C.at_least(1), default=None, help="epochs between "
                   "validation checks, plus one at a task's end (authors: 2 DGM-w, 5 DGM-a)")
    p.add_argument("--to-32px", default="resize", choices=["resize", "pad"],
                   help="28x28 digits (mnist, fashion) to 32x32: resize (bilinear, the DGM "
                        "authors') or pad (zero border, MeRGAN's)")
    C.add_cuda_graph_arg(p)  # --cuda-graphs / --no-cuda-graphs (default)
    args = R.parse_run_args(p, argv, run_flags=("cuda_graphs",), script="dgm")
    if args.dataset == "folder" and args.image_size is None:
        args.image_size = 32  # the authors' ImageNet-50 run is at 32x32
    key = (BORROW.get(args.dataset, args.dataset), args.variant)
    cfg = {**CONFIGS.get(key, CONFIGS[("mnist", args.variant)]), **OFFLINE.get(args.dataset, {})}
    for name, value in cfg.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    n_classes = C.dataset_info(args.dataset)[1]  # None for folder: checked in main
    if args.dataset == "lsun":
        raise C.UserError("DGM is not run on lsun (MeRGAN's Table 2 scenes, read by the MeRGAN "
                          "scripts only); use --dataset folder for your own scenes")
    if n_classes and args.nz < n_classes:
        raise C.UserError(f"--nz {args.nz}: the label's one-hot is written into the noise's "
                          f"first entries, so --nz must be at least {n_classes} on {args.dataset}")
    R.refuse_unread(p, argv, {  # flags this run would never read
        "replay_size": (args.replay == "generated", "with --replay generated"),
        "val_every": (args.val_split > 0, "with a validation split (--val-split above 0)"),
        "to_32px": (args.dataset in ("mnist", "fashion"), "with 28-px digits (mnist, fashion)")})
    return args


# -- The generator with learned binary masks and dynamic expansion -------------------------
def dcgan_init(m):
    """The authors' `weights_init`: convolutions N(0, 0.02), BN scale N(1, 0.02) and offset
    0. Linear layers keep PyTorch's default (their `weights_init` does not touch them)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def init_masked_weight(variant, shape, grown=False):
    """A masked layer's weight tensor as the authors initialise it (docs/dgm.md, "Weight
    initialisation"). DGM-w: Xavier-uniform, gain sqrt(2) (`weights_init_g`) at the start
    (`net_DGMw.py`), N(0, 0.02) (`weights_init`) when grown (Plastic_ConvTranspose2d.expand);
    DGM-a the other way round (`net_DGMa.py`; ConvTranspose2d.extand). A `grown` tensor is
    drawn whole, then the old weights are copied into its corner, as the authors do."""
    w = torch.empty(shape)
    if (variant == "w") != grown:
        return nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain("relu"))
    return nn.init.normal_(w, 0.0, 0.02)


class DGMGenerator(nn.Module):
    """The authors' digit generator with HAT masks (docs/dgm.md). Masked, shared layers:
    ConvT 4x4 (nz -> 4ngf, 1x1 -> 4x4), ConvT 4x4 s2 (-> 2ngf, 8x8), ConvT 4x4 s2 (-> ngf,
    16x16), no biases, each followed by a per-task BatchNorm and ReLU; per task an unmasked
    output ConvT 4x4 s2 (-> channels, 32x32) + tanh; 64x64: one more masked layer. Task t
    uses the first caps[t] channels of each layer (its widths): later units never reach it."""

    def __init__(self, variant, channels, n_classes, ngf, nz=128, image_size=32):
        super().__init__()
        n = int(math.log2(image_size)) - 2
        if 2 ** (n + 2) != image_size or n < 3:
            raise C.UserError(f"image size {image_size} must be a power of two >= 32")
        self.variant, self.channels, self.n_classes, self.nz = variant, channels, n_classes, nz
        self.widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]   # 32px: 4ngf, 2ngf, ngf
        self.initial_channels = sum(self.widths)
        self.caps = []                                              # caps[t]: widths of task t
        ins = [nz] + self.widths[:-1]
        self.weights = nn.ParameterList([nn.Parameter(init_masked_weight(variant, (i, o, 4, 4)))
                                         for i, o in zip(ins, self.widths)])
        for l in range(n):  # M_{<t}: union of earlier tasks' binarised masks (1 = reserved)
            self.register_buffer(f"reserved_{l}", torch.zeros(self.mask_shape(l)))
        self.emb = nn.ModuleList([nn.ParameterList() for _ in range(n)])  # emb[l][t] = e_t
        self.bns = nn.ModuleList()    # bns[t][l]: per-task batch norm (authors)
        self.outs = nn.ModuleList()   # outs[t]: per-task output layer, not masked (authors)

    # --- shapes and masks -----------------------------------------------------------------
    def mask_shape(self, l):
        """DGM-w: one entry per weight; DGM-a: one per output unit (channel)."""
        return tuple(self.weights[l].shape) if self.variant == "w" else (self.widths[l],)

    def reserved(self, l):
        return getattr(self, f"reserved_{l}")

    def mask(self, l, t, s):
        """m_t = sigma(s * e_t) for layer l (HAT mask, Serra et al. 2018; DGM's binary mask
        learning)."""
        return torch.sigmoid(s * self.emb[l][t])

    def free(self, l):
        """1 - M_{<t} in the shape of layer l's weight: 1 where the weight may still learn.
        DGM-a (authors' get_view_for): a weight is frozen when both its input unit and its
        output unit are reserved; for the first layer (input = z) when its output unit is."""
        if self.variant == "w":
            return 1.0 - self.reserved(l)
        out = self.reserved(l).view(1, -1, 1, 1)
        if l == 0:
            return (1.0 - out).expand_as(self.weights[l])
        inp = self.reserved(l - 1).view(-1, 1, 1, 1)
        return 1.0 - torch.minimum(inp, out).expand_as(self.weights[l])

    # --- tasks ----------------------------------------------------------------------------
    def add_task(self):
        """Open task t = len(caps): embeddings at 0 (mask 0.5, authors), a BN per layer, an
        output layer; the task will use the network at its present widths. Init (authors):
        the first task's BNs N(1, 0.02) (weights_init), later tasks' BNs and every output
        layer PyTorch's default (theirs are created with no init call)."""
        dev = self.weights[0].device
        self.caps.append(list(self.widths))
        for l in range(len(self.widths)):
            self.emb[l].append(nn.Parameter(torch.zeros(self.mask_shape(l), device=dev)))
        self.bns.append(nn.ModuleList([nn.BatchNorm2d(w) for w in self.widths]).to(dev))
        self.outs.append(nn.ConvTranspose2d(self.widths[-1], self.channels, 4, 2, 1,
                                            bias=False).to(dev))
        if len(self.caps) == 1:
            self.bns[-1].apply(dcgan_init)
        return len(self.caps) - 1

    def growth_factor(self):
        """Channels now / channels at the start: the authors scale lambda_RU by it
        (`lamb_G * total_size / free_size`), so that the sparsity term keeps its pull as the
        network grows."""
        return sum(self.widths) / self.initial_channels

    @torch.no_grad()
    def end_task(self, t, s_max):
        """Binarise task t's mask at s_max, M <- max(M, m_t) (authors: threshold 0.5), then
        grow. Returns the number of entries newly reserved in each layer."""
        new = []
        for l in range(len(self.widths)):
            m = (self.mask(l, t, s_max) >= 0.5).float()
            before = self.reserved(l).sum()
            self.reserved(l).copy_(torch.maximum(self.reserved(l), m))
            new.append(int(self.reserved(l).sum() - before))
        self.expand(new)
        return new

    @torch.no_grad()
    def expand(self, new):
        """Dynamic network expansion (DGM's growth step): add as much as was newly reserved,
        so that the free capacity stays constant. DGM-a: n_new output units per layer.
        DGM-w (authors' `extand`): ceil(n_new / (fan_in * 4 * 4)) output channels, after
        counting the weights that the previous layer's new channels already add as inputs.
        New weights are drawn as the authors draw them (`init_masked_weight`); they are free
        (M = 0); earlier tasks never see them (caps)."""
        add_in = 0
        for l, n_new in enumerate(new):
            w = self.weights[l]
            c_in, c_out = w.shape[0] + add_in, w.shape[1]
            if self.variant == "a":
                add_out = n_new
            else:
                gained = add_in * c_out * 16
                add_out = max(math.ceil((n_new - gained) / (c_in * 16)), 0)
            grown = init_masked_weight(self.variant, (c_in, c_out + add_out, 4, 4),
                                       grown=True).to(w.device)
            grown[:w.shape[0], :c_out] = w
            self.weights[l] = nn.Parameter(grown)
            self.widths[l] = c_out + add_out
            old = self.reserved(l)
            res = torch.zeros(self.mask_shape(l), device=old.device)
            res[tuple(slice(0, k) for k in old.shape)] = old
            setattr(self, f"reserved_{l}", res)
            add_in = add_out

    def sparsity(self, t, s):
        """R_t, DGM's sparsity regulariser (authors' `criterion`): the share of the still-free
        capacity that task t's mask takes, sum m_t (1 - M_{<t}) / sum (1 - M_{<t}); for
        t = 0 it is sum m / numel, since nothing is reserved yet."""
        num, den = 0.0, 0.0
        for l in range(len(self.widths)):
            free = 1.0 - self.reserved(l)
            num = num + (self.mask(l, t, s) * free).sum()
            den = den + free.sum()
        return num / den.clamp(min=1.0)

    def protect_and_compensate(self, t, s, s_ep):
        """After backward, before the optimiser step (authors' order).
        Plasticity protection (HAT gradient masking): grad W <- grad W * (1 - M_{<t}), so
        that weights earlier tasks reserved never move. HAT embedding-gradient compensation
        (authors' form): grad e <- grad e * (s_ep / s) * (cosh(clamp(s e, +-50)) + 1)
        / (cosh(e) + 1)."""
        for l in range(len(self.widths)):
            w = self.weights[l]
            if w.grad is not None:
                w.grad.mul_(self.free(l))
            e = self.emb[l][t]
            if e.grad is not None:
                num = torch.cosh(torch.clamp(s * e.detach(), -THRES_COSH, THRES_COSH)) + 1
                den = torch.cosh(e.detach()) + 1
                e.grad.mul_((s_ep / s) * num / den)

    # --- forward --------------------------------------------------------------------------
    def forward(self, z, y, t, s, masked=True):
        """Images of task t for noise z and labels y at mask slope s. masked=False runs the
        same network without masks (only for the speed benchmark)."""
        z = torch.cat([F.one_hot(y, self.n_classes).to(z.dtype), z[:, self.n_classes:]], 1)
        h, c_in = z.view(len(z), self.nz, 1, 1), self.nz
        for l, c_out in enumerate(self.caps[t]):
            w = self.weights[l][:c_in, :c_out]
            if masked and self.variant == "w":
                w = w * self.mask(l, t, s)                      # DGM-w: masked weights
            h = F.conv_transpose2d(h, w, stride=1 if l == 0 else 2, padding=0 if l == 0 else 1)
            h = F.relu(self.bns[t][l](h))
            if masked and self.variant == "a":
                h = h * self.mask(l, t, s).view(1, -1, 1, 1)    # DGM-a: masked units
            c_in = c_out
        return torch.tanh(self.outs[t](h))

    # --- size ---------------------------------------------------------------------------
    def size(self):
        shared = sum(w.numel() for w in self.weights)
        total = sum(p.numel() for p in self.parameters())
        reserved = [int(self.reserved(l).sum()) for l in range(len(self.widths))]
        return {"channels": list(self.widths), "shared_params": shared, "total_params": total,
                "reserved": reserved,
                "free_fraction": 1 - sum(reserved) / sum(self.reserved(l).numel()
                                                          for l in range(len(self.widths)))}


# -- Checkpoints of the growing generator --------------------------------------------------
def rebuild_structure(G, state):
    """Give G the structure of a grown DGMGenerator's state dict, read from its shapes: the
    widths (shared weights) and the tasks (output layers, with the widths of their time: the
    embeddings' shapes), as tensors for `G.load_state_dict(state)` to fill."""
    dev = G.weights[0].device
    G.widths = [state[f"weights.{l}"].shape[1] for l in range(len(G.widths))]
    for l, w in enumerate(G.widths):
        G.weights[l] = nn.Parameter(torch.empty_like(state[f"weights.{l}"], device=dev))
        setattr(G, f"reserved_{l}", torch.zeros(G.mask_shape(l), device=dev))
    G.caps, G.emb = [], nn.ModuleList([nn.ParameterList() for _ in G.widths])
    G.bns, G.outs = nn.ModuleList(), nn.ModuleList()
    while f"outs.{len(G.caps)}.weight" in state:  # re-open every task at its widths
        t = len(G.caps)
        emb = [state[f"emb.{l}.{t}"] for l in range(len(G.widths))]
        cap = [e.shape[1] if G.variant == "w" else e.shape[0] for e in emb]
        for l, e in enumerate(emb):
            G.emb[l].append(nn.Parameter(torch.zeros(e.shape, device=dev)))
        G.caps.append(cap)
        G.bns.append(nn.ModuleList([nn.BatchNorm2d(w) for w in cap]).to(dev))
        G.outs.append(nn.ConvTranspose2d(cap[-1], G.channels, 4, 2, 1, bias=False).to(dev))
    return G


# -- The discriminator, which is also the incremental classifier (the "solver") ------------
class SolverD(nn.Module):
    """The authors' AC-GAN discriminator: 5x5 s2 convs (ndf, 2ndf, 4ndf) without biases,
    LeakyReLU 0.2; a critic head (1 score) and a classifier head with a row per class, of
    which only the seen classes' are used (= the authors' head that grows with every task).
    Init (authors): convs N(0, 0.02), BN N(1, 0.02), heads PyTorch's default. norm="batch":
    the authors' BN after the 2nd and 3rd conv, whose running statistics every train-mode pass
    moves (classifier, real, fake, interpolates, G's fakes) and the test-time solver uses;
    "none": no BN (docs/dgm.md)."""

    def __init__(self, channels, n_classes, ndf, image_size=32, norm="none"):
        super().__init__()
        n = int(math.log2(image_size // 4))
        widths = [channels] + [ndf * 2 ** i for i in range(n)]
        layers = []
        for i in range(n):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 5, 2, 2, bias=False))
            if i > 0 and norm == "batch":
                layers.append(nn.BatchNorm2d(widths[i + 1]))
            layers.append(nn.LeakyReLU(0.2))
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.critic = nn.Linear(widths[-1] * 16, 1)
        self.classifier = nn.Linear(widths[-1] * 16, n_classes)
        self.body.apply(dcgan_init)

    def forward(self, x, seen):
        """(critic score per image, logits over the classes `seen`, a LongTensor)."""
        h = self.body(x)
        return self.critic(h).squeeze(1), self.classifier(h)[:, seen]

    def reset(self, keep_body=False):
        """Authors: both heads are reset at every new task; digits: all of D (reinit_D)."""
        if not keep_body:  # (BN running statistics are not reset: authors' weights_init)
            self.body.apply(dcgan_init)
        self.critic.reset_parameters()
        self.classifier.reset_parameters()


# -- Training ------------------------------------------------------------------------------
def s_schedule(it, iters, epochs, s_max, variant):
    """The authors' annealing of the mask slope within a task. Returns (s, s_ep).
    Per epoch e of E: s_ep = (s_max - 1/s_max) e / E + 1/s_max. DGM-w also anneals within the
    epoch, from 1/s_ep to s_ep (where s_ep < 1 -- with the authors' settings epoch 0 only,
    s_ep = 1/s_max -- we keep s = s_ep: their formula would run down from 1/s_ep, there
    s_max itself, to s_ep)."""
    per = iters / epochs
    e = min(int(it / per), epochs - 1)
    s_ep = (s_max - 1 / s_max) * e / epochs + 1 / s_max
    if variant == "w" and s_ep > 1:
        frac = (it - e * per) / per
        return (s_ep - 1 / s_ep) * frac + 1 / s_ep, s_ep
    return s_ep, s_ep


def hold_out(data, fraction, seed):
    """(train, validation) of a TaskData, as the authors' loaders split: int(fraction * n)
    of the n images of every class go to validation, drawn by a generator seeded with
    `seed` (so that --resume finds the same split). fraction 0: (data, None)."""
    if not fraction:
        return data, None
    g = torch.Generator().manual_seed(seed)
    y = data.y.cpu()
    val = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        n_val = int(fraction * len(idx))
        if not 0 < n_val < len(idx):
            raise C.UserError(f"--val-split {fraction} leaves class {c} ({len(idx)} images) "
                              "without validation or training images; use --val-split 0")
        val.append(idx[torch.randperm(len(idx), generator=g)[:n_val]])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    keep, val = keep.to(data.device), val.to(data.device)
    return (C.TaskData(data.x[keep], data.y[keep], data.device),
            C.TaskData(data.x[val], data.y[val], data.device))


@torch.no_grad()
def build_replay(generate, prev_classes, n_per_class, nz, device):
    """The replay set of task t (authors): n images of every earlier class, drawn once at
    the start of the task by the current G at s_max; kept on the device as uint8, like the
    real data. Returns (TaskData, the earlier classes)."""
    xs, ys = [], []
    for c in prev_classes:
        x = C.generate_class(generate, c, n_per_class, nz, device, batch=256)
        xs.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        ys.append(torch.full((n_per_class,), c, dtype=torch.long, device=device))
    return C.TaskData(torch.cat(xs), torch.cat(ys), device), list(prev_classes)


@dataclass
class TaskSetup:
    """What one DGM iteration needs to know about the task t being learned."""
    t: int                # the task's index
    seen: torch.Tensor    # class ids seen so far, in the order of the classifier's rows
    lookup: torch.Tensor  # class id -> row of the classifier head (-1: not seen)
    replay: object        # None, or (TaskData of replayed images, the earlier classes)
    lam: float            # lambda_RU x growth factor: weight of the sparsity regulariser
    s: torch.Tensor       # HAT mask slope, a device scalar refilled before every iteration
    s_ep: torch.Tensor    # the slope the embedding-gradient compensation scales by


def train_step(G, D, opt_G, opt_D, task, x, y, args, masked=True):
    """One DGM iteration (authors' order) on the real batch x, y of task `task.t`:
    classifier steps on real + replayed images, one WGAN-GP critic step, one generator
    step. Returns the losses, detached (no host synchronisation here)."""
    t, seen, lookup, s, s_ep = task.t, task.seen, task.lookup, task.s, task.s_ep
    # (1) Classifier: the current real batch and one replayed batch per earlier task,
    # shuffled and cut into batch-sized chunks, one Adam step each (authors).
    xa, ya = x, y
    if task.replay is not None:
        data, prev = task.replay
        xr, yr = data.batch(len(y) * t, prev)
        xa, ya = torch.cat([x, xr]), torch.cat([y, yr])
        perm = torch.randperm(len(ya), device=ya.device)
        xa, ya = xa[perm], ya[perm]
    for xb, yb in zip(xa.split(len(y)), ya.split(len(y))):
        cls_loss = F.cross_entropy(D(xb, seen)[1], lookup[yb])        # AC-GAN L_cls (real)
        opt_D.zero_grad(set_to_none=True)
        cls_loss.backward()
        opt_D.step()
    # (2) Critic, WGAN-GP loss (Gulrajani et al. 2017): D(fake) - D(real) + lambda_GP * GP;
    # real and fake batches in separate passes, as the authors do.
    z = torch.randn(len(y), G.nz, device=y.device)
    with torch.no_grad():
        fake = G(z, y, t, s, masked)
    gp = C.gradient_penalty(lambda v: D(v, seen)[0], x, fake)
    d_loss = D(fake, seen)[0].mean() - D(x, seen)[0].mean() + args.lambda_gp * gp
    opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_D.step()
    # (3) Generator: WGAN adversarial loss + lambda_RU * growth * R_t (DGM's sparsity
    # regulariser), + the AC-GAN classification loss of its images where --aux-g is on
    # (authors' aux_G: off for digits).
    D.requires_grad_(False)
    z = torch.randn(len(y), G.nz, device=y.device)
    score, logits = D(G(z, y, t, s, masked), seen)
    adv = -score.mean()
    reg = G.sparsity(t, s) if masked else torch.zeros((), device=y.device)
    g_loss = adv + task.lam * reg
    if args.aux_g:
        g_loss = g_loss + F.cross_entropy(logits, lookup[y])          # AC-GAN L_cls (fake)
    opt_G.zero_grad(set_to_none=True)
    g_loss.backward()
    if masked:
        G.protect_and_compensate(t, s, s_ep)
    torch.nn.utils.clip_grad_norm_(G.parameters(), CLIP_GRAD)
    opt_G.step()
    D.requires_grad_(True)
    return {"d_loss": d_loss.detach(), "g_adv": adv.detach(), "reg": reg.detach(),
            "cls_loss": cls_loss.detach()}


def adam(module, lr):
    """Adam, betas (0.5, 0.999) (authors), through C.adam (capturable on CUDA)."""
    return C.adam(module, lr, (0.5, 0.999))


def new_results():
    """DGM's own metrics, one entry per task (metrics.json, docs/dgm.md): the solver's
    accuracies and A_t as reported and of the final model, the best check's epoch, G's size."""
    return {"solver_acc_matrix": [], "A": [], "solver_acc_matrix_final": [], "A_final": [],
            "best_val_epoch": [], "generator": []}


def validation_checks(iters, epochs, every):
    """The authors' model-selection schedule: after every `every`-th epoch (every 2: epochs
    0, 2, 4, ...) and after the last iteration. Returns {iterations done: epoch}."""
    per = iters / epochs
    checks = {min(iters, round((e + 1) * per)): e for e in range(0, epochs, every)}
    checks.setdefault(iters, epochs - 1)
    return checks


class BestValidation:
    """The authors' model selection (`App.valid`): at every check, the solver's mean
    accuracy on the real validation images of every task seen so far; the test accuracy
    reported for the task is the one at the best check (the first one, if tied). Training
    itself goes on with the latest model: the selection only picks what is reported."""

    def __init__(self):
        self.val, self.test, self.epoch = -1.0, None, None

    def check(self, D, env, tasks_seen, seen, epoch):
        val = float(np.mean(solver_accuracy(D, env.val, tasks_seen, seen)))
        if val > self.val:
            self.val, self.epoch = val, epoch
            self.test = solver_accuracy(D, env.test, tasks_seen, seen)


def train_task(t, G, D, env, args, generate, results):
    """Learn task t: replay set, new task pieces, the loop (with the authors' validation
    checks), binarise, reserve and grow; then D's accuracy on the real test data of every
    seen task (A_t), at the best validation check and of the final model."""
    tasks, dev = env.tasks, env.device
    prev = [c for tk in tasks[:t] for c in tk]
    seen = torch.tensor(prev + tasks[t], device=dev)
    lookup = torch.full((env.n_classes,), -1, dtype=torch.long, device=dev)
    lookup[seen] = torch.arange(len(seen), device=dev)        # class id -> head row
    replay = None
    if prev and args.replay == "generated":
        n = args.replay_size or len(env.train.indices(tasks[t]))
        replay = build_replay(generate, prev, n, G.nz, dev)
    assert G.add_task() == t
    D.reset(keep_body=args.keep_d and t > 0)
    graphed = C.use_cuda_graphs(args, dev)  # --cuda-graphs on a CUDA device
    opt_G, opt_D = adam(G, args.lr), adam(D, args.lr)  # fresh every task
    # The mask slopes s and s_ep live on the device, refilled before every iteration, so
    # that one recorded iteration serves every s (CUDA graphs). float64, like the Python
    # floats they replace: the arithmetic is the same to the last bit.
    s_now, s_ep_now = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(2))
    task = TaskSetup(t, seen, lookup, replay, s=s_now, s_ep=s_ep_now,
                     lam=args.lambda_ru * G.growth_factor())
    iters = args.iters if args.iters is not None else (  # authors: --epochs passes of the set
        args.epochs * math.ceil(len(env.train.indices(tasks[t])) / args.batch_size))
    progress = R.Progress(iters, args.log_every, f"[task {t + 1}/{len(tasks)}] ")
    G.train(), D.train()

    def iteration():
        x, y = env.train.batch(args.batch_size, tasks[t])
        return train_step(G, D, opt_G, opt_D, task, x, y, args)

    # With --cuda-graphs on CUDA the iteration is recorded once in a CUDA graph and replayed;
    # otherwise `step()` is simply `iteration()`.
    step = C.GraphedStep(iteration, graphed)
    checks = {} if env.val is None else validation_checks(iters, args.epochs, args.val_every)
    best = BestValidation()
    for it in range(iters):
        s, s_ep = s_schedule(it, iters, args.epochs, args.s_max, args.variant)
        s_now.fill_(s)
        s_ep_now.fill_(s_ep)
        progress.update(it, dict(step(), s=s))
        if it + 1 in checks:  # model selection on the validation split (authors)
            best.check(D, env, tasks[:t + 1], seen, checks[it + 1])
    new = G.end_task(t, args.s_max)
    size = G.size()
    results["generator"].append(dict(size, task=t + 1, newly_reserved=new))
    final = solver_accuracy(D, env.test, tasks[:t + 1], seen)
    acc = final if best.test is None else best.test  # what the authors report
    pad = [None] * (len(tasks) - t - 1)
    results["solver_acc_matrix"].append(acc + pad)
    results["A"].append(float(np.mean(acc)))
    results["solver_acc_matrix_final"].append(final + pad)
    results["A_final"].append(float(np.mean(final)))
    results["best_val_epoch"].append(best.epoch)
    chosen = ("final model" if best.epoch is None else
              f"best validation at epoch {best.epoch}; final model {np.mean(final):.2f}%")
    print(f"[task {t + 1}/{len(tasks)}] solver accuracy on real test data per task: "
          + " ".join(f"{a:.1f}" for a in acc) + f"  A_{t + 1} = {np.mean(acc):.2f}% ({chosen})"
          f"  | G channels {size['channels']}, {size['shared_params']} shared weights, newly "
          f"reserved {new}, free {100 * size['free_fraction']:.1f}%", flush=True)


@torch.no_grad()
def solver_accuracy(D, test, tasks_seen, seen, batch=1000):
    """A_t's ingredients: accuracy (%) of D's classifier head, restricted to the classes seen
    so far, on the real test images of each seen task."""
    D.eval()  # BN running statistics
    out = []
    for task in tasks_seen:
        x, y = test.subset(task)
        pred = torch.cat([D(x[i:i + batch], seen)[1].argmax(1)
                          for i in range(0, len(x), batch)])
        out.append(100.0 * (seen[pred] == y).float().mean().item())
    D.train()
    return out


def make_generate(G, tasks, n_classes, s_max, device):
    """generate(z, y) for the metrics, grids and replay: each label's own task, masks at
    s_max, BN with its running statistics (authors: G.eval() for replay)."""
    task_of = torch.zeros(n_classes, dtype=torch.long, device=device)
    for t, task in enumerate(tasks):
        task_of[task] = t

    @torch.no_grad()
    def generate(z, y):
        was = G.training
        G.eval()
        ts = task_of[y]
        out = torch.empty(len(y), G.channels, *([4 * 2 ** len(G.widths)] * 2), device=z.device)
        for t in ts.unique().tolist():
            sel = ts == t
            out[sel] = G(z[sel], y[sel], t, s_max)
        G.train(was)
        return out
    return generate


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    R.suspect(args, parse_args(["--dataset", args.dataset, "--variant", args.variant]),
              ("lr", "lambda_ru", "lambda_gp"))  # named if training diverges
    # device, seed, data (28px digits resized to 32, as the authors do), tasks, evaluator
    env = R.setup(args, f"dgm{args.variant}", digits=args.to_32px)
    if args.nz < env.n_classes:  # a folder's class count is known only now
        raise C.UserError(f"--nz {args.nz} must be at least the {env.n_classes} classes")
    G = DGMGenerator(args.variant, env.channels, env.n_classes, args.ngf, args.nz,
                     env.image_size).to(env.device)
    D = SolverD(env.channels, env.n_classes, args.ndf, env.image_size,
                args.d_norm).to(env.device)
    if env.ckpt is not None:  # a grown generator: its checkpoint's structure, then weights
        rebuild_structure(G, env.ckpt.get("models", {}).get("G", G.state_dict()))
    generate = make_generate(G, env.tasks, env.n_classes, args.s_max, env.device)
    env.train, env.val = hold_out(env.train, args.val_split, args.seed)  # authors' split
    results = new_results()  # DGM's own metrics, filled by train_task, checkpointed
    method = f"dgm-{args.variant}" + ("-noreplay" if args.replay == "none" else "")

    # The continual-learning protocol: train task t, measure every class seen so far, save.
    run = R.TaskRun(args, env, method, {"G": G, "D": D}, generate, nz=args.nz, extra=results)
    for t in run.remaining_tasks():  # with --resume: after the last checkpointed task
        train_task(t, G, D, env, args, generate, results)  # + D's solver accuracy A_t
        run.end_task(t)  # generated-sample Acc of every class seen, sample grid, checkpoint
    metrics = run.finish()
    if metrics is None:
        return None
    # The solver's A_t (at the best validation check where --val-split > 0, the authors'),
    # the final model's, and G's plasticity: the generated-sample Acc of the newest task
    # (the solver's A_t cannot show it: it learns that task from real data).
    header = (["after task"] + [",".join(map(str, task)) for task in env.tasks]
              + ["A_t", "A_t final model", "G: newest task Acc"])
    rows = [[t + 1] + results["solver_acc_matrix"][t]
            + [results["A"][t], results["A_final"][t], run.R[t][t]]
            for t in range(len(env.tasks))]
    selection = (f"at the best of the validation checks every {args.val_every} epochs "
                 f"({args.val_split:.0%} of the training images held out)"
                 if args.val_split else "of the final model (--val-split 0)")
    print(f"\n{method}: accuracy (%) of D's classifier on the real test data of each task, "
          f"{selection}")
    print(C.fmt_table(header, rows))
    rows = [[g["task"], str(g["channels"]), g["shared_params"], g["total_params"],
             str(g["newly_reserved"]), 100 * g["free_fraction"]] for g in results["generator"]]
    print("\ngenerator size after each task")
    print(C.fmt_table(["task", "channels", "shared weights", "all params", "newly reserved",
                       "free %"], rows))
    return metrics


if __name__ == "__main__":
    R.cli(main)
