"""How far do an old task's images move while DGM learns new tasks?

DGM's masks reserve, at the end of each task, the weights (DGM-w) or units (DGM-a) whose
mask at s_max is >= 0.5, and later tasks never change them. Entries still undecided at the
end of a task (mask between 1e-3 and 0.5) are not reserved, yet they count a little in the
old task's images, so later tasks can move those images slightly (the authors' rule). This
script measures it: train the first task, draw its images for fixed noise, train the other
tasks, draw again, and report the pixel change and the evaluator's accuracy on both sets.

    python benchmarks/dgm_drift.py                          # DGM-w, synth, classes 0,1,2
    python benchmarks/dgm_drift.py --variant a --iters 300 --samples 512
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import dgm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="w", choices=["w", "a"], help="DGM-w or DGM-a")
    p.add_argument("--tasks", type=int, default=3, help="classes 0..tasks-1 of synth, one "
                   "per task; the first one is watched")
    p.add_argument("--iters", type=int, default=300, help="iterations per task")
    p.add_argument("--samples", type=int, default=512, help="images of the first class drawn "
                   "for the same fixed noise after each task")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--data-root", default="./data", help="where the synth evaluator is cached")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    args = dgm.parse_args(["--dataset", "synth", "--variant", a.variant, "--iters",
                           str(a.iters), "--log-every", str(10 ** 9), "--seed", str(a.seed),
                           "--val-split", "0"])
    dev = torch.device("cpu")
    x, y, _ = C.load_dataset("synth", train=True)
    tx, ty, _ = C.load_dataset("synth", train=False)
    train, test = C.TaskData(x, y, dev), C.TaskData(tx, ty, dev)
    evaluator, _ = C.get_evaluator(argparse.Namespace(dataset="synth", data_root=a.data_root),
                                   train, test, 10, dev)
    tasks = [[c] for c in range(a.tasks)]
    env = argparse.Namespace(device=dev, train=train, test=test, val=None, tasks=tasks,
                             n_classes=10, channels=1, image_size=32)
    C.seed_everything(a.seed)
    G = dgm.DGMGenerator(a.variant, 1, 10, args.ngf, args.nz)
    D = dgm.SolverD(1, 10, args.ndf)
    generate = dgm.make_generate(G, tasks, 10, args.s_max, dev)
    results = dgm.new_results()
    z = torch.randn(a.samples, G.nz, generator=torch.Generator().manual_seed(1))
    label = torch.zeros(a.samples, dtype=torch.long)

    dgm.train_task(0, G, D, env, args, generate, results)
    masks = [G.mask(l, 0, args.s_max) for l in range(len(G.widths))]
    undecided = sum(int(((m > 1e-3) & (m < 0.5)).sum()) for m in masks)
    print(f"task 1: {undecided} of {sum(m.numel() for m in masks)} mask entries undecided "
          f"(1e-3 < mask at s_max < 0.5: used a little, not reserved)")
    before = generate(z, label)
    acc0 = 100 * (C.classify(evaluator, before) == 0).float().mean().item()
    for t in range(1, a.tasks):
        dgm.train_task(t, G, D, env, args, generate, results)
        now = generate(z, label)
        diff = (now - before).abs()
        acc = 100 * (C.classify(evaluator, now) == 0).float().mean().item()
        print(f"after task {t + 1}: class 0's images moved by {diff.mean():.5f} on average, "
              f"{diff.max():.4f} at most ([-1, 1] scale); the evaluator recognises "
              f"{acc0:.1f}% -> {acc:.1f}% of them", flush=True)


if __name__ == "__main__":
    main()
