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

Each lambda of --ewc-lambda (0: plain fine-tuning, the baseline) is adapted from the same
source, Fisher and shots; our default 1e3 comes from a sweep (the paper's 5e8 pins our DCGANs
to the source; docs). MeRGAN's Table 1 "EWC" (Eq. 9) is `mergan_jtr.py --mode ewc`.
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
import frechet as FD
import taskrun as R

PAPER_LAMBDA = 5e8        # Li et al.: lambda in all of the paper's experiments (StyleGAN)
STATE_FORMAT = 2          # of checkpoint.pt; 2: the joint evaluator's metrics
DEFAULT_LAMBDA = 1e3      # ours for the DCGANs here: the sweep in docs/ewc_fewshot.md


def shots_arg(text):
    """--shots: a count, or `all` (None: the whole target training set)."""
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
    g.add_argument("--no-download", action="store_true", help="never download: missing data fails")
    g.add_argument("--image-size", type=C.at_least(4), default=None,
                   help="side of the square images (default: the target's, 32 for digits)")
    g.add_argument("--out", default=None, help="run folder (default: "
                   "runs/ewc_fewshot-<source>-to-<target>-s<seed>-<time>-<random>)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--seed", type=C.seed, default=0,
                   help="seeds python, numpy, torch; picks shots")
    g.add_argument("--batch-size", type=C.at_least(1), default=64, help="minibatch size")
    g.add_argument("--log-every", type=C.at_least(1), default=100, help="iterations per log line")
    g.add_argument("--resume", action="store_true", help="continue the run in --out after "
                   "its last finished stage, with its own flags (args.json)")
    f = p.add_argument_group("source, target and shots")
    f.add_argument("--source", default="mnist", help="source domain: one of "
                   f"{', '.join(C.DATASETS)} (default mnist: 60,000 digits)")
    f.add_argument("--target", default="svhn", help="target domain: one of "
                   f"{', '.join(C.DATASETS)} (default svhn: the same digits, another look)")
    f.add_argument("--source-root", default=None, help="data root of the source (default: "
                   "--data-root; for `folder`: the image folder)")
    f.add_argument("--target-root", default=None, help="data root of the target (default: "
                   "--data-root; for `folder`: a folder of images, sub-folders optional)")
    f.add_argument("--shots", type=shots_arg, default=10, help="K, target images adapted to "
                   "(paper: 1-10; by --seed); `all`: the whole set (Section 3.1; no diversity)")
    t = p.add_argument_group("training")
    t.add_argument("--source-iters", type=C.at_least(1), default=10000, help="stage 1 iterations")
    t.add_argument("--source-ckpt", help="an earlier run's source.pt: skip the source stage")
    t.add_argument("--iters", type=C.at_least(1), default=1000, help="adaptation steps per lambda")
    t.add_argument("--ewc-lambda", default=None, help="comma-separated lambdas, each adapted "
                   "from the same source (0: fine-tuning; default 0,1e3; paper: 5e8, see docs)")
    t.add_argument("--fisher-samples", type=C.at_least(2), default=1000,
                   help="generated images whose squared gradients average into the Fisher")
    t.add_argument("--lr", type=C.positive, default=2e-4, help="Adam's, betas 0.5/0.999 (DCGAN)")
    t.add_argument("--dim", type=C.at_least(1), default=64, help="width (64 = DCGAN's ngf/ndf)")
    t.add_argument("--nz", type=C.at_least(1), default=100, help="latent size (DCGAN: 100)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--fd-samples", type=C.at_least(2), default=2000,
                   help="generated images for the Frechet distances to the target and source")
    e.add_argument("--diversity-samples", type=C.at_least(2), default=1000,
                   help="generated images for the intra-cluster diversity (papers: ~1000)")
    e.add_argument("--diversity-cap", type=int, default=50, help="at most this many random "
                   "members per cluster enter the diversity (CDC: 50; 0 = every member)")
    e.add_argument("--inception-fid", action="store_true", help="also torchvision's Inception FID")
    args = R.parse_run_args(p, argv, ("source_root", "target_root", "inception_fid"),
                            "ewc_fewshot")
    try:
        args.lambdas = ([float(v) for v in args.ewc_lambda.split(",") if v.strip()]
                        if args.ewc_lambda is not None else [0.0, DEFAULT_LAMBDA])
    except ValueError:
        raise C.UserError(f"--ewc-lambda must be comma-separated numbers, got {args.ewc_lambda!r}")
    if not args.lambdas or not all(math.isfinite(v) and v >= 0 for v in args.lambdas):
        raise C.UserError("--ewc-lambda needs at least one value, each finite and >= 0")
    for side, name in (("source", args.source), ("target", args.target)):
        C.dataset_info(name)  # unknown names: one-line error
        if name == "lsun":  # Table 2's four scenes: read by the MeRGAN scripts only
            raise C.UserError(f"--{side} lsun: LSUN is read by mergan_jtr.py and mergan_ra.py "
                              "only; export the scenes as an image folder (--target folder)")
    for side in ("source", "target"):
        root = getattr(args, f"{side}_root")
        if root and os.path.isfile(root):  # else load_dataset's message names --data-root
            raise C.UserError(f"--{side}-root {root} is a file; {getattr(args, side)} needs a "
                              "folder")
        setattr(args, f"{side}_root", root or args.data_root)
    args.dataset = f"{args.source}-to-{args.target}"  # the run folder's and --resume's key
    if args.diversity_cap < 0 or args.diversity_cap == 1:
        raise C.UserError("--diversity-cap must be 0 (every member) or at least 2, got "
                          f"{args.diversity_cap}")
    few, new = (args.shots is not None, "with a number of --shots (not all)"), (
        args.source_ckpt is None, "without --source-ckpt (it trains the source)")
    R.refuse_unread(p, argv, {"diversity_cap": few, "diversity_samples": few, "source_iters": new})
    return args


