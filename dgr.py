"""DGR: deep generative replay, the DGR column of MeRGAN's Table 1.

Papers: H. Shin, J. K. Lee, J. Kim, J. Kim, "Continual Learning with Deep Generative Replay",
NeurIPS 2017 (arXiv:1705.08690), Section 3; as MeRGAN's baseline: C. Wu et al., "Memory
Replay GANs", NeurIPS 2018, Section 4.1 ("an unconditional GAN followed by a classifier to
predict the label"). Docs: docs/dgr.md.

A "scholar" is a generator and a solver. The generator is an UNCONDITIONAL WGAN-GP on
MeRGAN's networks and settings (digits: the DCGAN, dim 32; LSUN: the ResNets, dim 64; the
comparison with MeRGAN is then of the method alone); the solver is a classifier. Before each task frozen copies G_{t-1}, S_{t-1} are
kept. Every real minibatch of the current class is joined by one replayed minibatch drawn
from G_{t-1} (all earlier tasks, MeRGAN Sec. 4.1): the generator learns the joined set as
one distribution; the solver learns the current real images with their labels and the
replays with the labels S_{t-1} gives them. Acc needs a class for every generated image:
the solver assigns it (as the paper's figures do); see `dgr_accuracy` and docs/dgr.md.

    python dgr.py --dataset mnist                   # DGR, Table 1 (MNIST 90.39 / 85.40)
    python dgr.py --dataset svhn                    # 8001 iterations per task
    python dgr.py --dataset mnist --dgr-acc budget  # the other reading of Acc (docs/dgr.md)
    python dgr.py --dataset lsun --data-root LSUN   # Table 2: ResNets, Acc / Rev acc / FID
    python dgr.py --dataset synth --classes 0,1,2 --iters 300 --dim 16 --lr 1e-3 --eval-samples 320
    python benchmarks/table1.py --dataset mnist     # every Table 1 column, DGR among them
"""
import argparse
import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import mergan_nets as M
import taskrun as R

# Table 1 of MeRGAN: DGR's average accuracy (%) after 5 and 10 tasks, one digit per task.
PAPER = {"mnist": {5: 90.39, 10: 85.40}, "svhn": {5: 61.29, 10: 47.28}}
# Table 2: LSUN bedroom -> kitchen -> church_outdoor -> tower, after task 4.
PAPER_LSUN = {"acc": 15.40, "rev_acc": 26.17, "fid": 93.70}


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, iters=None)
    p.add_argument("--solver-lr", type=C.positive, default=1e-3,
                   help="the solver's Adam learning rate (betas 0.9, 0.999; neither paper "
                        "gives one)")
    p.add_argument("--dgr-acc", default="assigned", choices=["assigned", "budget"],
                   help="Acc of class c from --eval-samples x (classes seen) unconditional "
                        "images: assigned, the evaluator's accuracy on the images the solver "
                        "calls c (0 if none); budget, the evaluator-confirmed images the solver "
                        "calls c out of --eval-samples, its share of the budget (docs/dgr.md)")
    M.add_mergan_args(p)  # MeRGAN's WGAN-GP settings, nets (LSUN: the ResNets), Table 2
    args = R.parse_run_args(p, argv, run_flags=M.RUN_FLAGS, script="dgr")
    M.mergan_defaults(args)  # arch, dim, iters (train.sh), Table 2's metrics per dataset
    R.refuse_unread(p, argv, {"inception_fid": (args.final_metrics, "with --final-metrics")})
    return args


# ------------------------------------------------------------------------------------------
# The scholar: an unconditional generator and a solver
# ------------------------------------------------------------------------------------------
class Solver(nn.Module):
    """The classifier of the scholar (common.make_classifier's net, width 32), with a record
    of the classes it has learned: `predict` chooses among those only (a class-incremental
    solver over the classes seen so far, as DGM's A_t). The record is a buffer, so that it
    is checkpointed with the weights."""

    def __init__(self, channels, n_classes, width=32):
        super().__init__()
        self.net = C.make_classifier("ours", channels, n_classes, width)
        self.register_buffer("learned", torch.zeros(n_classes, dtype=torch.bool))

    def forward(self, x):
        return self.net(x)  # logits over every class of the dataset

    @torch.no_grad()
    def predict(self, x, batch=1000):
        """The learned class with the highest logit, in eval mode (no dropout)."""
        was = self.training
        self.eval()
        pred = torch.cat([self.net(x[i:i + batch]).masked_fill(~self.learned, -torch.inf)
                          .argmax(1) for i in range(0, len(x), batch)])
        self.train(was)
        return pred


