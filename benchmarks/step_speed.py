"""Seconds per MeRGAN training iteration (1 generator + 5 critic steps, batch 64, 32x32,
the paper's digit networks): this project's step beside a plain, straightforward PyTorch
step of the same networks and losses. CPU by default; `--device cuda` on a GPU.

    python benchmarks/step_speed.py                # both, 10 timed iterations each
    python benchmarks/step_speed.py --iters 20 --threads 2
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C
import mergan_jtr  # noqa: E402
import mergan_nets as M  # noqa: E402


def plain_iteration(G, D, opt_G, opt_D, x, y, critic_iters=5, lambda_gp=10.0):
    """How a straightforward WGAN-GP AC-GAN step is usually written."""
    for _ in range(critic_iters):
        z = torch.randn(len(y), 128, device=x.device)
        fake = G(z, y)
        d_real, c_real = D(x)
        d_fake, _ = D(fake.detach())
        eps = torch.rand(len(x), 1, 1, 1, device=x.device)
        x_hat = (eps * x + (1 - eps) * fake.detach()).requires_grad_(True)
        grad = torch.autograd.grad(D(x_hat)[0].sum(), x_hat, create_graph=True)[0]
        gp = ((grad.view(len(x), -1).norm(2, dim=1) - 1) ** 2).mean()
        loss = d_fake.mean() - d_real.mean() + lambda_gp * gp + F.cross_entropy(c_real, y)
        opt_D.zero_grad()
        loss.backward()
        opt_D.step()
    z = torch.randn(len(y), 128, device=x.device)
    d_fake, c_fake = D(G(z, y))
    loss = -d_fake.mean() + F.cross_entropy(c_fake, y)
    opt_G.zero_grad()
    loss.backward()
    opt_G.step()


def time_it(step, iters, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per round")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = C.pick_device(a.device)
    args = mergan_jtr.parse_args(["--device", str(dev)])
    steps = {}
    for name in ("plain", "ours"):
        torch.manual_seed(0)
        # the same networks and optimisers; only the iteration differs
        G, D = M.Generator().to(dev), M.Critic().to(dev)
        opt_G, opt_D = (C.adam(m, 1e-4, (0.0, 0.9)) for m in (G, D))
        x = torch.rand(64, 1, 32, 32, device=dev) * 2 - 1
        y = torch.zeros(64, dtype=torch.long, device=dev)
        if name == "plain":
            steps[name] = (lambda G=G, D=D, oG=opt_G, oD=opt_D, x=x, y=y:
                           plain_iteration(G, D, oG, oD, x, y))
        else:
            def step(G=G, D=D, opt_G=opt_G, opt_D=opt_D, x=x, y=y):
                k, n = args.critic_iters, len(y)
                with torch.no_grad():  # the critic steps' fakes in one call, as the scripts
                    fakes = M.draw_batches(G, torch.randn(k * n, G.nz, device=dev),
                                           y.repeat(k), n)
                for fake in fakes.split(n):
                    mergan_jtr.critic_step(D, opt_D, x, y, fake, n, args)
                mergan_jtr.generator_step(G, D, opt_G, y, args)
            steps[name] = step
        time_it(steps[name], a.warmup, dev)
    # Interleaved rounds, so that a slow phase of the machine hits both variants alike;
    # the median round of each is reported.
    times = {name: [] for name in steps}
    for r in range(a.rounds):
        for name, step in steps.items():
            times[name].append(time_it(step, a.iters, dev))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in steps:
        print(f"{name:>5}: {med[name]:.4f} s/iteration  {1 / med[name]:6.2f} it/s "
              f"(median of {a.rounds} rounds of {a.iters}; {dev}, "
              f"{torch.get_num_threads()} threads)", flush=True)
    print(f"ours / plain = {med['ours'] / med['plain']:.2f}")


if __name__ == "__main__":
    main()