# -- The method, 1: the DCGAN of the paper's Section 3.1 (Radford et al.), unconditional ----
class DCGANGenerator(nn.Module):
    """z -> ConvT 4x4 -> 4x4 x 8dim, then ConvT 4x4 s2 layers halving the width (BN + ReLU
    between, tanh last; BN on batch statistics): 64x64, dim 64: Section 3.1's 512-256-128-64-C."""

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
    """x -> Conv 4x4 s2 layers doubling the width, LeakyReLU 0.2 -> Conv 4x4 -> one logit.
    Spectral norm (Miyato et al. 2018), not DCGAN's BN (ours, docs: BN gives away a batch of
    K distinct images): each image's score depends on it alone, as the per-sample Fisher needs."""

    def __init__(self, channels, dim=64, image_size=64):
        super().__init__()
        n_down = {32: 3, 64: 4}[image_size]
        widths = [channels] + [dim * 2 ** i for i in range(n_down)]
        convs = [nn.Conv2d(w_in, w_out, 4, 2, 1) for w_in, w_out in zip(widths, widths[1:])]
        convs.append(nn.Conv2d(widths[-1], 1, 4, 1, 0))
        dcgan_init(nn.ModuleList(convs))  # before spectral norm estimates sigma from them
        sn = nn.utils.parametrizations.spectral_norm
        layers = [m for conv in convs[:-1] for m in (sn(conv), nn.LeakyReLU(0.2, True))]
        self.net = nn.Sequential(*layers, sn(convs[-1]))

    def forward(self, x):
        return self.net(x).flatten()