def draw(G, n, batch, device):
    """n images from the unconditional generator, in batches of `batch` rows each normalised
    as one (batch norm always uses batch statistics, mergan_nets.CondBatchNorm2d): training,
    replay and evaluation all draw batches of the same size."""
    return torch.cat([G(torch.randn(m, G.nz, device=device))
                      for m in [min(batch, n - i) for i in range(0, n, batch)]])


# ------------------------------------------------------------------------------------------
# One training iteration: critic steps on the joined batch, a generator step, a solver step
# ------------------------------------------------------------------------------------------
def critic_step(D, opt_D, x, fake, args):
    """WGAN-GP critic update (MeRGAN Eq. 5 without the class: DGR's GAN is unconditional):
    x is the current task's real batch joined by the replays of G_{t-1}, which count as
    real data; the fakes are as many images of G, in batches of --batch-size (train_task).
    The gradient penalty is over every real row: the data distribution is the joined set."""
    score, _ = D(torch.cat([x, fake]))  # one pass: the critic has no batch norm
    gp = C.gradient_penalty(lambda v: D(v)[0], x, fake)
    loss = score[len(x):].mean() - score[:len(x)].mean() + args.lambda_gp * gp  # Eq. (5)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach()


def generator_step(G, D, opt_G, n, args):
    """WGAN generator update, MeRGAN Eq. (2) without the class: -E[D(G(z))] over n images
    in batches of --batch-size."""
    D.requires_grad_(False)  # no weight gradients for D in the generator step
    z = torch.randn(n, G.nz, device=next(G.parameters()).device)
    x = M.draw_batches(G, z, None, args.batch_size, plain=args.plain_step)
    loss = -D(x)[0].mean()  # Eq. (2)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def solver_step(S, S_prev, opt_S, x, y):
    """The solver's loss (Shin et al., Sec. 3.2): r CE(S(x), y) on the current real images +
    (1 - r) CE(S(x'), S_{t-1}(x')) on the replays x' labelled by the FROZEN previous solver.
    x holds len(y) real rows, then the replays; equal halves give r = 1/2 (MeRGAN: one
    replayed batch per real batch), the mean over the joined batch."""
    if S_prev is not None:
        y = torch.cat([y, S_prev.predict(x[len(y):])])  # labels of S_{t-1} for the replays
    loss = F.cross_entropy(S(x), y)
    opt_S.zero_grad(set_to_none=True)
    loss.backward()
    opt_S.step()
    return loss.detach()


def train_task(t, G, D, S, env, args):
    """Learn task t: the generator on the current real images + replays of G_{t-1}; the
    solver on the same joined batch, the replays labelled by S_{t-1}. Adam's states are
    re-initialised at every task (as MeRGAN's authors do for the GAN)."""
    task, n, dev = env.tasks[t], args.batch_size, env.device
    graphed = C.use_cuda_graphs(args, dev)  # --cuda-graphs on a CUDA device
    opt_G, opt_D = (C.adam(m, args.lr, (0.0, 0.9)) for m in (G, D))  # MeRGAN's
    opt_S = C.adam(S, args.solver_lr, (0.9, 0.999))
    G_prev = S_prev = None
    if t > 0:  # the previous scholar, frozen: the source of replays and of their labels
        G_prev = copy.deepcopy(G).requires_grad_(False)
        S_prev = copy.deepcopy(S).requires_grad_(False).eval()
    S.learned[task] = True  # the solver learns this task's classes from now on

    def real_batches(k):  # k batches of the current task's real images, each joined by
        x, y = env.train.batch(k * n, task)  # one replayed batch of G_{t-1}
        if G_prev is None:
            return list(zip(x.split(n), y.split(n)))
        with torch.no_grad():
            xr = M.draw_batches(G_prev, torch.randn(k * n, G.nz, device=dev), None, n,
                                plain=args.plain_step)
        return [(torch.cat([a, b]), c) for a, b, c in zip(x.split(n), xr.split(n), y.split(n))]

    def iteration():  # critic_iters critic steps, one generator step, one solver step
        # G and G_{t-1} are fixed during the critic steps: their real batches (replays
        # included) and their fakes (batch-norm batches of n rows) are drawn at once
        batches = real_batches(args.critic_iters)
        m = len(batches[0][0])
        with torch.no_grad():  # the fakes need no graph in a critic step
            fakes = M.draw_batches(G, torch.randn(len(batches) * m, G.nz, device=dev), None,
                                   n, plain=args.plain_step)
        for (x, y), fake in zip(batches, fakes.split(m)):
            d_loss = critic_step(D, opt_D, x, fake, args)
        g_loss = generator_step(G, D, opt_G, len(x), args)
        s_loss = solver_step(S, S_prev, opt_S, x, y)  # the last critic step's batch
        return {"d_loss": d_loss, "g_loss": g_loss, "s_loss": s_loss}

    # With --cuda-graphs on CUDA the iteration is recorded once in a CUDA graph and replayed;
    # otherwise `step()` is simply `iteration()`.
    step = C.GraphedStep(iteration, graphed)
    progress = R.Progress(args.iters, args.log_every, f"[task {t + 1}/{len(env.tasks)}] ")
    for it in range(args.iters):
        progress.update(it, step())


