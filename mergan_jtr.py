"""MeRGAN-JTR: Memory Replay GAN, joint training with replay; plus the SFT, EWC, JT baselines.

Paper: C. Wu, L. Herranz, X. Liu, Y. Wang, J. van de Weijer, B. Raducanu,
"Memory Replay GANs: learning to generate images from new categories without forgetting",
NeurIPS 2018 (arXiv:1809.02058), Sections 2-3. Docs: docs/mergan.md.

A conditional AC-GAN with a WGAN-GP loss learns one class per task. Before each task a
frozen copy of the generator, G_{t-1}, is kept; every real minibatch of the current class is
joined by one replayed minibatch covering all earlier classes (Eqs. 10-11), and critic,
classifier and generator are trained on that extended set. The baselines of the paper's
Table 1 are modes of the same script, with the same networks and losses: sequential
fine-tuning (no replay), EWC (fine-tuning with Eq. 9's Fisher-weighted anchor on the
generator) and joint training (JT: one run on every class of the run at once, as the
authors' joint.py). --mode cumulative is another experiment, not the paper's JT: task by
task on the real data of every class seen so far (the ideal replay).

    python mergan_jtr.py --dataset mnist                  # MeRGAN-JTR, Table 1
    python mergan_jtr.py --dataset mnist --mode sft       # sequential fine-tuning (Eqs. 7-8)
    python mergan_jtr.py --dataset mnist --mode ewc       # the EWC baseline (Eq. 9)
    python mergan_jtr.py --dataset mnist --mode jt        # the paper's JT: 0-9 at once
    python mergan_jtr.py --dataset mnist --mode jt --classes 0,1,2,3,4   # JT of 5 tasks
    python mergan_jtr.py --dataset mnist --mode cumulative   # task by task, real replay
    python mergan_jtr.py --dataset lsun --data-root LSUN   # Table 2: 64x64 ResNet nets, 4 scenes
    python mergan_jtr.py --dataset synth --classes 0,1,2 --iters 300 --dim 16 --eval-samples 320
    python benchmarks/step_speed.py                       # seconds per training iteration
    python benchmarks/table1.py --dataset mnist           # every Table 1 column + DGM at once
"""
import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import mergan_nets as M
import taskrun as R

# Table 1 of the paper: average accuracy (%) after 5 and 10 tasks, one digit per task.
PAPER = {("jtr", "mnist"): {5: 97.93, 10: 97.00}, ("jtr", "svhn"): {5: 80.90, 10: 66.50},
         ("sft", "mnist"): {5: 19.87, 10: 10.06}, ("sft", "svhn"): {5: 19.35, 10: 10.10},
         ("ewc", "mnist"): {5: 70.62, 10: 77.03}, ("ewc", "svhn"): {5: 39.84, 10: 33.02}}
