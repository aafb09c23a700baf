"""MeRGAN-JTR: Memory Replay GAN, joint training with replay — plus the SFT and JT baselines.

Paper: C. Wu, L. Herranz, X. Liu, Y. Wang, J. van de Weijer, B. Raducanu,
"Memory Replay GANs: learning to generate images from new categories without forgetting",
NeurIPS 2018 (arXiv:1809.02058), Sections 2-3. Docs: docs/mergan.md.

A conditional AC-GAN with a WGAN-GP loss learns one class per task. Before each task a
frozen copy of the generator, G_{t-1}, is kept; every real minibatch of the current class is
joined by one replayed minibatch covering all earlier classes (Eqs. 10-11), and critic,
classifier and generator are trained on that extended set.

    python mergan_jtr.py --dataset mnist                  # MeRGAN-JTR, Table 1
    python mergan_jtr.py --dataset mnist --mode sft       # sequential fine-tuning (Eqs. 7-8)
    python mergan_jtr.py --dataset mnist --mode jt        # joint training (upper bound)
    python mergan_jtr.py --dataset lsun --data-root LSUN   # Table 2: 64x64 ResNet nets, 4 scenes
    python mergan_jtr.py --dataset synth --classes 0,1,2 --iters 300 --dim 16 --eval-samples 320
    python benchmarks/step_speed.py                       # seconds per training iteration
    python benchmarks/table1.py --dataset mnist           # every Table 1 column + DGM at once
"""
import argparse
import copy

import torch
import torch.nn.functional as F

import common as C

# Table 1 of the paper: average accuracy (%) after 5 and 10 tasks, one digit per task.
PAPER = {("jtr", "mnist"): {5: 97.93, 10: 97.00}, ("jtr", "svhn"): {5: 80.90, 10: 66.50},
         ("sft", "mnist"): {5: 19.87, 10: 10.06}, ("sft", "svhn"): {5: 19.35, 10: 10.10},
         ("jt", "mnist"): {5: 97.66, 10: 96.92}, ("jt", "svhn"): {5: 85.30, 10: 84.82}}
# Table 2: LSUN bedroom -> kitchen -> church_outdoor -> tower, after task 4 (no JT column).
PAPER_LSUN = {"jtr": {"acc": 79.19, "rev_acc": 70.00, "fid": 49.69},
              "sft": {"acc": 15.02, "rev_acc": 28.0, "fid": 110.12}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, iters=None)
    p.add_argument("--mode", default="jtr", choices=["jtr", "sft", "jt"],
                   help="jtr: joint training with replay (MeRGAN, Eqs. 10-11); sft: "
                        "sequential fine-tuning (Eqs. 7-8); jt: joint training on the real "
                        "data of every class seen so far (the upper bound)")
    p.add_argument("--lambda-cls", type=float, default=1.0, help="weight of the AC "
                   "classification losses, Eqs. (3) and (6) (paper: 1)")
    p.add_argument("--lambda-gp", type=float, default=10.0, help="gradient-penalty weight "
                   "in Eq. (5) (paper: 10)")
    p.add_argument("--critic-iters", type=int, default=5, help="critic steps per generator "
                   "step (paper: 5)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, both nets "
                   "(paper: 1e-4, betas 0 and 0.9)")
    C.add_mergan_args(p)  # --arch, --dim, --final-metrics, --inception-fid
    C.add_cuda_graph_arg(p)  # --cuda-graphs (default) / --no-cuda-graphs
    args = p.parse_args(argv)
    C.resolve_mergan_defaults(args)  # --arch, --dim, --iters (4001 MNIST, 8001 SVHN, ...)
    return args