# ------------------------------------------------------------------------------------------
# Measuring an unconditional generator: the solver names the class of each image
# ------------------------------------------------------------------------------------------
def dgr_accuracy(assigned, judged, seen, n, reading="assigned"):
    """Acc of DGR's generator from N = n x len(seen) unconditional images: `assigned`, the
    class the solver gives each image; `judged`, the evaluator's (-1: not an image).
    An image with NaN/Inf pixels has -1 for both: no class's, never an agreement.
    For each seen class c, with k_c images assigned to c and g_c of them judged c:
      assigned: Acc_c = 100 g_c / k_c (0 if k_c = 0): MeRGAN's Acc with the solver's label
                standing in for the conditioning label;
      budget:   Acc_c = 100 min(g_c, n) / n: c's confirmed images out of the n a conditional
                generator would be asked for; a class drawn rarely scores low.
    Returns ({c: Acc_c}, {c: share of the N images assigned to c, %}, pooled agreement %,
    the share of all N images on which solver and evaluator agree)."""
    acc, share, N = {}, {}, len(assigned)
    for c in seen:
        mine = assigned == c
        k, g = int(mine.sum()), int((judged[mine] == c).sum())
        share[c] = 100.0 * k / N
        if reading == "assigned":
            acc[c] = 100.0 * g / k if k else 0.0
        else:
            acc[c] = 100.0 * min(g, n) / n
    pooled = 100.0 * float(((assigned == judged) & (judged >= 0)).float().mean())
    return acc, share, pooled


@torch.no_grad()
def solver_accuracy(S, test, tasks_seen):
    """A_t's ingredients (DGM's metric): the solver's accuracy (%) on the real test images of
    each seen task, choosing among the learned classes."""
    out = []
    for task in tasks_seen:
        x, y = test.subset(task)
        out.append(100.0 * float((S.predict(x) == y).float().mean()))
    return out


def make_measure(G, S, env, args, results):
    """measure(seen) for taskrun.TaskRun: draws --eval-samples x len(seen) images from G, lets
    the solver and the evaluator classify each (in chunks of 100 batches: no image set
    held whole), and returns {c: Acc_c} (`dgr_accuracy`, --dgr-acc); the shares, the
    pooled agreement and the solver's A_t join `results` (metrics.json)."""
    @torch.no_grad()
    def measure(seen):
        n, dev, assigned, judged = args.eval_samples, env.device, [], []
        total, chunk = n * len(seen), args.batch_size * 100
        for i in range(0, total, chunk):
            x = draw(G, min(chunk, total - i), args.batch_size, dev)
            # an image with NaN/Inf pixels is never a digit (as common.generated_accuracy)
            bad = ~torch.isfinite(x).flatten(1).all(1)
            assigned.append(S.predict(x).masked_fill(bad, -1))
            judged.append(C.classify(env.evaluator, x).masked_fill(bad, -1))
        acc, share, pooled = dgr_accuracy(torch.cat(assigned), torch.cat(judged), seen, n,
                                          args.dgr_acc)
        t = len(results["A"])
        solver = solver_accuracy(S, env.test, env.tasks[:t + 1])
        results["share"].append([share[c] for c in seen])
        results["pooled_acc"].append(pooled)
        results["solver_acc_matrix"].append(solver + [None] * (len(env.tasks) - t - 1))
        results["A"].append(float(np.mean(solver)))
        print(f"[task {t + 1}/{len(env.tasks)}] share of generated images per class (%): "
              + " ".join(f"{c}:{share[c]:.1f}" for c in seen) + f"  | solver A_{t + 1} = "
              f"{np.mean(solver):.2f}% on real test images", flush=True)
        return acc
    return measure