# The paper's JT, keyed by the number of classes trained at once (classes 0..k-1): --mode jt.
PAPER_JT = {"mnist": {5: 97.66, 10: 96.92}, "svhn": {5: 85.30, 10: 84.82}}
# Table 2: LSUN bedroom -> kitchen -> church_outdoor -> tower, after task 4 (no JT column).
PAPER_LSUN = {"jtr": {"acc": 79.19, "rev_acc": 70.00, "fid": 49.69},
              "sft": {"acc": 15.02, "rev_acc": 28.0, "fid": 110.12},
              "ewc": {"acc": 14.28, "rev_acc": 63.35, "fid": 178.05}}


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, iters=None)
    p.add_argument("--mode", default="jtr", choices=["jtr", "sft", "ewc", "jt", "cumulative"],
                   help="jtr: joint training with replay (MeRGAN, Eqs. 10-11); sft: sequential "
                        "fine-tuning (Eqs. 7-8); ewc: sequential fine-tuning with EWC on the "
                        "generator (Eq. 9); jt: the paper's joint training, one task of every "
                        "class of the run at once (authors' joint.py); cumulative: task by "
                        "task on the real data of every class seen so far (not the paper's JT)")
    p.add_argument("--lambda-cls", type=C.non_negative, default=1.0, help="weight of the AC "
                   "classification losses, Eqs. (3) and (6) (paper: 1)")
    p.add_argument("--jtr-weighting", default="per-class", choices=["per-class", "batch"],
                   help="--mode jtr: how the losses weigh the classes of the joined batch; "
                        "per-class (the authors' code): each class's mean, summed, so every "
                        "earlier class weighs as much as the current one; batch: the mean over "
                        "the joined batch (the current class about half of it)")
    p.add_argument("--reduce-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="the authors' REDUCE_BATCH (default: on for the digit nets, off for "
                        "the 64x64 LSUN nets, as they run): on, each earlier class gets batch "
                        "// K replays; off, a whole batch each, and per-class JTR weighs the K "
                        "earlier classes 1/K each")
    p.add_argument("--jt-eval", default="balanced", choices=["balanced", "single-class"],
                   help="--mode jt: how Acc's images and the grids are generated; balanced "
                        "(the authors' joint.py test): inside batches holding every class 10 "
                        "times, normalised as one; single-class: batches of one class, as the "
                        "other modes (batches JT's generator never trained on)")
    p.add_argument("--ewc-lambda", type=C.non_negative, default=10.0,
                   help="--mode ewc: lambda_EWC of Eq. (9); 10 was chosen on synth for our "
                        "Fisher (docs/mergan.md); the paper's 1e9 belongs to a Fisher it "
                        "does not define, and here holds G at the first task or two")
    p.add_argument("--fisher-samples", type=C.at_least(2), default=1000,
                   help="--mode ewc: generated images whose squared per-sample gradients are "
                        "averaged into the Fisher information after each task")
    M.add_mergan_args(p)  # the flags both MeRGAN scripts share
    args = R.parse_run_args(p, argv, run_flags=M.RUN_FLAGS, script="mergan_")
    if args.iters is None and args.mode == "jt":  # JT, one task (joint.py): 40001, SVHN 80001
        args.iters = {"svhn": 80001, "synth-color": 80001}.get(args.dataset, 40001)
    M.mergan_defaults(args)  # arch, dim, iters, reduce-batch, final metrics per dataset
    if args.mode == "jt" and args.arch != "dcgan":
        raise C.UserError("--mode jt is Table 1's JT, for the digit nets (--arch dcgan); "
                          "Table 2 (LSUN) has no JT column")
    R.refuse_unread(p, argv, {  # flags the chosen mode never reads
        "jtr_weighting": (args.mode == "jtr", "with --mode jtr"),
        "reduce_batch": (args.mode == "jtr", "with --mode jtr (its replays)"),
        "jt_eval": (args.mode == "jt", "with --mode jt"),
        "ewc_lambda": (args.mode == "ewc", "with --mode ewc"),
        "fisher_samples": (args.mode == "ewc", "with --mode ewc"),
        "inception_fid": (args.final_metrics, "with --final-metrics")})
    n_classes = (len([c for c in args.classes.split(",") if c.strip()]) if args.classes
                 else C.dataset_info(args.dataset)[1])  # None for folder: not known yet
    if args.mode == "ewc" and n_classes and args.fisher_samples < n_classes:
        raise C.UserError(f"--fisher-samples {args.fisher_samples}: fewer than the run's "
                          f"{n_classes} classes; the Fisher needs an image of each")
    return args