def dcgan_init(module):
    """DCGAN's initialisation: conv weights N(0, 0.02), BN scale N(1, 0.02), offsets 0.
    Spectrally normalised convs are skipped (re-initialising would leave sigma stale)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)) and not \
                nn.utils.parametrize.is_parametrized(m, "weight"):
            nn.init.normal_(m.weight, 1.0 if isinstance(m, nn.BatchNorm2d) else 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# -- The method, 2: the source GAN (stage 1), with the non-saturating loss L_adv -----------
def gan_step(G, D, opt_G, opt_D, real, nz, penalty=None):
    """One D step and one G step of the non-saturating GAN (DCGAN's loss). penalty(), in
    the adaptation stage: lambda * sum F (theta - theta_S)^2. Returns detached losses."""
    fake = G(torch.randn(len(real), nz, device=real.device))
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
    progress = R.Progress(args.source_iters, args.log_every, "[source] ")
    for it in range(args.source_iters):
        idx = torch.randint(len(data), (args.batch_size,), device=device)
        d, adv, _ = gan_step(G, D, opt_G, opt_D, C.to_float(data[idx]), G.nz)
        progress.update(it, {"d_loss": d, "g_adv": adv})


# -- The method, 3: the Fisher information of the source generator's weights (stage 2) -----
def source_log_likelihood(D):
    """log L(x | theta) of the Fisher stage: log D_S(G(z)) = -softplus(-logit), the frozen
    source D's log-probability that a generated image is real (D in eval(): fixed buffers)."""
    def log_likelihood(G, m):
        z = torch.randn(m, G.nz, device=next(G.parameters()).device)
        return -F.softplus(-D(G(z)))
    return log_likelihood


def fisher_information(G, log_likelihood, n, batch=50):
    """Diagonal Fisher of G's parameters: F_i = mean over n generated samples of
    (d log L(x_j) / d theta_i)^2, one backward pass PER SAMPLE (the square of a mean gradient
    is another, much smaller quantity). log_likelihood(G, m): m per-image log-likelihoods."""
    params = dict(G.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for start in range(0, n, batch):
        m = min(batch, n - start)
        ll = log_likelihood(G, m)                   # m per-sample log-likelihoods
        for j in range(m):                          # per-sample gradients, squared
            grads = torch.autograd.grad(ll[j], list(params.values()), retain_graph=j < m - 1,
                                        allow_unused=True)
            for k, g in zip(params, grads):
                if g is not None:
                    fisher[k] += g.square()
    return {k: f / n for k, f in fisher.items()}


# -- The method, 4: adaptation, L_adv + lambda sum_i F_i (theta_i - theta_S,i)^2 (stage 3) --
def ewc_penalty(G, fisher, anchor):
    """sum_i F_i (theta_i - theta_S,i)^2 over the generator's parameters (without lambda)."""
    return sum((fisher[k] * (p - anchor[k]).square()).sum() for k, p in G.named_parameters())


def adapt(G_source, D_source, shots, fisher, lam, args, z_snap, snapshots=8):
    """Stage 3: fine-tune copies of the source G and D on the shots, G with lambda * sum_i F_i
    (theta_i - theta_S,i)^2 added (the paper). Returns G, GIF frames, last tenth's mean L_adv."""
    G, D = copy.deepcopy(G_source).train(), copy.deepcopy(D_source).train()
    anchor = {k: p.detach().clone() for k, p in G_source.named_parameters()}   # theta_S
    opt_G, opt_D = dcgan_adam(G, args.lr), dcgan_adam(D, args.lr)
    penalty = (lambda: lam * ewc_penalty(G, fisher, anchor)) if lam > 0 else None  # EWC term
    progress = R.Progress(args.iters, args.log_every, f"[adapt lambda={lam:g}] ")
    every, tail = max(1, args.iters // snapshots), max(1, args.iters // 10)
    adv_tail, frames = torch.zeros((), device=shots.device), []  # summed there: no host sync
    for it in range(args.iters):
        idx = torch.randint(len(shots), (args.batch_size,), device=shots.device)
        d, adv, pen = gan_step(G, D, opt_G, opt_D, C.to_float(shots[idx]), G.nz, penalty)
        progress.update(it, {"d_loss": d, "g_adv": adv, "ewc_penalty": pen})
        if it >= args.iters - tail:
            adv_tail += adv
        if (it + 1) % every == 0 or it + 1 == args.iters:
            with torch.no_grad():
                frames.append(G(z_snap).cpu())
    return G, frames, float(adv_tail) / tail


# -- Data: source, target, the K shots ----------------------------------------------------
def load_domain(name, root, train, size, channels, download):
    """A domain's uint8 images in the run's channels (grey -> RGB repeats, RGB -> grey takes
    the luminance), labels, class names. A `folder` may hold images directly (one class)."""
    if name == "folder" and os.path.isdir(root) and not any(
            os.path.isdir(os.path.join(root, d)) for d in os.listdir(root)):
        x = load_loose_images(root, size or 64)   # the folder itself is the one class
        y, names = torch.zeros(len(x), dtype=torch.long), [os.path.basename(root.rstrip("/"))]
    else:
        x, y, names = C.load_dataset(name, root, train, size, download)
    if len(x) < 2:  # one image has no covariance: the FD (frechet.py) needs two
        raise C.UserError(f"{name}: {len(x)} image(s) in {root}; the measures need at least 2")
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return x, y, names


def load_loose_images(root, size):
    """Every image file directly in `root`, resized and centre-cropped, as uint8 RGB."""
    import torchvision.transforms as T
    from local_data import DataError, open_rgb  # loaded only when needed, as by common
    ext = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
    files = sorted(f for f in os.listdir(root) if f.lower().endswith(ext))
    if not files:
        raise C.UserError(f"no images ({', '.join(ext)}) found in {root}")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        return torch.stack([tf(open_rgb(os.path.join(root, f))) for f in files])
    except DataError as err:  # an unreadable image: one line that names it
        raise C.UserError(str(err))


def pick_shots(x, k, seed):
    """K target images without replacement, seeded (k None: all of them, seeded order)."""
    k = len(x) if k is None else k
    if k > len(x):
        raise C.UserError(f"--shots {k}: the target has only {len(x)} images")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]
    return x[idx], idx


# -- The run: the three stages, each checkpointed (--resume skips finished ones) ----------
def stage_source(G, D, args, state, out, device, channels, sx):
    """Stage 1: the source GAN from source.pt (--resume), --source-ckpt or trained on sx."""
    src_path = os.path.join(out, "source.pt")
    if "source" in state.get("done", []):  # the run's own source: never replaced
        src = R.load_checkpoint(src_path)
        G.load_state_dict(src["G"]), D.load_state_dict(src["D"])
        print("source: resumed from the checkpoint", flush=True)
        return
    if args.source_ckpt:
        src = R.load_checkpoint(args.source_ckpt)
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
        if os.path.abspath(args.source_ckpt) == os.path.abspath(src_path):
            src = None  # already in place
    else:
        print(f"source {args.source}: {len(sx)} images; training {args.source_iters} "
              "iterations", flush=True)
        t0 = time.time()
        train_source(G, D, sx.to(device), args, device)
        R.check_finite(G, "[source] G"), R.check_finite(D, "[source] D")  # not saved if diverged
        state["seconds"]["source"] = time.time() - t0
        src = {"G": G.state_dict(), "D": D.state_dict(), "args": vars(args)}
    if src is not None:
        C.atomic_save(src, src_path)
    state.setdefault("done", []).append("source")
    R.save_checkpoint(out, state)


def stage_fisher(G, D, args, state, out, device):
    """Stage 2: the frozen source G's Fisher, from the frozen source D, once (fisher.pt)."""
    fisher_path, fisher = os.path.join(out, "fisher.pt"), None
    if "fisher" in state.get("done", []):
        try:
            loaded = R.load_checkpoint(fisher_path)["fisher"]
            if {k: f.shape for k, f in loaded.items()} != {
                    k: p.shape for k, p in G.named_parameters()}:
                raise C.UserError("its tensors do not fit the generator")
            fisher = loaded
        except (C.UserError, KeyError, AttributeError, TypeError) as err:
            if state["adapted"]:  # adapted with the original Fisher: never replaced
                raise C.UserError(f"--resume: {fisher_path} is unusable ({err}) and lambda "
                                  f"{', '.join(state['adapted'])} were adapted with the "
                                  f"original; start a new run (--source-ckpt {out}/source.pt)")
            print(f"fisher.pt unusable ({err}); nothing was adapted with it yet: computing "
                  "it again (new random draws: the numbers may differ slightly)", flush=True)
            state["done"].remove("fisher")
    if fisher is None:
        t0 = time.time()
        D.requires_grad_(False)
        fisher = fisher_information(G, source_log_likelihood(D), args.fisher_samples)
        D.requires_grad_(True)
        state["seconds"]["fisher"] = time.time() - t0
        C.atomic_save({"fisher": fisher}, fisher_path)
        state.setdefault("done", []).append("fisher")
        R.save_checkpoint(out, state)
    fisher = {k: f.to(device) for k, f in fisher.items()}
    flat = torch.cat([f.flatten() for f in fisher.values()])
    state["fisher_stats"] = s = {
        "mean": float(flat.mean()), "max": float(flat.max()), "median": float(flat.median()),
        "sum": float(flat.sum()), "n_params": len(flat),
        # Section 3.1's companion: how much the source relies on each conv layer
        "per_layer_mean": {k: float(f.mean()) for k, f in fisher.items() if f.dim() == 4}}
    print(f"Fisher over {len(flat)} generator parameters from {args.fisher_samples} samples: "
          f"mean {s['mean']:.3e}  median {s['median']:.3e}  max {s['max']:.3e}", flush=True)
    return fisher


def stage_adapt(G, D, shots, fisher, lam, args, state, out, z_grid, evaluate_G):
    """Stage 3 for one lambda (or its G from the checkpoint), measured. (G_adapted, frames)"""
    key = f"{lam:g}"
    torch.manual_seed(args.seed + 1)  # every lambda sees the same noise and batches
    if key in state["adapted"]:
        G_ad = copy.deepcopy(G)
        G_ad.load_state_dict(state["adapted"][key])
        print(f"adaptation lambda={key}: resumed from the checkpoint", flush=True)
        return G_ad, list(state["frames"][key])
    t0 = time.time()
    G_ad, frames, adv = adapt(G, D, shots, fisher, lam, args, z_grid)
    R.check_finite(G_ad, f"[adapt lambda={key}] G")
    G_ad.eval()
    state["results"][key] = dict(measure_adapted(G, G_ad, fisher, lam, adv, evaluate_G),
                                 seconds=time.time() - t0)
    state["adapted"][key] = G_ad.state_dict()
    state.setdefault("frames", {})[key] = frames
    R.save_checkpoint(out, state)
    return G_ad, frames


# -- Measurement, apart from the method: the joint evaluator's distances and diversity -----
@torch.no_grad()
def sample(G, n, device, batch=250):
    return torch.cat([G(torch.randn(min(batch, n - i), G.nz, device=device))
                      for i in range(0, n, batch)])


@torch.no_grad()
def weight_change_rate(G_source, G):
    """Section 3.1's analysis: per conv layer, ||theta - theta_S||_1 / ||theta_S||_1 in %."""
    src = dict(G_source.named_parameters())
    return {k: 100.0 * float((p - src[k]).abs().sum() / src[k].abs().sum())
            for k, p in G.named_parameters() if k.endswith("weight") and p.dim() == 4}


@torch.no_grad()
def perceptual_features(net, x, batch=250):
    """Uncalibrated LPIPS features (Zhang et al. 2018, no learned weights) of the conv blocks:
    activations unit-normalised over channels, / sqrt(H*W), flattened, concatenated."""
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.body)
    out = []
    for i in range(0, len(x), batch):
        h, feats = x[i:i + batch], []
        for m in net.body:
            h = m(h)
            if isinstance(m, nn.ReLU):
                f = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)
                feats.append(f.flatten(1) / (h.shape[2] * h.shape[3]) ** 0.5)
                if len(feats) == n_convs:
                    break
        out.append(torch.cat(feats, 1))
    return torch.cat(out)