# ------------------------------------------------------------------------------------------
# Memory replay
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def replay_batch(G_prev, prev_classes, batch_size, nz, device):
    """One replayed minibatch covering all earlier classes, drawn from the frozen G_{t-1}:
    batch_size // n_prev samples per earlier class, as in the authors' code. Conditional
    BN uses per-class statistics, so this equals one single-class batch per class."""
    per = max(1, batch_size // len(prev_classes))
    # as_tensor: a label tensor already on the device is used as is (no copy per step)
    y = torch.as_tensor(prev_classes, device=device).repeat_interleave(per)
    return G_prev(torch.randn(len(y), nz, device=device), y), y


def training_batch(train, task, prev, prev_y, G_prev, mode, batch_size, nz):
    """S'_t (Eq. 10): a real batch of the current task, joined by one batch of earlier
    classes: replays from G_{t-1} (JTR), real images (JT), or nothing (SFT, Eqs. 7-8).
    prev: the earlier classes (a list); prev_y: the same as a tensor on the device."""
    x, y = train.batch(batch_size, task)
    if mode == "jtr" and prev:
        xr, yr = replay_batch(G_prev, prev_y, batch_size, nz, x.device)
    elif mode == "jt" and prev:
        xr, yr = train.batch(batch_size, prev)
    else:
        return x, y
    return torch.cat([x, xr]), torch.cat([y, yr])


# ------------------------------------------------------------------------------------------
# One training iteration: critic steps, then a generator step
# ------------------------------------------------------------------------------------------
def critic_step(G, D, opt_D, x, y, n_cur, args):
    """One critic/classifier update on the (extended) real batch x, y.

    The first n_cur rows of x are the current task's real images; the rest are replays
    (JTR) or earlier classes' real images (JT). Replays count as real data for the critic
    and the classifier; the gradient penalty uses the current task's rows only (authors)."""
    with torch.no_grad():  # the fake batch needs no graph in a critic step
        fake = G(torch.randn(len(y), G.nz, device=x.device), y)
    score, logits = D(torch.cat([x, fake]))        # one pass: the critic has no batch norm
    s_real, s_fake = score[:len(y)], score[len(y):]
    # The DCGAN critic writes its input gradient out (exact, cheaper than autograd's double
    # backward); the ResNet critic leaves it to autograd.
    gp = C.gradient_penalty(lambda v: D(v)[0], x[:n_cur], fake[:n_cur],
                            getattr(D, "input_gradient", None))
    loss_gan = s_fake.mean() - s_real.mean() + args.lambda_gp * gp  # Eq. (5): WGAN-GP critic
    loss_cls = F.cross_entropy(logits[:len(y)], y)                   # Eq. (6): AC on real data
    loss = loss_gan + args.lambda_cls * loss_cls
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss_gan.detach(), loss_cls.detach()


def generator_step(G, D, opt_G, y, args):
    """One generator update for labels y (current task + replayed classes)."""
    D.requires_grad_(False)  # no weight gradients for D in the generator step
    score, logits = D(G(torch.randn(len(y), G.nz, device=y.device), y))
    loss_gan = -score.mean()                      # Eq. (2): WGAN generator loss
    loss_cls = F.cross_entropy(logits, y)         # Eq. (3): AC loss on generated images
    loss = loss_gan + args.lambda_cls * loss_cls
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss_gan.detach(), loss_cls.detach()


def train_task(t, G, D, env, args):
    """Train task t. Adam's state is re-initialised at every task, as the authors do."""
    task, prev = env.tasks[t], [c for tk in env.tasks[:t] for c in tk]
    opt_G, opt_D = (C.adam(m, args.lr, (0.0, 0.9), env.device) for m in (G, D))  # paper
    # Eq. (10): the frozen replay generator G_{t-1}, a copy taken before task t starts.
    G_prev = copy.deepcopy(G).requires_grad_(False) if args.mode == "jtr" and prev else None
    prev_y = torch.tensor(prev, dtype=torch.long, device=env.device)  # once, not per step

    def iteration():  # one generator iteration: critic_iters critic steps, one G step
        for _ in range(args.critic_iters):
            x, y = training_batch(env.train, task, prev, prev_y, G_prev, args.mode,
                                  args.batch_size, G.nz)
            d_gan, d_cls = critic_step(G, D, opt_D, x, y, args.batch_size, args)
        g_gan, g_cls = generator_step(G, D, opt_G, y, args)
        return {"d_loss": d_gan, "d_cls": d_cls, "g_loss": g_gan, "g_cls": g_cls}

    # On CUDA the iteration is recorded once in a CUDA graph and replayed (--cuda-graphs);
    # otherwise `step()` is simply `iteration()`.
    step = C.GraphedStep(iteration, C.use_cuda_graphs(args, env.device))
    progress = C.Progress(args.iters, args.log_every, f"[task {t + 1}/{len(env.tasks)}] ")
    for it in range(args.iters):
        progress.update(it, step())


# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    env = C.setup(args, f"mergan_{args.mode}")
    G, D = C.mergan_networks(args.arch, env.channels, env.n_classes, args.dim,
                             env.image_size, critic_classes=env.n_classes)
    G, D = G.to(env.device), D.to(env.device)
    default_protocol = args.classes is None and args.classes_per_task == 1
    paper = PAPER.get((args.mode, args.dataset)) if default_protocol else None
    paper_final = PAPER_LSUN.get(args.mode) if default_protocol and args.dataset == "lsun" \
        else None
    return C.run_tasks(args, env, f"mergan-{args.mode}", {"G": G, "D": D},
                       lambda t: train_task(t, G, D, env, args), G, paper=paper,
                       paper_final=paper_final)


if __name__ == "__main__":
    C.cli(main)
