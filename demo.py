"""Forgetting and its cure in a few CPU minutes: sequential fine-tuning (SFT) beside
MeRGAN replay alignment (RA) on the offline `synth` digits, two tasks (class 0, then 1).

    python demo.py                 # SFT and RA, about 5 minutes on 2 CPU cores
    python demo.py --with-jtr      # adds MeRGAN-JTR (about 2.5 minutes more)
    python demo.py --with-dgr      # adds DGR, deep generative replay (about 2 minutes more)

After task 2, SFT's generator has forgotten class 0 (its "0"s now look like "1"s to the
evaluator), while RA still draws it. This is a teaching budget, not the paper's: 200
generator iterations per task instead of 4001, width 16 instead of 32, Adam lr 1e-3 instead
of 1e-4 (so that a GAN learns a digit in 200 steps), 320 evaluation samples per class.
"""
import argparse
import os

import common as C
import dgr
import mergan_jtr
import mergan_ra
import taskrun as R


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for the runs' outputs")
    p.add_argument("--data-root", default="./data", help="where the evaluator is cached")
    p.add_argument("--seed", type=C.seed, default=0, help="seed of every run")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--with-jtr", action="store_true", help="also run MeRGAN-JTR")
    p.add_argument("--with-dgr", action="store_true", help="also run DGR (an unconditional "
                   "generator and a solver, dgr.py)")
    a = p.parse_args(argv)
    common = ["--dataset", "synth", "--classes", "0,1", "--iters", "200", "--dim", "16",
              "--lr", "1e-3", "--eval-samples", "320", "--log-every", "50",
              "--seed", str(a.seed), "--device", a.device, "--data-root", a.data_root]
    runs = [("SFT", mergan_jtr.main, ["--mode", "sft"]), ("RA", mergan_ra.main, [])]
    if a.with_jtr:
        runs.append(("JTR", mergan_jtr.main, ["--mode", "jtr"]))
    if a.with_dgr:
        runs.append(("DGR", dgr.main, []))
    results = {}
    for name, main_fn, extra in runs:
        out = os.path.join(a.out, f"{name.lower()}-s{a.seed}")
        print(f"\n=== {name} -> {out}", flush=True)
        resume = ["--resume"] if os.path.exists(os.path.join(out, R.CHECKPOINT)) else []
        results[name] = main_fn(common + extra + ["--out", out] + resume)
    rows = [[name, m["acc_matrix"][0][0], m["acc_matrix"][1][0], m["acc_matrix"][1][1],
             m["avg_acc"][1]] for name, m in results.items()]
    print("\nGenerated-sample accuracy (%) of class 0 after task 1 and after task 2:")
    print(C.fmt_table(["method", "0 after t1", "0 after t2", "1 after t2", "avg after t2"],
                      rows))


if __name__ == "__main__":
    R.cli(main)
