"""MeRGAN-RA: Memory Replay GAN with replay alignment.

Paper: C. Wu, L. Herranz, X. Liu, Y. Wang, J. van de Weijer, B. Raducanu,
"Memory Replay GANs: learning to generate images from new categories without forgetting",
NeurIPS 2018 (arXiv:1809.02058), Section 3.2. Docs: docs/mergan.md.

A conditional WGAN-GP (with the AC classifier head, as the authors' code keeps it) learns
one class per task. Before each task a frozen copy of the generator, G_{t-1}, is kept. The
critic sees the current task only; the generator is trained adversarially on the current
task and, for every earlier class, is asked to draw the same image as G_{t-1} for the same
noise z and label c: a pixel-wise L2 "replay alignment" (Sec. 3.2; the equation numbers of
the paper could not be checked offline, so the code names the term). No data of earlier
tasks, real or generated, reaches the critic.

    python mergan_ra.py --dataset mnist                   # MeRGAN-RA, Table 1 (lambda_RA 1e-3)
    python mergan_ra.py --dataset svhn                    # lambda_RA 1e-2, 8001 iters/task
    python mergan_ra.py --dataset lsun --data-root LSUN    # Table 2: 64x64 ResNet nets, 4 scenes
    python mergan_ra.py --dataset synth --classes 0,1,2 --iters 300 --dim 16 --eval-samples 320
"""
import argparse
import copy

import torch
import torch.nn.functional as F

import common as C
import mergan_nets as M
import taskrun as R

# Table 1 of the paper: MeRGAN-RA average accuracy (%) after 5 and 10 tasks.
PAPER = {"mnist": {5: 98.19, 10: 97.01}, "svhn": {5: 76.05, 10: 66.78}}
# Table 2: LSUN bedroom -> kitchen -> church_outdoor -> tower, after task 4.
PAPER_LSUN = {"acc": 81.03, "rev_acc": 83.62, "fid": 37.73}


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, iters=None)
    p.add_argument("--lambda-ra", type=C.non_negative, default=None,
                   help="weight of the replay alignment loss, with the authors' normalisation "
                        "(1/2 sum of squares, / number of earlier classes with "
                        "--reduce-batch); default 1e-3, 1e-2 on svhn and synth-color (the "
                        "authors' train.sh)")
    p.add_argument("--ra-classifier", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the AC classifier head, as the authors' code does: D also learns "
                        "CE on the current real images, G CE on its current fakes (Eqs. 3, 6; "
                        "default); --no-ra-classifier: the critic alone, as the paper's text "
                        "reads")
    p.add_argument("--lambda-cls", type=C.non_negative, default=1.0,
                   help="weight of the AC losses with --ra-classifier (authors: 1)")
    p.add_argument("--reduce-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="the authors' REDUCE_BATCH (default: on for the digit nets, off for "
                        "the 64x64 LSUN nets, as they run): on, batch // K aligned samples per "
                        "earlier class and the alignment divided by K; off, a whole batch per "
                        "earlier class, not divided")
    M.add_mergan_args(p)  # the flags both MeRGAN scripts share
    args = R.parse_run_args(p, argv, run_flags=M.RUN_FLAGS, script="mergan_ra")
    M.mergan_defaults(args)  # arch, dim, iters, reduce-batch, final metrics per dataset
    if args.lambda_ra is None:  # the authors' train.sh: 1e-2 on SVHN, else (LSUN too) 1e-3
        args.lambda_ra = 1e-2 if args.dataset in ("svhn", "synth-color") else 1e-3
    R.refuse_unread(p, argv, {  # flags this run would never read
        "lambda_cls": (args.ra_classifier, "with --ra-classifier"),
        "inception_fid": (args.final_metrics, "with --final-metrics")})
    return args


# ------------------------------------------------------------------------------------------
# Replay alignment
# ------------------------------------------------------------------------------------------
def replay_alignment(x_now, x_prev, n_prev, reduce_batch=True):
    """The replay alignment loss (Sec. 3.2): E ||G_t(z, c) - G_{t-1}(z, c)||^2 over earlier
    classes c, the same z for both generators.

    Normalised as in the authors' code (mergan.py, about lines 275-281), for which lambda_RA
    was tuned: TF's l2_loss (1/2 * sum over pixels and batch), divided by the number of
    earlier classes with REDUCE_BATCH (their digits) and not divided without (LSUN)."""
    l2 = 0.5 * (x_now - x_prev).square().sum()
    return l2 / n_prev if reduce_batch else l2


