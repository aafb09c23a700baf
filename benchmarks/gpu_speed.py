"""Seconds per training iteration on a GPU, the eager loop beside the CUDA-graph loop, for
the MeRGAN family (JTR, RA, the sequential EWC baseline) and DGM; optionally the wall time
of one whole 10-task schedule.

Each number times the scripts' own `train_task` (the code a run executes), on random
images resident on the device, at the first task and at the last of 10 (where JTR replays
9 classes and DGM's classifier takes 10 steps per iteration). Per-iteration time =
(time of n1 + n iterations - time of n1 iterations) / n, so that the once-per-task costs
(optimisers, the frozen copy, the graph's warm-up and recording, DGM's replay set and
solver test) cancel out; they are reported apart as "per task". The eager loop is the one
a reader meets in the scripts (--no-cuda-graphs: the iteration not graphed).

Before a speed-up is reported, the two loops must agree: 8 iterations of each from the
same weights and seed, every iteration's losses as printed (4 decimals, --log-every 1),
each difference against a tolerance of 2e-4 + 1e-3 |loss| (two rounding steps of the
print, and cuDNN's own non-determinism, far below 1e-3 in 8 iterations); the worst ratio
to the tolerance is printed, and no speed-up where it exceeds 1.

    python benchmarks/gpu_speed.py                          # all, 300 timed iterations
    python benchmarks/gpu_speed.py --only ra --iters 1000
    python benchmarks/gpu_speed.py --schedule-dataset mnist --data-root DATA  # + 10-task RA
"""
import argparse
import contextlib
import copy
import io
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common as C
import dgm  # noqa: E402
import mergan_jtr  # noqa: E402
import mergan_nets as M  # noqa: E402
import mergan_ra  # noqa: E402
from dgm_speed import grow_to_task  # noqa: E402


def fake_env(device, n_per_class=640, seed=0):
    """Random 32x32 grey 'digits' of 10 classes, resident on the device, one per task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (10 * n_per_class, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(10).repeat(n_per_class)
    data = C.TaskData(x, y, device)
    return argparse.Namespace(tasks=[[c] for c in range(10)], train=data, test=data,
                              val=None, device=device, n_classes=10)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the progress line
        fn()
    sync(device)
    return time.perf_counter() - t0


def mergan_task(name, t, iters, graphs, env, log_every=1000000000):
    """A callable that runs the script's train_task for task t with `iters` iterations."""
    flags = ["--dataset", "mnist", "--iters", str(iters), "--log-every", str(log_every),
             "--cuda-graphs" if graphs else "--no-cuda-graphs"]
    torch.manual_seed(0)
    if name == "ra":
        args = mergan_ra.parse_args(flags)
        G, D = M.mergan_networks("dcgan", 1, 10, 32, 32,  # the AC head, as by default
                                 critic_classes=10 if args.ra_classifier else None)
        run = mergan_ra.train_task
    else:  # jtr, ewc (the EWC baseline is a mode of mergan_jtr.py)
        args = mergan_jtr.parse_args(["--mode", name] + flags
                                     + (["--fisher-samples", "2"] if name == "ewc" else []))
        G, D = M.mergan_networks("dcgan", 1, 10, 32, 32, critic_classes=10)
        ewc = mergan_jtr.EWCState(G).to(env.device)
        run = lambda t, G, D, env, args: mergan_jtr.train_task(t, G, D, env, args, ewc)
    G, D = G.to(env.device), D.to(env.device)
    return lambda: run(t, G, D, env, args)


def dgm_task(variant, t, iters, graphs, env, log_every=1000000000):
    flags = ["--dataset", "mnist", "--variant", variant, "--iters", str(iters),
             "--log-every", str(log_every), "--cuda-graphs" if graphs else "--no-cuda-graphs"]
    args = dgm.parse_args(flags)
    torch.manual_seed(0)
    G = dgm.DGMGenerator(variant, 1, 10, args.ngf, args.nz)
    grow_to_task(G, t, 0.3, args.s_max, torch.Generator().manual_seed(0))
    G = G.to(env.device)
    D = dgm.SolverD(1, 10, args.ndf).to(env.device)
    args.replay_size = 640  # replayed images per earlier class

    def run():
        G2 = copy.deepcopy(G)  # every call starts from the same network
        results = dgm.new_results()
        dgm.train_task(t, G2, D, env, args, dgm.make_generate(G2, env.tasks, 10, args.s_max,
                                                               env.device), results)
    return run


