"""How far healthy runs go: the largest |value| of every loss in the progress lines of run
logs, and the largest |parameter| in their checkpoints. These set taskrun.LOSS_BOUND and
WEIGHT_BOUND (docs/core.md, "Divergence"), which must sit far above them.

    python benchmarks/healthy_bounds.py runs/table1-mnist           # a table's folder
    python benchmarks/healthy_bounds.py runs/*                      # any run folders

Reads every *.log and checkpoint.pt below the given folders (a run's own folder has no log:
pass the table folder or save the output of a run with `| tee run.log`).
"""
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import taskrun as R  # noqa: E402

LOSS = re.compile(r"\] it +\d+/\d+ +(.*?) +[\d.]+ it/s")


def main(folders):
    losses, weights = {}, {}  # name -> (largest |value|, where)
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith(".log"):
                    for line in open(path, errors="replace"):
                        m = LOSS.search(line)
                        for k, v in re.findall(r"(\w+) ([+-][\d.]+)", m.group(1) if m else ""):
                            if k != "s" and abs(float(v)) > losses.get(k, (0,))[0]:
                                losses[k] = (abs(float(v)), path)  # DGM's slope s: no loss
                                # (penalties, e.g. ewc_penalty, are listed but not bounded)
                elif f in ("checkpoint.pt", "source.pt"):  # few-shot: source, adapted Gs
                    ck = torch.load(path, map_location="cpu", weights_only=False)
                    models = dict(ck.get("models", {}), **{k: ck[k] for k in ("G", "D") if k
                                                             in ck})
                    models.update({f"G lambda {k}": sd for k, sd in ck.get("adapted",
                                                                           {}).items()})
                    for name, sd in models.items():
                        for kind in ("parameters", "BN running statistics"):
                            big = max((float(v.abs().max()) for k, v in sd.items()
                                       if torch.is_tensor(v) and v.is_floating_point()
                                       and v.numel() and ("running_" in k) == (kind[0] == "B")),
                                      default=0.0)
                            if big > weights.get((name, kind), (0,))[0]:
                                weights[(name, kind)] = (big, path)
    print(C.fmt_table(["loss", "largest |value|", "in"],
                      [[k, v, p] for k, (v, p) in sorted(losses.items(), key=lambda kv: kv[1])]))
    print(f"bound {R.LOSS_BOUND:g}\n")
    print(C.fmt_table(["model", "of its", "largest |value|", "in"],
                      [[*k, v, p] for k, (v, p) in sorted(weights.items(),
                                                          key=lambda kv: kv[1])]))
    print(f"bound {R.WEIGHT_BOUND:g} (on parameters only)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