def table2_metrics(G, S, env, args, classes, L):
    """Table 2's rows besides Acc for an unconditional generator (mergan_lsun's
    generated_set_metrics for a conditional one): --eval-samples x len(classes) images, each
    labelled by the solver. Rev acc: a fresh classifier trained on them with those labels,
    tested on the real test images of `classes`; FD: all of them against those images."""
    dev = env.device
    with torch.no_grad():
        x = draw(G, args.eval_samples * len(classes), args.batch_size, dev)
    width, steps = C.classifier_budget(args.dataset, len(x))
    model = C.train_classifier(x, S.predict(x), env.n_classes, dev, steps=steps, width=width,
                               seed=0)
    tx, ty = env.test.subset(classes)
    res = {"rev_acc": C.accuracy(model, tx, ty), "rev_acc_steps": steps,
           "fd_evaluator": L.FD.frechet_distance(L.FD.features(env.evaluator, x),
                                                 L.FD.features(env.evaluator, tx))}
    if args.inception_fid:
        inception = L.FD.inception_features(dev)
        res["fid_inception"] = L.FD.frechet_distance(inception(x), inception(tx))
    return res


def solver_sampler(G, S, batch, tries=20):
    """generate(z, y) for the sample grids, rows = the class the solver assigned: images of
    G (fresh noise, batches of `batch`) kept where the solver calls them y's class; blank
    (white) where `tries` batches held too few. The grid's fixed noise z gives only the
    count: an unconditional generator cannot be asked for a class."""
    @torch.no_grad()
    def generate(z, y):
        c, m, found = int(y[0]), len(y), []
        for _ in range(tries):
            x = draw(G, batch, batch, z.device)
            found.append(x[S.predict(x) == c])
            if sum(len(f) for f in found) >= m:
                break
        x = torch.cat(found)[:m]
        return torch.cat([x, torch.ones(m - len(x), *x.shape[1:], device=z.device)])
    return generate


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    R.suspect(args, parse_args(["--dataset", args.dataset]),  # named if training diverges
              ("lr", "lambda_gp", "solver_lr"))
    L = None  # Table 2's module (LSUN's data, ResNets, measures), loaded only when asked for
    if args.dataset == "lsun" or args.arch == "resnet" or args.final_metrics:
        import mergan_lsun as L
    env = R.setup(args, "dgr", load=L and L.load_dataset)  # device, seed, data, evaluator
    G, D = (L or M).mergan_networks(args.arch, env.channels, None, args.dim, env.image_size,
                                    critic_classes=None)  # unconditional; no class head
    G, D = G.to(env.device), D.to(env.device)
    S = Solver(env.channels, env.n_classes).to(env.device)
    results = {"share": [], "pooled_acc": [], "solver_acc_matrix": [], "A": []}
    default_protocol = args.classes is None and args.classes_per_task == 1

    # The continual-learning protocol: train task t, measure every class seen so far, save.
    run = R.TaskRun(args, env, "dgr", {"G": G, "D": D, "S": S},
                    generate=solver_sampler(G, S, args.batch_size), extra=results,
                    measure=make_measure(G, S, env, args, results))
    for t in run.remaining_tasks():  # with --resume: after the last checkpointed task
        train_task(t, G, D, S, env, args)  # G_{t-1}, S_{t-1} frozen inside; replay
        run.end_task(t)  # Acc via the solver's labels, shares, A_t, sample grid, checkpoint
    metrics = run.finish(paper=PAPER.get(args.dataset) if default_protocol else None)
    if metrics is None:
        return None
    if args.final_metrics:  # Table 2's Rev acc and FD rows, the solver naming each image
        lsun = default_protocol and args.dataset == "lsun"
        metrics = L.table2_report(run, PAPER_LSUN if lsun else None,
                                  final=table2_metrics(G, S, env, args, run.all_classes, L))
    header = (["after task"] + [f"share {c}" for c in run.all_classes]
              + ["pooled agreement", "solver A_t"])
    rows = [[t + 1] + results["share"][t] + [None] * (len(run.all_classes) - len(
        results["share"][t])) + [results["pooled_acc"][t], results["A"][t]]
            for t in range(len(env.tasks))]
    print(f"\ndgr: share (%) of {args.eval_samples} x (classes seen) generated images the "
          "solver assigns to each class; solver-evaluator agreement over all of them; the "
          "solver's accuracy on the real test images of the classes seen (A_t)")
    print(C.fmt_table(header, rows))
    return metrics


if __name__ == "__main__":
    R.cli(main)
