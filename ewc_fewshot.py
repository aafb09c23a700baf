"""Few-shot image generation with Elastic Weight Consolidation.

Paper: Y. Li, R. Zhang, J. Lu, E. Shechtman, "Few-shot Image Generation with Elastic Weight
Consolidation", NeurIPS 2020 (arXiv:2012.02780). Docs: docs/ewc_fewshot.md.

A GAN trained on a large SOURCE domain is adapted to a TARGET domain from K images (1-10),
with no new parameters. Plain fine-tuning copies the K images; EWC anchors every generator
weight to its source value, weighted by how much the source model relies on it:

  1. source stage:     train an unconditional DCGAN on the source (or load --source-ckpt);
  2. Fisher stage:     F_i = E_z[(d log D_S(G(z)) / d theta_i)^2], the diagonal Fisher
                       information of the generator's weights, from the FROZEN source
                       discriminator's log-likelihood of generated images, as the mean of
                       squared PER-SAMPLE gradients;
  3. adaptation stage: fine-tune on the K target images with
                       L_adv + lambda * sum_i F_i (theta_i - theta_S,i)^2   (lambda = 5e8).

Every lambda in --ewc-lambda is adapted from the same source, Fisher and K images; lambda 0
is plain fine-tuning, the baseline. The paper's lambda = 5e8 is tied to the scale of its
StyleGAN's Fisher values; on our DCGANs (Fisher mean ~2e-4) it pins the generator to the
source, and the default is 1e3: the lowest Frechet distance to the target in a sweep on seed
0, then judged against fine-tuning on seeds 1-3 (docs/ewc_fewshot.md). The run ends with a
side-by-side grid (targets, source, each lambda) and a table measured with a JOINT
evaluator, a classifier trained on source and target images together to tell domain and
class apart (so its features see colour as well as shape): the Frechet distance of generated
images to the full target set and to the source set, the share of generated images it calls
"target", the intra-cluster diversity (CDC's protocol, on an uncalibrated LPIPS-style
distance), the balance lambda*sum F*d^2 / L_adv, and the per-layer weight change rate of the
paper's Section 3.1 beside the per-layer mean Fisher. `--shots all` adapts to the whole
target set (the Section 3.1 analysis).

    python ewc_fewshot.py                                   # MNIST -> SVHN, 10 shots (download)
    python ewc_fewshot.py --source synth --target synth-amber --dim 32 --source-iters 1500 \
                          --iters 300                       # offline pair, ~3 CPU minutes
    python ewc_fewshot.py --ewc-lambda 0,1e3,1e4,3e4,1e5,3e5,1e6,5e8  # the lambda sweep
    python ewc_fewshot.py --shots all --ewc-lambda 0          # Section 3.1: abundant target
    python ewc_fewshot.py --source cifar10 --target folder --target-root my_portraits/

MeRGAN's Table 1 baseline "EWC" (Eq. 9, one class per task on the conditional digit GAN) is
a mode of the MeRGAN script: `python mergan_jtr.py --mode ewc`.
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

PAPER_LAMBDA = 5e8        # Li et al.: lambda in all of the paper's experiments (StyleGAN)
STATE_FORMAT = 2          # of checkpoint.pt; 2: the joint evaluator's metrics
DEFAULT_LAMBDA = 1e3      # ours for the DCGANs here: the sweep in docs/ewc_fewshot.md


def shots_arg(text):
    """--shots: a count, or `all` (stored as None: the whole target training set)."""
    if text.strip().lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or `all`, got {text!r}")
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 or `all`, got {k}")
    return k


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-root", default="./data", help="where datasets are read from / "
                   "downloaded to (default of --source-root and --target-root)")
    g.add_argument("--no-download", action="store_true",
                   help="never try the network; fail with a clear message if data is missing")
    g.add_argument("--image-size", type=C.at_least(4), default=None,
                   help="side of the square images (default: the target's, 32 for digits)")
    g.add_argument("--out", default=None, help="run folder (default: "
                   "runs/ewc_fewshot-<source>-to-<target>-s<seed>-<time>)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--seed", type=C.seed, default=0, help="seed for python, numpy and torch; "
                   "also picks the K shots")
    g.add_argument("--batch-size", type=C.at_least(1), default=64, help="minibatch size")
    g.add_argument("--log-every", type=C.at_least(1), default=100,
                   help="print a progress line every this many iterations")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in "
                   "--out after its last finished stage, with the flags it was started "
                   "with (args.json)")
    f = p.add_argument_group("source, target and shots")
    f.add_argument("--source", default="mnist", help="source domain: one of "
                   f"{', '.join(C.DATASETS)} (default mnist: 60,000 digits)")
    f.add_argument("--target", default="svhn", help="target domain: one of "
                   f"{', '.join(C.DATASETS)} (default svhn: the same digits, another look)")
    f.add_argument("--source-root", default=None, help="data root of the source (default: "
                   "--data-root; for `folder`: the image folder)")
    f.add_argument("--target-root", default=None, help="data root of the target (default: "
                   "--data-root; for `folder`: a folder of images, sub-folders optional)")
    f.add_argument("--shots", type=shots_arg, default=10, help="K, the number of target "
                   "images adapted to (paper: 1-10), drawn from the target's training set by "
                   "--seed; `all`: the whole target training set (the paper's Section 3.1 "
                   "analysis with abundant target data; no diversity is measured then)")
    t = p.add_argument_group("training")
    t.add_argument("--source-iters", type=C.at_least(1), default=10000,
                   help="generator iterations of the source stage")
    t.add_argument("--source-ckpt", default=None, help="a source.pt written by an earlier "
                   "run (its run folder holds one): skip the source stage")
    t.add_argument("--iters", type=C.at_least(1), default=1000,
                   help="adaptation iterations per lambda")
    t.add_argument("--ewc-lambda", default=None,
                   help="comma-separated lambdas, each adapted from the same source (0 = plain "
                        "fine-tuning, the baseline; default 0,1e3; the paper's 5e8 pins our "
                        "DCGANs to the source, see docs)")
    t.add_argument("--fisher-samples", type=C.at_least(2), default=1000,
                   help="generated images whose squared per-sample gradients are averaged into "
                        "the Fisher information")
    t.add_argument("--lr", type=C.positive, default=2e-4,
                   help="Adam learning rate (2e-4, betas 0.5/0.999: the DCGAN setting)")
    t.add_argument("--dim", type=C.at_least(1), default=64,
                   help="network width (64 = DCGAN's ngf/ndf)")
    t.add_argument("--nz", type=C.at_least(1), default=100,
                   help="latent size of the DCGAN (100)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--fd-samples", type=C.at_least(2), default=2000,
                   help="generated images for the Frechet distance to the full target set")
    e.add_argument("--diversity-samples", type=C.at_least(2), default=1000,
                   help="generated images for the intra-cluster diversity (~1000 in the papers "
                        "that measure it)")
    e.add_argument("--diversity-cap", type=int, default=50,
                   help="at most this many random members of each cluster enter the "
                        "intra-cluster diversity (CDC's protocol: 50; 0 = every member)")
    e.add_argument("--inception-fid", action="store_true",
                   help="also compute Inception FID (needs torchvision's Inception weights, "
                        "downloaded once)")
    args = C.parse_run_args(p, argv, run_flags=("source_root", "target_root",
                                                "inception_fid"))

    try:
        args.lambdas = ([float(v) for v in args.ewc_lambda.split(",") if v.strip()]
                        if args.ewc_lambda is not None else [0.0, DEFAULT_LAMBDA])
    except ValueError:
        raise C.UserError(f"--ewc-lambda must be comma-separated numbers, got "
                          f"{args.ewc_lambda!r}")
    if not args.lambdas or not all(math.isfinite(v) and v >= 0 for v in args.lambdas):
        raise C.UserError("--ewc-lambda needs at least one value, each finite and >= 0")
    for name in (args.source, args.target):
        C.dataset_info(name)  # unknown names: one-line error
    for side in ("source", "target"):
        root = getattr(args, f"{side}_root")
        if root and os.path.isfile(root):  # else load_dataset's message names --data-root
            raise C.UserError(f"--{side}-root {root} is a file; {getattr(args, side)} needs a "
                              "folder")
    args.source_root = args.source_root or args.data_root
    args.target_root = args.target_root or args.data_root
    # the run folder, checkpoints and --resume key on this name
    args.dataset = f"{args.source}-to-{args.target}"
    if args.diversity_cap < 0 or args.diversity_cap == 1:
        raise C.UserError("--diversity-cap must be 0 (every member) or at least 2, got "
                          f"{args.diversity_cap}")
    C.refuse_unread(p, argv, {  # flags this run would never read
        "diversity_cap": (args.shots is not None, "with a number of --shots (not all)"),
        "diversity_samples": (args.shots is not None, "with a number of --shots (not all)"),
        "source_iters": (args.source_ckpt is None, "without --source-ckpt (it trains the "
                         "source)")})
    return args


# ------------------------------------------------------------------------------------------
# The method, 1: the DCGAN of the paper's Section 3.1 (Radford et al.), unconditional
# ------------------------------------------------------------------------------------------
class DCGANGenerator(nn.Module):
    """z (nz x 1 x 1) -> ConvT 4x4 -> 4x4 x 8dim, then ConvT 4x4 stride 2 layers halving
    the width, BN + ReLU between, tanh at the end. 64x64: 5 layers (512-256-128-64-C at
    dim 64), the network of the paper's Section 3.1; 32x32: 4 layers (256-128-64-C).
    Batch norm always uses the statistics of the current batch (no running averages), as
    in every script of this repository, so train() and eval() behave alike."""

    def __init__(self, channels, dim=64, nz=100, image_size=64):
        super().__init__()
        n_up = {32: 3, 64: 4}.get(image_size)
        if n_up is None:
            raise C.UserError(f"the DCGAN needs --image-size 32 or 64, got {image_size}")
        widths = [dim * 2 ** i for i in reversed(range(n_up))]     # 64px: 512 256 128 64
        layers = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False)]
        for w_in, w_out in zip(widths, widths[1:] + [channels]):
            layers += [nn.BatchNorm2d(w_in, track_running_stats=False), nn.ReLU(True),
                       nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=w_out == channels)]
        self.net = nn.Sequential(*layers, nn.Tanh())
        self.nz = nz

    def forward(self, z):
        return self.net(z.view(len(z), self.nz, 1, 1))


class DCGANDiscriminator(nn.Module):
    """x -> Conv 4x4 stride 2 layers doubling the width, LeakyReLU 0.2 -> Conv 4x4 -> one
    logit; log D(x) = -softplus(-logit). Spectral normalisation on every conv (Miyato et
    al. 2018) in place of DCGAN's batch norm (our choice, docs): without any normalisation
    our source G collapsed to one blob within 1,000 iterations on synth; with batch norm the
    adaptation to 10 images diverged into noise textures (the real batch holds only K
    distinct images, which batch statistics give away); spectral norm trains both stages
    and keeps every image's score a function of that image alone, so the per-sample
    log-likelihoods of the Fisher stage are really per sample."""

    def __init__(self, channels, dim=64, image_size=64):
        super().__init__()
        n_down = {32: 3, 64: 4}[image_size]
        widths = [channels] + [dim * 2 ** i for i in range(n_down)]
        convs = [nn.Conv2d(w_in, w_out, 4, 2, 1) for w_in, w_out in zip(widths, widths[1:])]
        convs.append(nn.Conv2d(widths[-1], 1, 4, 1, 0))
        dcgan_init(nn.ModuleList(convs))  # before spectral norm estimates sigma from them
        sn = nn.utils.parametrizations.spectral_norm
        layers = []
        for conv in convs[:-1]:
            layers += [sn(conv), nn.LeakyReLU(0.2, True)]
        self.net = nn.Sequential(*layers, sn(convs[-1]))

    def forward(self, x):
        return self.net(x).flatten()


def dcgan_init(module):
    """DCGAN's initialisation: conv weights N(0, 0.02), BN scale N(1, 0.02), offsets 0.
    Spectrally normalised convs are skipped: DCGANDiscriminator initialises its convs before
    wrapping them (re-initialising afterwards would leave spectral norm's sigma stale)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if nn.utils.parametrize.is_parametrized(m, "weight"):
                continue
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------
# The method, 2: the source GAN (stage 1), with the non-saturating loss L_adv
# ------------------------------------------------------------------------------------------
def gan_step(G, D, opt_G, opt_D, real, nz, penalty=None):
    """One D step and one G step of the non-saturating GAN (DCGAN's loss).
    penalty(): lambda * sum F (theta - theta_S)^2, added to the generator's loss (adaptation
    stage only). Returns detached losses (no host sync)."""
    n = len(real)
    fake = G(torch.randn(n, nz, device=real.device))
    # D: maximise log D(x) + log(1 - D(G(z)))
    d_loss = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
    opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_D.step()
    # G: L_adv = -log D(G(z)), the non-saturating generator loss
    D.requires_grad_(False)
    adv = F.softplus(-D(fake)).mean()
    pen = penalty() if penalty is not None else torch.zeros((), device=real.device)
    loss = adv + pen                    # adaptation loss: L_adv + lambda sum F (theta-theta_S)^2
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return d_loss.detach(), adv.detach(), pen.detach()


def dcgan_adam(module, lr):
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))