# ------------------------------------------------------------------------------------------
# Memory replay
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def replay_batch(G_prev, prev_classes, batch_size, nz, device, reduce_batch=True, steps=1,
                 plain=False):
    """One replayed minibatch covering all earlier classes, drawn from the frozen G_{t-1}:
    batch_size // n_prev samples per earlier class (the authors' digits, REDUCE_BATCH on),
    or batch_size each (their LSUN setting, reduce_batch=False). Conditional BN uses
    per-class statistics, so this equals one single-class batch per class. steps > 1: that
    many such minibatches one after the other, drawn in one call (M.draw_batches)."""
    per = max(1, batch_size // len(prev_classes)) if reduce_batch else batch_size
    # as_tensor: a label tensor already on the device is used as is (no copy per step)
    y = torch.as_tensor(prev_classes, device=device).repeat_interleave(per)
    z = torch.randn(steps * len(y), nz, device=device)
    return M.draw_batches(G_prev, z, y.repeat(steps), len(y), plain=plain), y.repeat(steps)


def class_weights(n_cur, y_replay, earlier_scale=1.0):
    """Row weights of JTR's per-class losses (the authors' mergan.py, about lines 291-326)
    for a joined batch of n_cur current rows followed by replays labelled y_replay:
    sum_rows w * loss_row = the current task's mean + earlier_scale * (sum over earlier
    classes c of the mean over c's rows). Each earlier class then weighs as much as the
    current task (earlier_scale 1, the authors' digits) or all of them together as much
    (1/K, their LSUN setting)."""
    count = torch.bincount(y_replay).to(torch.float32)
    return torch.cat([torch.full((n_cur,), 1.0 / n_cur), earlier_scale / count[y_replay]])


def jtr_weights(args, prev, device):
    """The row weights of task t's joined batches (None: plain batch means): JTR with
    --jtr-weighting per-class and earlier classes to replay."""
    if args.mode != "jtr" or not prev or args.jtr_weighting != "per-class":
        return None
    per = max(1, args.batch_size // len(prev)) if args.reduce_batch else args.batch_size
    scale = 1.0 if args.reduce_batch else 1.0 / len(prev)  # the authors' REDUCE_BATCH
    return class_weights(args.batch_size, torch.tensor(prev).repeat_interleave(per),
                         scale).to(device)


def weighted_mean(values, w):
    """values.mean() (w None) or the weighted sum of the per-class losses."""
    return values.mean() if w is None else (w * values).sum()


# ------------------------------------------------------------------------------------------
# --mode jt: the paper's joint training (the authors' joint.py), every class in one task
# ------------------------------------------------------------------------------------------
def uniform_labels(classes_t, n):
    """n labels drawn uniformly from the classes (a tensor on the device): the fake labels
    of joint.py, drawn afresh for every critic and generator step, independent of the real
    batch's labels."""
    return classes_t[torch.randint(len(classes_t), (n,), device=classes_t.device)]


def balanced_generate(G, classes, per_class=10):
    """JT's generation for Acc and the grids: generate(z, y) for rows of ONE class, each
    image made inside a balanced batch of `per_class` rows of every class of the run,
    normalised as one batch -- the authors' joint.py test (batches of 100: classes 0-9, ten
    times). JT's generator learns batch norm on mixed batches (normalised as one), so a
    single-class batch would give it statistics it never saw in training."""
    K, cls = len(classes), torch.as_tensor(classes)

    @torch.no_grad()
    def generate(z, y):
        c = int(y[0])
        if not bool((y == c).all()):
            raise ValueError("balanced_generate: one class per call")
        m, pos, dev = len(z), classes.index(c), z.device
        n = -(-m // per_class)                       # balanced batches needed for m rows
        labels = cls.to(dev).repeat_interleave(per_class).repeat(n)         # n x K*per
        noise = torch.randn(n, K * per_class, G.nz, device=dev)
        asked = torch.cat([z, torch.randn(n * per_class - m, G.nz, device=dev)])
        noise[:, pos * per_class:(pos + 1) * per_class] = asked.view(n, per_class, G.nz)
        groups = torch.arange(n, device=dev).repeat_interleave(K * per_class)
        x = G(noise.flatten(0, 1), labels, groups, n).unflatten(0, (n, K * per_class))
        return x[:, pos * per_class:(pos + 1) * per_class].flatten(0, 1)[:m]
    return generate


# ------------------------------------------------------------------------------------------
# --mode ewc: Elastic Weight Consolidation on the generator (the EWC baseline, Eq. 9)
# ------------------------------------------------------------------------------------------
class EWCState(nn.Module):
    """F_{t-1} and theta_{t-1} of Eq. (9), one buffer per generator parameter, so that they
    are checkpointed (and restored on --resume) with the networks."""

    def __init__(self, G):
        super().__init__()
        self.names = [k for k, _ in G.named_parameters()]
        for k, p in G.named_parameters():
            self.register_buffer("F_" + k.replace(".", "_"), torch.zeros_like(p))
            self.register_buffer("theta_" + k.replace(".", "_"), torch.zeros_like(p))

    def get(self, prefix):
        """{generator parameter name: buffer} for prefix "F_" or "theta_"."""
        return {k: getattr(self, prefix + k.replace(".", "_")) for k in self.names}


def ewc_penalty(G, fisher, anchor):
    """sum_i F_i (theta_i - theta_anchor,i)^2 over the generator's parameters (no lambda)."""
    return sum((fisher[k] * (p - anchor[k]).square()).sum() for k, p in G.named_parameters())


def ewc_term(G, ewc_lambda, fisher, anchor):
    """Eq. (9)'s regulariser: (lambda_EWC / 2) sum_i F_{t-1,i} (theta_i - theta_{t-1,i})^2
    (the 1/2 is the paper's; the few-shot EWC of ewc_fewshot.py has none)."""
    return (ewc_lambda / 2) * ewc_penalty(G, fisher, anchor)


def fisher_information(G, classes, n, batch=64):
    """Diagonal Fisher of G's parameters after a task. The paper does not say whose
    likelihood its Fisher is (docs/mergan.md); ours reads G as a density over images with
    unit Gaussian pixel noise, x ~ N(G(z, c), I), whose Fisher is
        F_i = E_{z,c} E_{x ~ N(G(z,c), I)} [(d log p(x | z, c) / d theta_i)^2]
            = E_{z,c} sum_pixels (d G(z, c)_p / d theta_i)^2,
    how far the images of the classes seen move when theta_i moves. It is sampled as the
    definition reads, x from the model itself (the true Fisher, not the empirical one of
    some data labels): d log p(x|z,c) / d theta = eps^T dG(z,c)/d theta with eps = x -
    G(z, c) ~ N(0, I). One backward pass PER SAMPLE: F = (1/n) sum_j g_j^2 (the square of a
    mean gradient is another, much smaller quantity). The n samples are split evenly over
    `classes`, each class's drawn in single-class batches of near-equal sizes up to `batch`
    (100 -> 50 + 50, never 64 + 36), so that G's conditional BN normalises each class over
    a batch of its own as in training and evaluation."""
    params = dict(G.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    dev, k = next(G.parameters()).device, len(classes)
    for i, cls in enumerate(classes):
        n_c = n // k + (i < n % k)                  # this class's share of the n samples
        n_b = -(-n_c // batch)                      # its batches: ceil(n_c / batch)
        for b in range(n_b):
            m = n_c // n_b + (b < n_c % n_b)        # near-equal sizes, at most `batch`
            mean = G(torch.randn(m, G.nz, device=dev), torch.full((m,), cls, device=dev))
            x = mean.detach() + torch.randn_like(mean)  # x ~ N(G(z, c), I): the model's own
            ll = -0.5 * (x - mean).square().flatten(1).sum(1)  # log p(x|z,c) + const
            for j in range(m):                      # per-sample gradients, squared
                grads = torch.autograd.grad(ll[j], list(params.values()),
                                            retain_graph=j < m - 1, allow_unused=True)
                for (name, _), g in zip(params.items(), grads):
                    if g is not None:
                        fisher[name] += g.square()
    return {k: f / n for k, f in fisher.items()}


# ------------------------------------------------------------------------------------------
# What sets the modes apart, in one place
# ------------------------------------------------------------------------------------------
# Sequential fine-tuning (SFT, Eqs. 7-8): the plain conditional WGAN-GP on the current task.
PLAIN = argparse.Namespace(real_batches=None, w=None, fake_labels=lambda y: y, bn_groups=None,
                           penalty=None)


def task_mode(t, G, env, args, ewc=None):
    """How task t's iteration differs from SFT in each mode (PLAIN where it does not):

      real_batches(k) the critic's real minibatches (x, y) of k critic steps: the current
                      task's images (first args.batch_size rows), joined by replays of every
                      earlier class from the frozen G_{t-1} (jtr: S'_t, Eq. 10) or by their
                      real images (cumulative: the ideal replay, not the paper's JT);
      w               jtr: the authors' per-class row weights of Eq. (11), else None;
      fake_labels(y)  jt: fresh labels drawn uniformly over the task's classes, independent
                      of the real ones (joint.py); else y, as mergan.py;
      bn_groups       jt: G normalises each mixed batch as one (joint.py); else per class;
      penalty()       ewc from the second task on: Eq. (9)'s regulariser."""
    task, prev = env.tasks[t], [c for tk in env.tasks[:t] for c in tk]
    n, dev = args.batch_size, env.device

    def joined(x, y, xr, yr, k):  # k minibatches: step i's rows of x, y, then of xr, yr
        return [(torch.cat([a, b]), torch.cat([c, d])) for a, b, c, d in
                zip(x.split(n), xr.split(len(xr) // k), y.split(n), yr.split(len(yr) // k))]
    def own_batches(k):  # the current task's real images only
        x, y = env.train.batch(k * n, task)
        return list(zip(x.split(n), y.split(n)))
    mode = argparse.Namespace(**dict(vars(PLAIN), real_batches=own_batches))
    if args.mode == "jtr" and prev:
        G_prev = copy.deepcopy(G).requires_grad_(False)  # G_{t-1}, a frozen copy (Eq. 10)
        prev_y = torch.tensor(prev, dtype=torch.long, device=dev)  # once, not per step

        def real_batches(k):  # S'_t (Eq. 10): real images of task t + replays from G_{t-1}
            x, y = env.train.batch(k * n, task)
            xr, yr = replay_batch(G_prev, prev_y, n, G.nz, dev, args.reduce_batch, k,
                                  args.plain_step)
            return joined(x, y, xr, yr, k)
        mode.real_batches, mode.w = real_batches, jtr_weights(args, prev, dev)
    elif args.mode == "cumulative" and prev:
        def real_batches(k):  # real images of task t + real images of the earlier classes
            x, y = env.train.batch(k * n, task)
            xr, yr = env.train.batch(k * n, prev)
            return joined(x, y, xr, yr, k)
        mode.real_batches = real_batches
    elif args.mode == "jt":  # the paper's JT: one task holding every class (joint.py)
        task_y = torch.tensor(task, dtype=torch.long, device=dev)
        mode.fake_labels = lambda y: uniform_labels(task_y, len(y))
        mode.bn_groups = (torch.zeros(n, dtype=torch.long, device=dev), 1)
    elif args.mode == "ewc" and t > 0:
        fisher, anchor = ewc.get("F_"), ewc.get("theta_")  # F_{t-1}, theta_{t-1}
        mode.penalty = lambda: ewc_term(G, args.ewc_lambda, fisher, anchor)
    return mode


# ------------------------------------------------------------------------------------------
# One training iteration: critic steps, then a generator step
# ------------------------------------------------------------------------------------------
def critic_step(D, opt_D, x, y, fake, n_cur, args, mode=PLAIN):
    """One critic/classifier update on the real batch x, y (task_mode's real_batches)
    against as many fakes G(z, fake_labels(y)).

    The first n_cur rows are the current task's real images; replays (JTR) and earlier
    classes' real images (cumulative) count as real data for the critic and the classifier;
    the gradient penalty uses the current task's rows only (authors)."""
    score, logits = D(torch.cat([x, fake]))        # one pass: the critic has no batch norm
    s_real, s_fake = score[:len(y)], score[len(y):]
    gp = C.gradient_penalty(lambda v: D(v)[0], x[:n_cur], fake[:n_cur])
    if mode.w is None:
        loss_gan = s_fake.mean() - s_real.mean() + args.lambda_gp * gp  # Eq. (5): WGAN-GP
        loss_cls = F.cross_entropy(logits[:len(y)], y)                   # Eq. (6): AC, real
    else:  # Eq. (11): the same losses on S'_t, per-class means summed (authors)
        loss_gan = weighted_mean(s_fake - s_real, mode.w) + args.lambda_gp * gp
        loss_cls = weighted_mean(F.cross_entropy(logits[:len(y)], y, reduction="none"),
                                 mode.w)
    loss = loss_gan + args.lambda_cls * loss_cls
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss_gan.detach(), loss_cls.detach()


def generator_step(G, D, opt_G, y, args, mode=PLAIN):
    """One generator update for the labels y of the critic's last real batch (current task
    + replayed classes; jt: its own fresh labels)."""
    y = mode.fake_labels(y)
    D.requires_grad_(False)  # no weight gradients for D in the generator step
    z = torch.randn(len(y), G.nz, device=y.device)
    score, logits = D(G(z, y) if mode.bn_groups is None else G(z, y, *mode.bn_groups))
    if mode.w is None:
        loss_gan = -score.mean()                  # Eq. (2): WGAN generator loss
        loss_cls = F.cross_entropy(logits, y)     # Eq. (3): AC loss on generated images
    else:  # Eq. (11): per-class means summed (authors)
        loss_gan = -weighted_mean(score, mode.w)
        loss_cls = weighted_mean(F.cross_entropy(logits, y, reduction="none"), mode.w)
    loss = loss_gan + args.lambda_cls * loss_cls
    pen = torch.zeros((), device=y.device)
    if mode.penalty is not None:
        pen = mode.penalty()  # Eq. (9): (lambda_EWC/2) sum_i F_{t-1,i} (theta_i - theta_{t-1,i})^2
        loss = loss + pen
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss_gan.detach(), loss_cls.detach(), pen.detach()


def train_task(t, G, D, env, args, ewc=None):
    """Train task t. Adam's state is re-initialised at every task, as the authors do.
    --mode ewc: `ewc` (an EWCState) holds F_{t-1} and theta_{t-1}; after the task it is
    refilled with F_t and theta_t for the next."""
    graphed = C.use_cuda_graphs(args, env.device)  # --cuda-graphs on a CUDA device
    opt_G, opt_D = (C.adam(m, args.lr, (0.0, 0.9)) for m in (G, D))  # paper's betas
    mode = task_mode(t, G, env, args, ewc)  # what this mode changes (Eqs. 9-11, JT)

    def iteration():  # one generator iteration: critic_iters critic steps, one G step
        # G and G_{t-1} are fixed during the critic steps: their real batches (replays
        # included), and their fakes (each step's own batch-norm batch), are drawn at once
        batches = mode.real_batches(args.critic_iters)
        labels = mode.fake_labels(torch.cat([y for _, y in batches]))
        with torch.no_grad():  # the fakes need no graph in a critic step
            fakes = M.draw_batches(G, torch.randn(len(labels), G.nz, device=labels.device),
                                   labels, len(batches[0][1]), mode.bn_groups is None,
                                   args.plain_step)
        for (x, y), fake in zip(batches, fakes.split(len(batches[0][1]))):
            d_gan, d_cls = critic_step(D, opt_D, x, y, fake, args.batch_size, args, mode)
        g_gan, g_cls, pen = generator_step(G, D, opt_G, y, args, mode)
        losses = {"d_loss": d_gan, "d_cls": d_cls, "g_loss": g_gan, "g_cls": g_cls}
        return dict(losses, ewc_penalty=pen) if args.mode == "ewc" else losses

    # With --cuda-graphs on CUDA the iteration is recorded once in a CUDA graph and replayed;
    # otherwise `step()` is simply `iteration()`.
    step = C.GraphedStep(iteration, graphed)
    progress = R.Progress(args.iters, args.log_every, f"[task {t + 1}/{len(env.tasks)}] ")
    for it in range(args.iters):
        progress.update(it, step())
    if args.mode == "ewc":  # F_t and theta_t for the next task, over every class seen
        seen = [c for tk in env.tasks[:t + 1] for c in tk]
        new_f = fisher_information(G, seen, args.fisher_samples)
        for k, p in G.named_parameters():
            ewc.get("F_")[k].copy_(new_f[k])
            ewc.get("theta_")[k].copy_(p.detach())


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    R.suspect(args, parse_args(["--dataset", args.dataset]),  # named if training diverges
              ("lr", "lambda_gp", "lambda_cls", "ewc_lambda"))
    L = None  # Table 2's module (LSUN's data, ResNets, measures), loaded only when asked for
    if args.dataset == "lsun" or args.arch == "resnet" or args.final_metrics:
        import mergan_lsun as L
    env = R.setup(args, f"mergan_{args.mode}", load=L and L.load_dataset)
    if args.mode == "jt":  # the paper's JT: one task, every class of the run at once
        env.tasks = [[c for task in env.tasks for c in task]]
        print(f"--mode jt: one task of classes {env.tasks[0]}, {args.iters} iterations",
              flush=True)
    G, D = (L or M).mergan_networks(args.arch, env.channels, env.n_classes, args.dim,
                                    env.image_size, critic_classes=env.n_classes)
    G, D = G.to(env.device), D.to(env.device)
    models = {"G": G, "D": D}
    ewc = None
    if args.mode == "ewc":  # F and theta of Eq. (9), checkpointed with the networks
        ewc = models["ewc"] = EWCState(G).to(env.device)
    default_protocol = args.classes is None and args.classes_per_task == 1
    paper = PAPER.get((args.mode, args.dataset)) if default_protocol else None
    generate = G
    if args.mode == "jt":
        classes = env.tasks[0]  # the paper's JT of k tasks = classes 0..k-1 at once
        k = len(classes)
        if classes == list(range(k)) and k in PAPER_JT.get(args.dataset, {}):
            paper = {1: PAPER_JT[args.dataset][k]}
        if args.jt_eval == "balanced":  # mixed batches, as JT trains (joint.py)
            generate = balanced_generate(G, classes)

    # The continual-learning protocol: train task t, measure every class seen so far, save.
    run = R.TaskRun(args, env, f"mergan-{args.mode}", models, generate=generate)
    for t in run.remaining_tasks():  # with --resume: after the last checkpointed task
        train_task(t, G, D, env, args, ewc)  # real data of task t (+ replay, Eqs. 10-11)
        run.end_task(t)  # Acc of every class seen (row t of R), sample grid, checkpoint
    metrics = run.finish(paper=paper)
    if metrics is not None and args.final_metrics:  # Table 2's Rev acc and FID rows
        lsun = default_protocol and args.dataset == "lsun"
        metrics = L.table2_report(run, PAPER_LSUN.get(args.mode) if lsun else None)
    return metrics


if __name__ == "__main__":
    R.cli(main)
