"""ATen operations per training iteration, counted on the CPU, as the CUDA path runs them:
about one kernel each (views, profiler marks and host scalars aside), the launches a GPU's
eager loop pays for and a CUDA graph replays, so the GPU's cost per iteration can be
predicted without a GPU. JTR, RA, the EWC baseline, DGM-w and DGM-a at task 1 and task 10.

Each count runs the scripts' own `train_task` (as benchmarks/gpu_speed.py does) under a
`TorchDispatchMode` that counts every ATen call, forward and backward; per iteration =
(count of k + 2 iterations - count of k) / 2, so the once-per-task costs cancel out. The
CPU and CUDA run the same ops, but for Adam: torch picks its multi-tensor (foreach) form
only for CUDA tensors, so the count builds that one (`cuda_adam`).

    python benchmarks/op_count.py                  # all, the table
    python benchmarks/op_count.py --only ra --top 15   # and the 15 most frequent ops
"""
import argparse
import collections
import contextlib
import io
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_speed import dgm_task, fake_env, mergan_task  # noqa: E402
import common as C  # noqa: E402  (gpu_speed put the project on the path)

NOT_KERNELS = ("_record_function_enter_new", "_record_function_exit",  # profiler marks
               "scalar_tensor")  # a Python number wrapped on the host for an op's argument


class OpCounter(TorchDispatchMode):
    """Counts ATen calls by name; those that launch no kernel on a GPU (views, NOT_KERNELS)
    are also counted apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.free = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.free += bool(func.is_view) or name in NOT_KERNELS
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_adam():
    """common.adam as torch builds it on CUDA: the multi-tensor (foreach) Adam, which it does
    not pick for CPU tensors (the few device-side kernels of `capturable` aside)."""
    adam = C.adam
    C.adam = lambda module, lr, betas: torch.optim.Adam(module.parameters(), lr=lr,
                                                         betas=betas, foreach=True)
    try:
        yield
    finally:
        C.adam = adam


def count(make, name, t, iters, env):
    with cuda_adam():
        run = make(name, t, iters, False, env)  # eager: a graph records exactly these calls
        with OpCounter() as counter, contextlib.redirect_stdout(io.StringIO()):
            run()
    return counter


def per_iteration(make, name, t, env, k=3):
    a, b = count(make, name, t, k, env), count(make, name, t, k + 2, env)
    ops = collections.Counter({n: (b.ops[n] - a.ops[n]) / 2 for n in b.ops})
    return +ops, (b.free - a.free) / 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="jtr,ra,ewc,dgmw,dgma",
                   help="comma-separated subset of jtr, ra, ewc, dgmw, dgma")
    p.add_argument("--tasks", default="1,10", help="tasks (1-10) to count at")
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent ops")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    header = ["step", "task", "ATen ops/it", "kernels/it"]
    env = fake_env(torch.device("cpu"), n_per_class=64)
    rows = []
    for what in args.only.split(","):
        make = ((lambda n, t, i, g, e, v=what[-1]: dgm_task(v, t, i, g, e))
                if what.startswith("dgm") else mergan_task)
        for t in [int(s) - 1 for s in args.tasks.split(",")]:
            ops, free = per_iteration(make, what, t, env)
            total = sum(ops.values())
            rows.append([what, t + 1, int(total), int(total - free)])
            print(C.fmt_table(header, rows[-1:]).splitlines()[-1], flush=True)
            if args.top:
                print("   " + ", ".join(f"{n} {c:g}" for n, c in ops.most_common(args.top)))
    print()
    print(C.fmt_table(header, rows))


if __name__ == "__main__":
    main()