def train_source(G, D, data, args, device):
    """Stage 1: an unconditional DCGAN on the whole source training set."""
    opt_G, opt_D = dcgan_adam(G, args.lr), dcgan_adam(D, args.lr)
    progress = C.Progress(args.source_iters, args.log_every, "[source] ")
    for it in range(args.source_iters):
        idx = torch.randint(len(data), (args.batch_size,), device=device)
        d, adv, _ = gan_step(G, D, opt_G, opt_D, C.to_float(data[idx]), G.nz)
        progress.update(it, {"d_loss": d, "g_adv": adv})


# ------------------------------------------------------------------------------------------
# The method, 3: the Fisher information of the source generator's weights (stage 2)
# ------------------------------------------------------------------------------------------
def source_log_likelihood(D):
    """log L(x | theta) of the Fisher stage: the frozen source discriminator's
    log-probability that a generated image is real, log D_S(G(z)) = -softplus(-logit).
    D must be in eval() mode (spectral norm then keeps its buffers fixed)."""
    def log_likelihood(G, m):
        z = torch.randn(m, G.nz, device=next(G.parameters()).device)
        return -F.softplus(-D(G(z)))
    return log_likelihood


def fisher_information(G, log_likelihood, n, batch=50):
    """Diagonal Fisher of G's parameters: F_i = mean over n generated samples of
    (d log L(x_j) / d theta_i)^2, with one backward pass PER SAMPLE (the square of a
    mean gradient would be a different, much smaller quantity).

    log_likelihood(G, batch) -> one log-likelihood per generated image (a tensor of `batch`
    entries, computed with the frozen discriminator). Returns {parameter name: F}."""
    params = dict(G.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    done = 0
    while done < n:
        m = min(batch, n - done)
        ll = log_likelihood(G, m)                   # m per-sample log-likelihoods
        for j in range(m):                          # per-sample gradients, squared
            grads = torch.autograd.grad(ll[j], list(params.values()), retain_graph=j < m - 1,
                                        allow_unused=True)
            for (k, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[k] += g.square()
        done += m
    return {k: f / n for k, f in fisher.items()}


# ------------------------------------------------------------------------------------------
# The method, 4: adaptation, L_adv + lambda sum_i F_i (theta_i - theta_S,i)^2 (stage 3)
# ------------------------------------------------------------------------------------------
def ewc_penalty(G, fisher, anchor):
    """sum_i F_i (theta_i - theta_S,i)^2 over the generator's parameters (without lambda)."""
    return sum((fisher[k] * (p - anchor[k]).square()).sum() for k, p in G.named_parameters())


def adapt(G_source, D_source, shots, fisher, lam, args, z_snap, snapshots=8):
    """Stage 3: fine-tune copies of the source G and D on the K shots for --iters steps,
    the generator with lambda * sum_i F_i (theta_i - theta_S,i)^2 added; the discriminator
    is fine-tuned unregularised, as in the paper. Returns the adapted G, a list of sample
    grids of z_snap taken during adaptation (for the GIF) and the mean L_adv of the last
    tenth of the iterations (the denominator of the penalty/adversarial balance)."""
    G, D = copy.deepcopy(G_source).train(), copy.deepcopy(D_source).train()
    anchor = {k: p.detach().clone() for k, p in G_source.named_parameters()}   # theta_S
    opt_G, opt_D = dcgan_adam(G, args.lr), dcgan_adam(D, args.lr)

    def penalty():  # the EWC term of the adaptation loss
        return lam * ewc_penalty(G, fisher, anchor)

    progress = C.Progress(args.iters, args.log_every, f"[adapt lambda={lam:g}] ")
    every = max(1, args.iters // snapshots)
    tail = max(1, args.iters // 10)
    adv_tail = torch.zeros((), device=shots.device)   # summed on the device: no host sync
    frames = []
    for it in range(args.iters):
        idx = torch.randint(len(shots), (args.batch_size,), device=shots.device)
        d, adv, pen = gan_step(G, D, opt_G, opt_D, C.to_float(shots[idx]), G.nz,
                               penalty if lam > 0 else None)
        progress.update(it, {"d_loss": d, "g_adv": adv, "ewc_penalty": pen})
        if it >= args.iters - tail:
            adv_tail += adv
        if (it + 1) % every == 0 or it + 1 == args.iters:
            with torch.no_grad():
                frames.append(G(z_snap).cpu())
    return G, frames, float(adv_tail) / tail


# ------------------------------------------------------------------------------------------
# Data: source, target, the K shots
# ------------------------------------------------------------------------------------------
def load_domain(name, root, train, size, channels, download):
    """A domain's images as uint8 with the run's channel count (grey -> RGB repeats the
    channel, RGB -> grey takes the luminance), and its labels and class names. A `folder`
    root may hold its images directly (one class) or in class sub-folders."""
    if name == "folder" and os.path.isdir(root) and not any(
            os.path.isdir(os.path.join(root, d)) for d in os.listdir(root)):
        x = load_loose_images(root, size or 64)   # the folder itself is the one class
        y, names = torch.zeros(len(x), dtype=torch.long), [os.path.basename(root.rstrip("/"))]
    else:
        x, y, names = C.load_dataset(name, root, train, size, download)
    if len(x) == 0:
        raise C.UserError(f"{name}: no images found in {root}")
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return x, y, names


def load_loose_images(root, size):
    """Every image file directly in `root` (a user's own K images), resized and centre-
    cropped to size x size, as uint8 RGB."""
    import torchvision.transforms as T
    ext = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
    files = sorted(f for f in os.listdir(root) if f.lower().endswith(ext))
    if not files:
        raise C.UserError(f"no images ({', '.join(ext)}) found in {root}")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    return torch.stack([tf(C.open_rgb(os.path.join(root, f))) for f in files])


def pick_shots(x, k, seed):
    """K target images drawn without replacement, reproducibly for a seed (k None: all of
    them, in a seeded order)."""
    k = len(x) if k is None else k
    if k > len(x):
        raise C.UserError(f"--shots {k}: the target has only {len(x)} images")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]
    return x[idx], idx


# ------------------------------------------------------------------------------------------
# The run: the three stages, each checkpointed (--resume skips finished ones)
# ------------------------------------------------------------------------------------------
def stage_source(G, D, args, state, out, device, channels, sx):
    """Stage 1: the source GAN, loaded from --source-ckpt, resumed from this run's
    source.pt, or trained on sx, the source domain's training images (then checkpointed)."""
    src_path = os.path.join(out, "source.pt")
    if "source" in state.get("done", []):  # the run's own source: never replaced
        src = C.load_checkpoint(src_path)
        G.load_state_dict(src["G"]), D.load_state_dict(src["D"])
        print("source: resumed from the checkpoint", flush=True)
    elif args.source_ckpt:
        src = C.load_checkpoint(args.source_ckpt)
        if not {"G", "D"} <= set(src):
            raise C.UserError(f"--source-ckpt {args.source_ckpt} is not a few-shot source (the "
                              "source.pt of an ewc_fewshot.py run folder); it holds "
                              f"{', '.join(sorted(map(str, src))[:6])}")
        try:
            G.load_state_dict(src["G"]), D.load_state_dict(src["D"])
        except (KeyError, RuntimeError) as err:
            raise C.UserError(f"--source-ckpt {args.source_ckpt} does not fit this run's "
                              f"networks (dim {args.dim}, {channels} channels, "
                              f"{args.image_size}px): {str(err).splitlines()[0]}")
        print(f"source: loaded {args.source_ckpt}", flush=True)
        if os.path.abspath(args.source_ckpt) != os.path.abspath(src_path):
            C.atomic_save(src, src_path)
        state.setdefault("done", []).append("source")
        C.save_checkpoint(out, state)
    else:
        print(f"source {args.source}: {len(sx)} images; training {args.source_iters} "
              "iterations", flush=True)
        t0 = time.time()
        train_source(G, D, sx.to(device), args, device)
        for name, net in (("G", G), ("D", D)):  # never save diverged weights
            C.check_finite(net, f"[source] {name}")
        state["seconds"]["source"] = time.time() - t0
        C.atomic_save({"G": G.state_dict(), "D": D.state_dict(), "args": vars(args)}, src_path)
        state.setdefault("done", []).append("source")
        C.save_checkpoint(out, state)


def stage_fisher(G, D, args, state, out, device):
    """Stage 2: the Fisher information of the frozen source G, from the frozen source D
    (computed once, then read from fisher.pt). Returns {parameter name: F}."""
    fisher_path = os.path.join(out, "fisher.pt")
    fisher = None
    if "fisher" in state.get("done", []):
        shapes = {k: p.shape for k, p in G.named_parameters()}
        try:
            fisher = C.load_checkpoint(fisher_path)["fisher"]
            if {k: f.shape for k, f in fisher.items()} != shapes:
                raise C.UserError("its tensors do not fit the generator")
        except (C.UserError, KeyError, AttributeError, TypeError) as err:
            if state["adapted"]:  # adapted with the original Fisher: never replaced
                raise C.UserError(f"--resume: {fisher_path} is unusable ({err}) and lambda "
                                  f"{', '.join(state['adapted'])} were adapted with the "
                                  f"original; start a new run (--source-ckpt {out}/source.pt)")
            print(f"fisher.pt unusable ({err}); nothing was adapted with it yet: computing "
                  "it again (new random draws: the numbers may differ slightly)", flush=True)
            fisher = None
            state["done"].remove("fisher")
    if fisher is None:
        t0 = time.time()
        D.requires_grad_(False)
        fisher = fisher_information(G, source_log_likelihood(D), args.fisher_samples)
        D.requires_grad_(True)
        state["seconds"]["fisher"] = time.time() - t0
        C.atomic_save({"fisher": fisher}, fisher_path)
        state.setdefault("done", []).append("fisher")
        C.save_checkpoint(out, state)
    fisher = {k: f.to(device) for k, f in fisher.items()}
    flat = torch.cat([f.flatten() for f in fisher.values()])
    state["fisher_stats"] = {"mean": float(flat.mean()), "max": float(flat.max()),
                             "median": float(flat.median()), "sum": float(flat.sum()),
                             "n_params": len(flat),
                             # Section 3.1's companion: how much the source relies on each
                             # conv layer (the layers of weight_change_rate)
                             "per_layer_mean": {k: float(f.mean()) for k, f in fisher.items()
                                                if f.dim() == 4}}
    print(f"Fisher over {len(flat)} generator parameters from {args.fisher_samples} samples: "
          f"mean {flat.mean():.3e}  median {flat.median():.3e}  max {flat.max():.3e}",
          flush=True)
    return fisher


def stage_adapt(G, D, shots, fisher, lam, args, state, out, z_grid, measure):
    """Stage 3 for one lambda: adapt copies of the source nets to the K shots (or take the
    adapted G from the checkpoint), measure it (`measure`: measure_adapted) and checkpoint
    both. Returns (G_adapted, frames)."""
    key = f"{lam:g}"
    torch.manual_seed(args.seed + 1)  # every lambda sees the same noise and batches
    if key in state["adapted"]:
        G_ad = copy.deepcopy(G)
        G_ad.load_state_dict(state["adapted"][key])
        print(f"adaptation lambda={key}: resumed from the checkpoint", flush=True)
        return G_ad, list(state["frames"][key])
    t0 = time.time()
    G_ad, frames, adv = adapt(G, D, shots, fisher, lam, args, z_grid)
    C.check_finite(G_ad, f"[adapt lambda={key}] G")
    G_ad.eval()
    state["results"][key] = dict(measure(G_ad, lam, adv), seconds=time.time() - t0)
    state["adapted"][key] = G_ad.state_dict()
    state.setdefault("frames", {})[key] = frames
    C.save_checkpoint(out, state)
    return G_ad, frames


# ------------------------------------------------------------------------------------------
# Measurement, apart from the method: the joint evaluator's distances and diversity
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(G, n, device, batch=250):
    return torch.cat([G(torch.randn(min(batch, n - i), G.nz, device=device))
                      for i in range(0, n, batch)])


@torch.no_grad()
def weight_change_rate(G_source, G):
    """The paper's Section 3.1 analysis: per layer, how far the adapted weights moved,
    as ||theta - theta_S||_1 / ||theta_S||_1 over that layer's weights (in %)."""
    src = dict(G_source.named_parameters())
    out = {}
    for k, p in G.named_parameters():
        if k.endswith("weight") and p.dim() == 4:  # the conv layers, as in the paper
            out[k] = 100.0 * float((p - src[k]).abs().sum() / src[k].abs().sum())
    return out


@torch.no_grad()
def perceptual_features(net, x, batch=250):
    """LPIPS-style features from the feature net's three conv blocks (Zhang et al. 2018,
    without learned layer weights): each activation vector unit-normalised over channels,
    divided by sqrt(H*W), flattened and concatenated. The squared Euclidean distance of two
    such vectors is sum_layers mean_hw ||f1_hw - f2_hw||^2, the uncalibrated LPIPS."""
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    out = []
    for i in range(0, len(x), batch):
        h, feats = x[i:i + batch], []
        for m in net.body:
            h = m(h)
            if isinstance(m, nn.ReLU) and len(feats) < len(convs):
                f = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)
                feats.append(f.flatten(1) / (h.shape[2] * h.shape[3]) ** 0.5)
                if len(feats) == len(convs):
                    break
        out.append(torch.cat(feats, 1))
    return torch.cat(out)


def intra_cluster_diversity(gen_feat, shot_feat, cap=50, seed=0):
    """The intra-cluster diversity of the paper's successors, as CDC (Ojha et al. 2021)
    computes it: each generated image joins the cluster of its nearest of the K training
    images; of each cluster at most `cap` random members are kept (0: all); the mean
    distance over the pairs of members is taken per cluster; empty and one-member clusters
    are dropped; the result is the mean over the remaining clusters. Distances are squared
    Euclidean on `perceptual_features` (the uncalibrated LPIPS-style distance).
    Returns (diversity or None when no cluster has two members, cluster sizes before the
    cap, number of clusters averaged)."""
    gen = torch.Generator().manual_seed(seed)
    assign = torch.cdist(gen_feat, shot_feat).argmin(1).cpu()
    per_cluster, sizes = [], []
    for k in range(len(shot_feat)):
        members = (assign == k).nonzero().flatten()
        sizes.append(len(members))
        if cap and len(members) > cap:  # CDC: at most `cap` random members per cluster
            members = members[torch.randperm(len(members), generator=gen)[:cap]]
        if len(members) > 1:
            f = gen_feat[members.to(gen_feat.device)]
            d = torch.cdist(f, f).square()
            per_cluster.append(float(d.sum() / (len(f) * (len(f) - 1))))  # mean over pairs
    return (float(np.mean(per_cluster)) if per_cluster else None), sizes, len(per_cluster)


JOINT_PER_DOMAIN = 10000  # images of each domain in the joint evaluator's training set


def joint_evaluator(args, source, target, device):
    """The evaluator of every few-shot metric: a classifier trained on source and target
    images together, with one label per (domain, class): source classes first, then the
    target's. Telling a grey 3 from an amber 3 needs colour, so its features see the
    target's LOOK as well as its shapes (a target-only digit classifier barely sees colour).
    Each domain contributes JOINT_PER_DOMAIN images (a seeded subset, or repeats of a smaller
    set), so neither dominates. Trained once and cached (common.get_evaluator).
    source/target: (train images, labels, class names, test images, test labels) with the
    run's channels and size. Returns (net, number of source classes, description dict)."""
    picks = []
    for i, (x, y, names, tx, ty) in enumerate((source, target)):
        g = torch.Generator().manual_seed(i)
        idx = torch.randperm(len(x), generator=g)[:JOINT_PER_DOMAIN]
        idx = idx.repeat(math.ceil(JOINT_PER_DOMAIN / len(idx)))[:JOINT_PER_DOMAIN]
        tidx = torch.randperm(len(tx), generator=g)[:JOINT_PER_DOMAIN // 5]
        offset = 0 if i == 0 else len(source[2])
        picks.append((x[idx], y[idx] + offset, tx[tidx], ty[tidx] + offset))
    n_src, n_classes = len(source[2]), len(source[2]) + len(target[2])
    train = C.TaskData(torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks]),
                       device)
    test = C.TaskData(torch.cat([p[2] for p in picks]), torch.cat([p[3] for p in picks]),
                      device)
    # Cached under <target root>/evaluators/ (a `folder` target: beside the folder, never
    # in it, where it would become an image class); the name says both domains, and the
    # budget is that of the source's kind (common.classifier_budget).
    root = args.target_root
    if args.target == "folder":
        root = os.path.dirname(os.path.abspath(args.target_root))
    ns = argparse.Namespace(dataset=f"{args.source}+{args.target}", data_root=root)
    net, acc = C.get_evaluator(ns, train, test, n_classes, device)
    with torch.no_grad():
        share = target_share(net, C.to_float(test.x), n_src, per_image=True)
    domain_acc = 100.0 * float(((test.y >= n_src) == share).float().mean())
    desc = {"name": f"joint {args.source}+{args.target} evaluator ({n_classes} classes: "
                    f"{n_src} source + {n_classes - n_src} target)",
            "class_accuracy": acc, "domain_accuracy": domain_acc, "n_train": len(train.y),
            "fingerprint": C.fingerprint(*net.state_dict().values())}
    return net, n_src, desc


@torch.no_grad()
def target_share(net, x, n_source_classes, per_image=False, batch=1000):
    """The share of images x that the joint evaluator calls "target": the probability of
    the target domain is the softmax mass of the target's classes; an image counts as
    target when that is above 1/2. per_image: the boolean per image instead of the share."""
    p = torch.cat([net(x[i:i + batch]).softmax(1)[:, n_source_classes:].sum(1)
                   for i in range(0, len(x), batch)])
    is_target = p > 0.5
    return is_target if per_image else float(is_target.float().mean())


# What each number in metrics.json is (written beside the results)
METRIC_DEFINITIONS = {
    "fd_to_target": "Frechet distance, generated vs every target training image, on the "
                    "penultimate features of the joint source+target evaluator (not "
                    "Inception FID)",
    "fd_to_source": "the same distance to every source training image",
    "target_share": "fraction of generated images that the joint evaluator assigns to the "
                    "target domain (softmax mass of the target classes > 1/2)",
    "intra_cluster_lpips_uncalibrated": "CDC's intra-cluster diversity: generated images "
        "clustered by nearest shot, at most diversity_cap random members per cluster, mean "
        "pairwise distance per cluster, clusters with < 2 members dropped, mean over the "
        "rest; the distance is an uncalibrated LPIPS (unit-normalised activations of the "
        "joint evaluator's three conv blocks, no learned layer weights), not VGG-LPIPS",
    "clusters_used": "clusters that entered the diversity mean (of --shots)",
    "weight_change_rate": "Section 3.1, per generator conv layer: "
                          "||theta - theta_S||_1 / ||theta_S||_1 in %",
    "ewc_penalty": "sum_i F_i (theta_i - theta_S,i)^2 at the end of adaptation (no lambda)",
    "g_adv_final": "L_adv = -log D(G(z)), mean over the last tenth of the adaptation",
    "penalty_over_adv": "lambda * ewc_penalty / g_adv_final: the scale-free balance of the "
                        "two terms of the adaptation loss",
}


@torch.no_grad()
def evaluate(G, ev, args, device, inception=None):
    """Every few-shot metric of one generator (METRIC_DEFINITIONS), measured with the
    joint evaluator `ev` (a dict: net, n_source_classes, target_feat, source_feat,
    shot_feat or None when --shots all) and optionally Inception FID."""
    gen = sample(G, args.fd_samples, device)
    feat = C.features(ev["net"], gen)
    res = {"fd_to_target": C.frechet_distance(feat, ev["target_feat"]),
           "fd_to_source": C.frechet_distance(feat, ev["source_feat"]),
           "target_share": target_share(ev["net"], gen, ev["n_source_classes"]),
           "fd_samples": args.fd_samples}
    if ev["shot_feat"] is not None:
        div_x = gen[:args.diversity_samples] if args.diversity_samples <= len(gen) else (
            sample(G, args.diversity_samples, device))
        div, sizes, used = intra_cluster_diversity(
            perceptual_features(ev["net"], div_x), ev["shot_feat"], args.diversity_cap)
        res.update(intra_cluster_lpips_uncalibrated=div, cluster_sizes=sizes,
                   clusters_used=used)
    if inception is not None:
        net_i, real_i = inception
        res["inception_fid"] = C.frechet_distance(net_i(gen), real_i)
    return res


def measurement_setup(args, source, target, shots, device):
    """The joint evaluator, the features of the full target and source training sets and of
    the shots (the diversity's cluster centres; None with --shots all), and with
    --inception-fid the Inception features of the target. source/target: (train images,
    labels, class names, test images, test labels). Returns (measure G, evaluator dict)."""
    net, n_src, desc = joint_evaluator(args, source, target, device)
    ev = {"net": net, "n_source_classes": n_src,
          "target_feat": C.features(net, C.to_float(target[0].to(device))),
          "source_feat": C.features(net, C.to_float(source[0].to(device))),
          "shot_feat": (perceptual_features(net, C.to_float(shots))
                        if args.shots is not None else None)}
    inception = None
    if args.inception_fid:
        net_i = C.inception_features(device)
        inception = (net_i, net_i(C.to_float(target[0].to(device))))
    print(f"evaluator: {desc['name']}; held-out class accuracy {desc['class_accuracy']:.1f}%, "
          f"domain accuracy {desc['domain_accuracy']:.1f}%", flush=True)
    return (lambda G: evaluate(G, ev, args, device, inception)), desc


def measure_adapted(G_source, G, fisher, lam, adv, evaluate_G):
    """Every measure of an adapted G: evaluate_G's, the per-layer weight change rate of
    Section 3.1, the EWC penalty it ends with and its balance against L_adv."""
    with torch.no_grad():
        pen = float(ewc_penalty(G, fisher, dict(G_source.named_parameters())))
    res = evaluate_G(G)
    res.update(weight_change_rate=weight_change_rate(G_source, G), ewc_penalty=pen,
               lambda_times_penalty=lam * pen, g_adv_final=adv,
               # the scale-free balance of the two terms of the adaptation loss at the end
               penalty_over_adv=lam * pen / adv if adv > 0 else float("nan"))
    return res


def report(args, out, G, shots, z_grid, grids, gif_frames, state, ev_desc, n_target, n_source):
    """The side-by-side grid (shots, source, each lambda), the adaptation GIF and the
    tables: the joint evaluator's measures and the loss balance per generator, then the
    weight change rate per layer beside the layer's mean Fisher (Section 3.1)."""
    rows = [C.to_float(shots[:10]).cpu()]
    rows[0] = torch.cat([rows[0], torch.ones(10 - len(rows[0]), *rows[0].shape[1:])])
    with torch.no_grad():
        rows.append(G(z_grid).cpu())
    rows += [grids[f"{lam:g}"] for lam in args.lambdas]
    C.write_image(os.path.join(out, "comparison.png"), C.image_grid(torch.cat(rows), 10))
    n_frames = min(len(f) for f in gif_frames.values())
    C.save_gif([C.image_grid(torch.cat([rows[0], rows[1]] + [gif_frames[f"{lam:g}"][i]
                                                            for lam in args.lambdas]), 10)
                for i in range(n_frames)], os.path.join(out, "adaptation.gif"))

    results = state["results"]
    header = ["generator", "FD to target", "FD to source", "target share",
              "intra-cl. LPIPS*", "clusters", "lam*F*d^2/L_adv"] + (
        ["Inception FID"] if args.inception_fid else [])
    table = []
    for key in ["source"] + [f"{lam:g}" for lam in args.lambdas]:
        r = results[key]
        name = "source (no adaptation)" if key == "source" else (
            "fine-tuning (lambda 0)" if float(key) == 0 else f"EWC lambda {key}"
            + (" (paper)" if float(key) == PAPER_LAMBDA else ""))
        div = r.get("intra_cluster_lpips_uncalibrated")
        table.append([name, r["fd_to_target"], r["fd_to_source"], r["target_share"],
                      "-" if div is None else f"{div:.3f}",
                      f"{r['clusters_used']}/{len(r['cluster_sizes'])}" if "clusters_used"
                      in r else "-",
                      f"{r['penalty_over_adv']:.3g}" if "penalty_over_adv" in r else "-"]
                     + ([r["inception_fid"]] if args.inception_fid else []))
    k = "all" if args.shots is None else args.shots
    print(f"\n{args.source} -> {args.target}, {k} shots, {args.iters} adaptation "
          f"iterations. Measured with the {ev_desc['name']}: FD on its penultimate features, "
          f"{args.fd_samples} generated vs {n_target} target / {n_source} source training "
          f"images; target share: generated images it assigns to the target; *intra-cluster "
          f"diversity on an uncalibrated LPIPS-style distance (its conv features), "
          f"{args.diversity_samples} samples, at most {args.diversity_cap or 'all'} per "
          "cluster")
    print(C.fmt_table(header, table))
    layers = list(results[f"{args.lambdas[0]:g}"]["weight_change_rate"])
    fisher_mean = state["fisher_stats"]["per_layer_mean"]
    wc_rows = [[f"layer {i + 1} ({k})", f"{fisher_mean[k]:.2e}"]
               + [results[f"{lam:g}"]["weight_change_rate"][k] for lam in args.lambdas]
               for i, k in enumerate(layers)]
    print("\naverage weight change rate per layer, ||theta - theta_S||_1 / ||theta_S||_1 (%) "
          "(the paper's Section 3.1), beside the layer's mean Fisher")
    print(C.fmt_table(["layer", "mean Fisher"] + [f"lambda {lam:g}" for lam in args.lambdas],
                      wc_rows))


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    C.suspect(args, parse_args([]), ("lr",))  # named if training diverges
    device = C.pick_device(args.device)
    print(f"device: {device}", flush=True)
    C.seed_everything(args.seed)
    out, ckpt = C.prepare_run(args, "ewc_fewshot")
    if ckpt is not None and ckpt.get("format") != STATE_FORMAT:
        raise C.UserError(f"--resume: {out} was written by an older ewc_fewshot.py (other "
                          "metrics); start a new run, e.g. with --source-ckpt "
                          f"{os.path.join(out, 'source.pt')}")
    state = ckpt or {"args": vars(args), "adapted": {}, "results": {}, "seconds": {},
                     "format": STATE_FORMAT}
    t_start = time.time()

    # The target and its K shots (the run's channels and size follow the target), the
    # source (read once: trained on, and measured against), the networks.
    tx, ty, tnames = load_domain(args.target, args.target_root, True, args.image_size, None,
                                 not args.no_download)
    C.run_inputs(ckpt, out, target_data=C.fingerprint(tx, ty))
    size, channels = tx.shape[-1], tx.shape[1]
    args.image_size = size
    shots, shot_idx = pick_shots(tx, args.shots, args.seed)
    shots = shots.to(device)
    print(f"target {args.target}: {len(tx)} images {tuple(tx.shape[1:])}, {len(shots)} shots "
          f"(indices {shot_idx.tolist()[:10]}{' ...' if len(shots) > 10 else ''}); "
          f"run folder {out}", flush=True)
    G = DCGANGenerator(channels, args.dim, args.nz, size).to(device)
    D = DCGANDiscriminator(channels, args.dim, size).to(device)
    dcgan_init(G)  # D initialises itself (spectral norm)
    z_grid = torch.randn(10, args.nz, generator=torch.Generator().manual_seed(1234)).to(device)
    sx, sy, snames = load_domain(args.source, args.source_root, True, size, channels,
                                 not args.no_download)
    C.run_inputs(ckpt, out, source_data=C.fingerprint(sx, sy))

    # Stage 1: the source GAN. Frozen from here on (adaptation fine-tunes copies); eval():
    # spectral norm stops its power iteration, so not even D's buffers change in stage 2.
    stage_source(G, D, args, state, out, device, channels, sx)
    # after the first checkpoint: a run stopped before it leaves only args.json, so the
    # same command can start again in the same folder
    C.write_image(os.path.join(out, "shots.png"),  # at most 100 of them
                  C.image_grid(C.to_float(shots[:100]), nrow=min(10, len(shots))))
    G.eval(), D.eval()
    with torch.no_grad():
        C.write_image(os.path.join(out, "source_samples.png"),
                        C.image_grid(G(z_grid), nrow=10))
    # Stage 2: the Fisher information from the frozen source discriminator.
    fisher = stage_fisher(G, D, args, state, out, device)

    # The measurement (apart from the method): the joint source+target evaluator.
    test = [load_domain(name, root, False, size, channels, not args.no_download)
            for name, root in ((args.source, args.source_root),
                               (args.target, args.target_root))]
    evaluate_G, ev_desc = measurement_setup(args, (sx, sy, snames, *test[0][:2]),
                                            (tx, ty, tnames, *test[1][:2]), shots, device)
    C.run_inputs(ckpt, out, evaluator=ev_desc["fingerprint"])  # nothing measured is mixed
    if "source" not in state["results"]:
        state["results"]["source"] = evaluate_G(G)

    # Stage 3: adaptation, once per lambda, all from the same source, Fisher and shots.
    grids, gif_frames = {}, {}
    for lam in args.lambdas:
        G_ad, gif_frames[f"{lam:g}"] = stage_adapt(
            G, D, shots, fisher, lam, args, state, out, z_grid,
            lambda G_ad, lam, adv: measure_adapted(G, G_ad, fisher, lam, adv, evaluate_G))
        with torch.no_grad():
            grids[f"{lam:g}"] = G_ad(z_grid).cpu()
        C.write_image(os.path.join(out, f"samples_lambda{lam:g}.png"),
                        C.image_grid(sample(G_ad, 64, device).cpu(), nrow=8))

    report(args, out, G, shots, z_grid, grids, gif_frames, state, ev_desc, len(tx), len(sx))
    metrics = {"method": "ewc-fewshot", "source": args.source, "target": args.target,
               "shots": args.shots if args.shots is not None else "all",
               "shot_indices": shot_idx.tolist() if args.shots is not None else "all",
               "evaluator": ev_desc, "metric_definitions": METRIC_DEFINITIONS,
               "lambdas": args.lambdas, "results": state["results"],
               "fisher": state["fisher_stats"], "device": str(device),
               "seconds": {**state["seconds"], "total_this_call": time.time() - t_start},
               "args": vars(args)}
    C.save_json(os.path.join(out, "metrics.json"), metrics)
    print(f"-> {out}/comparison.png (rows: {min(10, len(shots))} shots, source, "
          + ", ".join(f"lambda {lam:g}" for lam in args.lambdas)
          + "), adaptation.gif, metrics.json", flush=True)
    return metrics


if __name__ == "__main__":
    C.cli(main)
