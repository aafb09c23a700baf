"""Seconds per DGM training iteration, masked (DGM) beside unmasked (the same grown network,
no masks, no sparsity term, no gradient protection or compensation), at task 1 and at task
10 of the authors' MNIST configuration (batch 64, 32x32, ngf 6 for DGM-w, 20 for DGM-a,
ndf 32). An iteration is what dgm.train_task runs: t+1 classifier steps (real + one replayed
batch per earlier task), one WGAN-GP critic step, one generator step.

Task 10 is reached by opening 9 tasks whose masks reserve a share `--reserve` of the free
weights (random embeddings) and growing the network after each, as dgm.py does; the replay
set is random images. Only speed is measured here, nothing is learned.

    python benchmarks/dgm_speed.py                    # DGM-w and DGM-a, CPU
    python benchmarks/dgm_speed.py --variant a --iters 20 --threads 2
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import dgm  # noqa: E402


def grow_to_task(G, n_tasks, reserve, s_max, gen):
    """Open and close n_tasks tasks whose binarised masks cover ~`reserve` of each layer."""
    for _ in range(n_tasks):
        t = G.add_task()
        for l in range(len(G.widths)):
            e = G.emb[l][t]
            e.data.copy_(torch.where(torch.rand(e.shape, generator=gen) < reserve, 1.0, -1.0))
        G.end_task(t, s_max)


def time_steps(G, D, t, args, masked, n, device):
    cfg = dgm.parse_args(["--dataset", "mnist", "--variant", G.variant])
    opt_G, opt_D = dgm.adam(G, cfg.lr), dgm.adam(D, cfg.lr)
    seen = torch.arange(t + 1, device=device)
    lookup = torch.arange(10, device=device)
    replay = None
    if t > 0:
        x = torch.randint(0, 256, (64 * t, 1, 32, 32), dtype=torch.uint8)
        y = torch.arange(t).repeat_interleave(64)
        replay = (C.TaskData(x, y, device), list(range(t)))
    x = torch.rand(args.batch, 1, 32, 32, device=device) * 2 - 1
    y = torch.full((args.batch,), t, dtype=torch.long, device=device)
    s = torch.tensor(cfg.s_max / 2, dtype=torch.float64, device=device)
    task = dgm.TaskSetup(t, seen, lookup, replay, lam=cfg.lambda_ru, s=s, s_ep=s)

    def step():
        return dgm.train_step(G, D, opt_G, opt_D, task, x, y, cfg, masked=masked)
    for _ in range(3):   # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        out = step()
    float(out["d_loss"])  # wait for the device
    return (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="both", choices=["w", "a", "both"],
                   help="which DGM variant to time")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--batch", type=int, default=64, help="minibatch size (authors: 64)")
    p.add_argument("--reserve", type=float, default=0.3,
                   help="share of each layer a simulated task reserves")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.iters} timed iterations")
    rows = []
    for variant in (["w", "a"] if args.variant == "both" else [args.variant]):
        cfg = dgm.parse_args(["--dataset", "mnist", "--variant", variant])
        for task in (1, 10):
            torch.manual_seed(0)
            gen = torch.Generator().manual_seed(0)
            G = dgm.DGMGenerator(variant, 1, 10, cfg.ngf, cfg.nz)
            grow_to_task(G, task - 1, args.reserve, cfg.s_max, gen)
            G.add_task()
            G, D = G.to(device), dgm.SolverD(1, 10, cfg.ndf).to(device)
            times = {}
            for masked in (True, False, True, False):  # interleaved, best of two
                s = time_steps(G, D, task - 1, args, masked, args.iters, device)
                times[masked] = min(times.get(masked, s), s)
            rows.append([f"DGM-{variant}", task, str(G.widths), times[True], 1 / times[True],
                         times[False], times[True] / times[False]])
    print(C.fmt_table(["variant", "task", "G channels", "masked s/it", "masked it/s",
                       "unmasked s/it", "masked/unmasked"], rows))


if __name__ == "__main__":
    main()