HEADER = ["step", "task", "loss diff / tol.", "eager ms/it", "graph ms/it", "speed-up",
          "eager s/task fixed", "graph s/task fixed"]


def losses(make, name, t, graphs, env, iters=8):
    """Every iteration's losses of `iters` iterations, as the progress line prints them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        make(name, t, iters, graphs, env, 1)()
    return [float(v) for line in out.getvalue().splitlines() if " it/s" in line
            for v in re.findall(r"[-+]\d+\.\d+(?= |$)", line.split(" it/s")[0])]


def disagreement(make, name, t, env):
    """The graphed loop's losses against the eager loop's: the worst ratio of a difference
    to its tolerance, 2e-4 + 1e-3 |loss| (<= 1: they agree)."""
    a, b = losses(make, name, t, False, env), losses(make, name, t, True, env)
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(u - v) / (2e-4 + 1e-3 * abs(u)) for u, v in zip(a, b))


def measure(make, name, t, n1, n, graphs, env):
    short = timed(make(name, t, n1, graphs, env), env.device)
    long = timed(make(name, t, n1 + n, graphs, env), env.device)
    per_it = (long - short) / n
    return per_it, short - n1 * per_it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (or cpu, for eager timings)")
    p.add_argument("--iters", type=int, default=300, help="timed iterations per number")
    p.add_argument("--warm-iters", type=int, default=20, help="n1: iterations of the short "
                   "run whose time is subtracted")
    p.add_argument("--only", default="jtr,ra,ewc,dgmw,dgma",
                   help="comma-separated subset of jtr, ra, ewc, dgmw, dgma")
    p.add_argument("--schedule-dataset", default=None, help="also time one whole 10-task "
                   "MeRGAN-RA run (paper iterations and 6,400 samples per class, "
                   "--cuda-graphs) on this dataset, e.g. mnist")
    p.add_argument("--data-root", default="./data", help="data root for --schedule-dataset")
    args = p.parse_args(argv)
    device = C.pick_device(args.device)
    env = fake_env(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.iters} timed "
          f"iterations per number (after {args.warm_iters})", flush=True)
    for graphs in ([False, True] if device.type == "cuda" else [False]):
        timed(mergan_task("jtr", 1, 5, graphs, env), device)  # libraries' start-up costs
    rows = []
    for what in args.only.split(","):
        make = ((lambda n, t, i, g, e, log=1000000000, v=what[-1]:
                 dgm_task(v, t, i, g, e, log)) if what.startswith("dgm") else mergan_task)
        for t in (0, 9):
            res = {}
            for graphs in ([False, True] if device.type == "cuda" else [False]):
                res[graphs] = measure(make, what, t, args.warm_iters, args.iters, graphs,
                                      env)
            eager, graph = res[False], res.get(True)
            diff = disagreement(make, what, t, env) if graph else None
            agree = diff is not None and diff <= 1
            rows.append([what, t + 1, diff, 1e3 * eager[0], 1e3 * graph[0] if graph else None,
                         eager[0] / graph[0] if agree else None, eager[1],
                         graph[1] if graph else None])
            if graph and not agree:
                print(f"{what} task {t + 1}: the graphed loop's losses differ from the eager "
                      f"loop's ({diff:.3g} x the tolerance): no speed-up reported", flush=True)
            print(C.fmt_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(C.fmt_table(HEADER, rows))
    if args.schedule_dataset:
        out = os.path.join("runs", f"gpu-speed-schedule-{int(time.time())}")
        cmd = [sys.executable, os.path.join(ROOT, "mergan_ra.py"), "--dataset",
               args.schedule_dataset, "--data-root", args.data_root, "--device",
               str(device), "--out", out, "--log-every", "1000", "--cuda-graphs"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"\nwhole 10-task MeRGAN-RA schedule on {args.schedule_dataset}: "
              f"{time.perf_counter() - t0:.0f} s wall (process start to end) -> {out}")


if __name__ == "__main__":
    main()