def alignment_batch(prev_classes, batch_size, nz, device, reduce_batch=True):
    """Noise and labels for the alignment term: batch_size // n_prev per earlier class
    (REDUCE_BATCH, the authors' digits) or batch_size each (their LSUN setting)."""
    per = max(1, batch_size // len(prev_classes)) if reduce_batch else batch_size
    # as_tensor: a label tensor already on the device is used as is (no copy per step)
    y = torch.as_tensor(prev_classes, device=device).repeat_interleave(per)
    return torch.randn(len(y), nz, device=device), y


# ------------------------------------------------------------------------------------------
# One training iteration: critic steps on the current task, then a generator step
# ------------------------------------------------------------------------------------------
def critic_step(D, opt_D, x, y, fake, args):
    """WGAN-GP critic update on the current task only, real batch x, y against the fakes
    G(z, y); with --ra-classifier (authors) also the AC classifier's CE on the real images."""
    score, logits = D(torch.cat([x, fake]))        # one pass: the critic has no batch norm
    gp = C.gradient_penalty(lambda v: D(v)[0], x, fake)
    loss = score[len(y):].mean() - score[:len(y)].mean() + args.lambda_gp * gp  # Eq. (5)
    if logits is not None:  # --ra-classifier: Eq. (6), AC loss on the current real images
        loss = loss + args.lambda_cls * F.cross_entropy(logits[:len(y)], y)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach()


def generator_step(G, G_prev, D, opt_G, y, prev, args):
    """Adversarial loss on the current task (+ the AC loss on its fakes, --ra-classifier)
    + lambda_RA * replay alignment on the earlier classes (Sec. 3.2)."""
    z = torch.randn(len(y), G.nz, device=y.device)
    if G_prev is None:  # first task: a plain conditional WGAN-GP generator step
        z_all, y_all = z, y
    else:
        z_ra, y_ra = alignment_batch(prev, len(y), G.nz, y.device, args.reduce_batch)
        z_all, y_all = torch.cat([z, z_ra]), torch.cat([y, y_ra])
    x = G(z_all, y_all)     # per-class BN statistics: same as separate calls per class
    D.requires_grad_(False)  # no weight gradients for D in the generator step
    score, logits = D(x[:len(y)])
    loss_gan = -score.mean()                                               # Eq. (2)
    loss = loss_gan
    if logits is not None:  # --ra-classifier: Eq. (3), AC loss on the current fakes
        loss = loss + args.lambda_cls * F.cross_entropy(logits, y)
    loss_ra = torch.zeros((), device=y.device)
    if G_prev is not None:
        with torch.no_grad():
            x_prev = G_prev(z_ra, y_ra)  # the frozen generator: no gradient reaches it
        loss_ra = replay_alignment(x[len(y):], x_prev, len(prev), args.reduce_batch)
    loss = loss + args.lambda_ra * loss_ra  # RA's generator loss (Sec. 3.2)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss_gan.detach(), loss_ra.detach()


def train_task(t, G, D, env, args):
    """Train task t. Adam's state is re-initialised at every task, as the authors do."""
    task, prev = env.tasks[t], [c for tk in env.tasks[:t] for c in tk]
    graphed = C.use_cuda_graphs(args, env.device)  # --cuda-graphs on a CUDA device
    opt_G, opt_D = (C.adam(m, args.lr, (0.0, 0.9)) for m in (G, D))  # paper's betas
    # The frozen replay generator G_{t-1}, a copy taken before task t starts.
    G_prev = copy.deepcopy(G).requires_grad_(False) if prev else None
    prev_y = torch.tensor(prev, dtype=torch.long, device=env.device)  # once, not per step

    def iteration():  # one generator iteration: critic_iters critic steps, one G step
        # G is fixed during the critic steps: their real batches, and their fakes G(z, y)
        # (each step's own batch-norm batch), are drawn at once (M.draw_batches)
        n, k = args.batch_size, args.critic_iters
        xs, ys = env.train.batch(k * n, task)
        with torch.no_grad():  # the fakes need no graph in a critic step
            fakes = M.draw_batches(G, torch.randn(k * n, G.nz, device=xs.device), ys, n,
                                   plain=args.plain_step)
        for x, y, fake in zip(xs.split(n), ys.split(n), fakes.split(n)):
            d_loss = critic_step(D, opt_D, x, y, fake, args)
        g_loss, ra_loss = generator_step(G, G_prev, D, opt_G, y, prev_y, args)
        return {"d_loss": d_loss, "g_loss": g_loss, "ra_loss": ra_loss}

    # With --cuda-graphs on CUDA the iteration is recorded once in a CUDA graph and replayed;
    # otherwise `step()` is simply `iteration()`.
    step = C.GraphedStep(iteration, graphed)
    progress = R.Progress(args.iters, args.log_every, f"[task {t + 1}/{len(env.tasks)}] ")
    for it in range(args.iters):
        progress.update(it, step())


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    R.suspect(args, parse_args(["--dataset", args.dataset]),  # named if training diverges
              ("lr", "lambda_ra", "lambda_gp", "lambda_cls"))
    L = None  # Table 2's module (LSUN's data, ResNets, measures), loaded only when asked for
    if args.dataset == "lsun" or args.arch == "resnet" or args.final_metrics:
        import mergan_lsun as L
    env = R.setup(args, "mergan_ra", load=L and L.load_dataset)  # device, seed, data, evaluator
    G, D = (L or M).mergan_networks(args.arch, env.channels, env.n_classes, args.dim,
                                    env.image_size, env.n_classes if args.ra_classifier else None)
    G, D = G.to(env.device), D.to(env.device)
    default_protocol = args.classes is None and args.classes_per_task == 1

    # The continual-learning protocol: train task t, measure every class seen so far, save.
    run = R.TaskRun(args, env, "mergan-ra", {"G": G, "D": D}, generate=G)
    for t in run.remaining_tasks():  # with --resume: after the last checkpointed task
        train_task(t, G, D, env, args)  # G_{t-1} frozen inside; replay alignment
        run.end_task(t)  # Acc of every class seen (row t of R), sample grid, checkpoint
    metrics = run.finish(paper=PAPER.get(args.dataset) if default_protocol else None)
    if metrics is not None and args.final_metrics:  # Table 2's Rev acc and FID rows
        lsun = default_protocol and args.dataset == "lsun"
        metrics = L.table2_report(run, PAPER_LSUN if lsun else None)
    return metrics


if __name__ == "__main__":
    R.cli(main)
