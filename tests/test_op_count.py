"""The kernel budget per training iteration (benchmarks/op_count.py): counted on the CPU
along the CUDA path, so that a change that adds launches to the GPU's iteration shows here,
without a GPU."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import op_count  # noqa: E402


def test_counter_counts_kernels_apart_from_views():
    with op_count.OpCounter() as c:
        x = torch.ones(4)   # 1 kernel
        v = x.view(2, 2)     # a view: no kernel
        (v * 2).sum()        # 2 kernels
    assert sum(c.ops.values()) == 4 and c.free == 1


def test_mergan_iterations_stay_within_their_kernel_budget():
    # RA at task 1 and JTR at task 10 measured 993 and 1,079 kernels per iteration, with
    # only the fast paths that pay (docs/core.md, "What each fast path pays"); a change that
    # adds launches beyond these budgets (about 6% above) shows here.
    torch.manual_seed(0)
    env = op_count.fake_env(torch.device("cpu"), n_per_class=64)
    for name, t, budget in (("ra", 0, 1050), ("jtr", 9, 1150)):
        ops, free = op_count.per_iteration(op_count.mergan_task, name, t, env)
        kernels = sum(ops.values()) - free
        print(f"{name} task {t + 1}: {kernels:g} kernels per iteration")
        assert 0 < kernels <= budget, (name, kernels, ops.most_common(12))