def intra_cluster_diversity(gen_feat, shot_feat, cap=50, seed=0):
    """CDC's intra-cluster diversity (Ojha et al. 2021): images join their nearest shot's
    cluster; <= `cap` random members each (0: all); mean squared distance over each cluster's
    pairs, averaged over clusters of 2+. (diversity or None, sizes before the cap, n used)"""
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
    """The judge of every few-shot metric: a classifier of (domain, class), so it sees the
    target's LOOK (colour) beside its shapes. source/target: (images, labels, class names,
    test images, test labels). Returns (net, number of source classes, description)."""
    picks, n_src, n_classes = [], len(source[2]), len(source[2]) + len(target[2])
    for i, (x, y, names, tx, ty) in enumerate((source, target)):
        g = torch.Generator().manual_seed(i)
        idx = torch.randperm(len(x), generator=g)[:JOINT_PER_DOMAIN]
        idx = idx.repeat(math.ceil(JOINT_PER_DOMAIN / len(idx)))[:JOINT_PER_DOMAIN]
        tidx = torch.randperm(len(tx), generator=g)[:JOINT_PER_DOMAIN // 5]
        picks.append((x[idx], y[idx] + i * n_src, tx[tidx], ty[tidx] + i * n_src))
    x, y, tx, ty = (torch.cat(column) for column in zip(*picks))
    train, test = C.TaskData(x, y, device), C.TaskData(tx, ty, device)
    # cached in <target root>/evaluators/ (`folder`: beside it, not in it as a class)
    root = (os.path.dirname(os.path.abspath(args.target_root)) if args.target == "folder"
            else args.target_root)
    ns = argparse.Namespace(dataset=f"{args.source}+{args.target}", data_root=root)
    net, acc = C.get_evaluator(ns, train, test, n_classes, device)
    share = target_share(net, C.to_float(test.x), n_src, per_image=True)
    desc = {"name": f"joint {args.source}+{args.target} evaluator ({n_classes} classes: "
                    f"{n_src} source + {n_classes - n_src} target)", "class_accuracy": acc,
            "domain_accuracy": 100.0 * float(((test.y >= n_src) == share).float().mean()),
            "n_train": len(train.y), "fingerprint": R.fingerprint(*net.state_dict().values())}
    return net, n_src, desc


@torch.no_grad()
def target_share(net, x, n_source_classes, per_image=False, batch=1000):
    """Share of x called "target" (target classes' softmax mass > 1/2), or per image."""
    p = torch.cat([net(x[i:i + batch]).softmax(1)[:, n_source_classes:].sum(1)
                   for i in range(0, len(x), batch)])
    is_target = p > 0.5
    return is_target if per_image else float(is_target.float().mean())


METRIC_DEFINITIONS = {  # what each number in metrics.json is (written beside the results)
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
def evaluate(G, ev, args, device):
    """Every metric (METRIC_DEFINITIONS) of G, with measurement_setup's `ev`."""
    gen = sample(G, args.fd_samples, device)
    feat = FD.features(ev["net"], gen)
    res = {"fd_to_target": FD.frechet_distance(feat, ev["target_feat"]),
           "fd_to_source": FD.frechet_distance(feat, ev["source_feat"]),
           "target_share": target_share(ev["net"], gen, ev["n_source_classes"]),
           "fd_samples": args.fd_samples}
    if ev["shot_feat"] is not None:
        div_x = gen[:args.diversity_samples] if args.diversity_samples <= len(gen) else (
            sample(G, args.diversity_samples, device))
        div, sizes, used = intra_cluster_diversity(
            perceptual_features(ev["net"], div_x), ev["shot_feat"], args.diversity_cap)
        res.update(intra_cluster_lpips_uncalibrated=div, cluster_sizes=sizes,
                   clusters_used=used)
    if ev["inception"] is not None:
        res["inception_fid"] = FD.frechet_distance(ev["inception"][0](gen), ev["inception"][1])
    return res


def measurement_setup(args, source, target, shots, device):
    """The joint evaluator; features of the target and source sets, of the shots (cluster
    centres) and the target's Inception features. Returns (evaluate_G, evaluator desc)."""
    net, n_src, desc = joint_evaluator(args, source, target, device)
    ev = {"net": net, "n_source_classes": n_src,
          "target_feat": FD.features(net, C.to_float(target[0].to(device))),
          "source_feat": FD.features(net, C.to_float(source[0].to(device))),
          "shot_feat": (perceptual_features(net, C.to_float(shots))
                        if args.shots is not None else None), "inception": None}
    if args.inception_fid:
        net_i = FD.inception_features(device)
        ev["inception"] = (net_i, net_i(C.to_float(target[0].to(device))))
    print(f"evaluator: {desc['name']}; held-out class accuracy {desc['class_accuracy']:.1f}%, "
          f"domain accuracy {desc['domain_accuracy']:.1f}%", flush=True)
    return (lambda G: evaluate(G, ev, args, device)), desc


def measure_adapted(G_source, G, fisher, lam, adv, evaluate_G):
    """evaluate_G's, Section 3.1's weight change rate, the EWC penalty and its balance."""
    with torch.no_grad():
        pen = float(ewc_penalty(G, fisher, dict(G_source.named_parameters())))
    return dict(evaluate_G(G), weight_change_rate=weight_change_rate(G_source, G),
                ewc_penalty=pen, lambda_times_penalty=lam * pen, g_adv_final=adv,
                penalty_over_adv=lam * pen / adv if adv > 0 else float("nan"))


def report(args, out, G, shots, z_grid, grids, gif_frames, state, ev_desc, n_target, n_source):
    """Grid and GIF (shots, source, each lambda); the measures; Section 3.1's table."""
    keys, results = [f"{lam:g}" for lam in args.lambdas], state["results"]
    top = C.to_float(shots[:10]).cpu()
    with torch.no_grad():
        top = [torch.cat([top, torch.ones(10 - len(top), *top.shape[1:])]), G(z_grid).cpu()]
    C.write_image(os.path.join(out, "comparison.png"),
                  C.image_grid(torch.cat(top + [grids[k] for k in keys]), 10))
    C.save_gif([C.image_grid(torch.cat(top + [gif_frames[k][i] for k in keys]), 10)
                for i in range(min(len(f) for f in gif_frames.values()))],
               os.path.join(out, "adaptation.gif"))
    table = []
    for key in ["source"] + keys:
        r, div = results[key], results[key].get("intra_cluster_lpips_uncalibrated")
        name = "source (no adaptation)" if key == "source" else (
            "fine-tuning (lambda 0)" if float(key) == 0 else f"EWC lambda {key}"
            + (" (paper)" if float(key) == PAPER_LAMBDA else ""))
        table.append([name, r["fd_to_target"], r["fd_to_source"], r["target_share"],
                      "-" if div is None else f"{div:.3f}", f"{r['clusters_used']}/"
                      f"{len(r['cluster_sizes'])}" if "clusters_used" in r else "-",
                      f"{r['penalty_over_adv']:.3g}" if "penalty_over_adv" in r else "-"]
                     + ([r["inception_fid"]] if args.inception_fid else []))
    print(f"\n{args.source} -> {args.target}, {'all' if args.shots is None else args.shots} "
          f"shots, {args.iters} adaptation iterations. Measured with the {ev_desc['name']}: FD "
          f"on its penultimate features, {args.fd_samples} generated vs {n_target} target / "
          f"{n_source} source training images; target share: generated images it assigns to "
          "the target; *intra-cluster diversity on an uncalibrated LPIPS-style distance (its "
          f"conv features), {args.diversity_samples} samples, at most "
          f"{args.diversity_cap or 'all'} per cluster")
    print(C.fmt_table(["generator", "FD to target", "FD to source", "target share",
                       "intra-cl. LPIPS*", "clusters", "lam*F*d^2/L_adv"]
                      + (["Inception FID"] if args.inception_fid else []), table))
    fisher_mean = state["fisher_stats"]["per_layer_mean"]
    wc_rows = [[f"layer {i + 1} ({k})", f"{fisher_mean[k]:.2e}"]
               + [results[key]["weight_change_rate"][k] for key in keys]
               for i, k in enumerate(results[keys[0]]["weight_change_rate"])]
    print("\naverage weight change rate per layer, ||theta - theta_S||_1 / ||theta_S||_1 (%) "
          "(the paper's Section 3.1), beside the layer's mean Fisher")
    print(C.fmt_table(["layer", "mean Fisher"] + [f"lambda {k}" for k in keys], wc_rows))


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    R.suspect(args, parse_args([]), ("lr",))  # named if training diverges
    device = C.pick_device(args.device)
    print(f"device: {device}", flush=True)
    C.seed_everything(args.seed)
    out, ckpt = R.prepare_run(args, "ewc_fewshot")
    if ckpt is not None and ckpt.get("format") != STATE_FORMAT:
        raise C.UserError(f"--resume: {out} was written by an older ewc_fewshot.py (other "
                          f"metrics); start a new run, e.g. with --source-ckpt {out}/source.pt")
    state = ckpt or {"args": dict(vars(args)), "adapted": {}, "results": {}, "seconds": {},
                     "format": STATE_FORMAT}
    t_start, download = time.time(), not args.no_download
    # The target, its K shots (the run's channels and size are the target's), the source
    # (read once: trained on, and measured against), the networks.
    tx, ty, tnames = load_domain(args.target, args.target_root, True, args.image_size, None,
                                 download)
    R.run_inputs(ckpt, out, target_data=R.fingerprint(tx, ty))
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
    sx, sy, snames = load_domain(args.source, args.source_root, True, size, channels, download)
    R.run_inputs(ckpt, out, source_data=R.fingerprint(sx, sy))
    # Stage 1: the source GAN. Frozen from here on (adaptation fine-tunes copies); eval():
    # spectral norm stops its power iteration, so not even D's buffers change in stage 2.
    stage_source(G, D, args, state, out, device, channels, sx)
    # (after the first checkpoint: a run stopped before it leaves only args.json, restartable)
    C.write_image(os.path.join(out, "shots.png"),  # at most 100 of them
                  C.image_grid(C.to_float(shots[:100]), nrow=min(10, len(shots))))
    G.eval(), D.eval()
    with torch.no_grad():
        C.write_image(os.path.join(out, "source_samples.png"), C.image_grid(G(z_grid), 10))
    fisher = stage_fisher(G, D, args, state, out, device)  # Stage 2, from the frozen source D
    # The measurement (apart from the method): the joint source+target evaluator.
    test = [load_domain(name, root, False, size, channels, download) for name, root in
            ((args.source, args.source_root), (args.target, args.target_root))]
    evaluate_G, ev_desc = measurement_setup(args, (sx, sy, snames, *test[0][:2]),
                                            (tx, ty, tnames, *test[1][:2]), shots, device)
    R.run_inputs(ckpt, out, evaluator=ev_desc["fingerprint"])  # nothing measured is mixed
    if "source" not in state["results"]:  # its own draws: the same after --resume
        torch.manual_seed(args.seed + 2)
        state["results"]["source"] = evaluate_G(G)
    # Stage 3: adaptation, once per lambda, all from the same source, Fisher and shots.
    grids, gif_frames = {}, {}
    for lam in args.lambdas:
        key = f"{lam:g}"
        G_ad, gif_frames[key] = stage_adapt(G, D, shots, fisher, lam, args, state, out,
                                            z_grid, evaluate_G)
        with torch.no_grad():
            grids[key] = G_ad(z_grid).cpu()
        C.write_image(os.path.join(out, f"samples_lambda{key}.png"),
                      C.image_grid(sample(G_ad, 64, device).cpu(), 8))
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
    R.cli(main)
