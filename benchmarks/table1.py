"""MeRGAN's Table 1 and DGM's A5/A10 in one command, on one protocol.

Runs every column of MeRGAN's Table 1 -- JT, SFT, EWC, MeRGAN-JTR, MeRGAN-RA -- and DGM-w /
DGM-a (DGM's Table) as separate runs of this repository's scripts, on the same dataset, task
order, seed, evaluator and number of generated samples; then writes one Markdown table with
our numbers beside the papers' and a picture of each run's accuracy matrix.

On a GPU the runs go at once (`--jobs`, default: all of them): each digit-GAN run keeps the
GPU only partly busy (small kernels, CUDA graphs), so independent processes overlap well.
On the CPU they run one after the other. Each run is an ordinary run folder under --out;
calling the command again skips finished runs and resumes interrupted ones (`--resume`).

    python benchmarks/table1.py --dataset mnist                 # Table 1 + DGM, paper budgets
    python benchmarks/table1.py --dataset svhn --columns jtr,ra
    python benchmarks/table1.py --dataset synth --classes 0,1 --iters 3 --dgm-iters 3 \\
        --eval-samples 10 --mergan-args "--dim 8" --ewc-args "--fisher-samples 4"  # seconds

Outputs in --out: one folder per column (the script's own run folder: metrics.json,
samples, checkpoint) and its log, `acc_matrix_<column>.png` (DGM also
`solver_matrix_<column>.png`), `table1.md`, `table1.json`.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402

# column -> (label, script, its own flags). JT here is the repository's --mode jt: joint
# training on the real data of every class seen so far, task by task (docs/mergan.md). The
# paper's JT is one run on all classes at once, so the two JT numbers are not the same
# experiment; the table says so.
COLUMNS = {
    "jt": ("JT (ours: cumulative)", "mergan_jtr.py", ["--mode", "jt"]),
    "sft": ("SFT", "mergan_jtr.py", ["--mode", "sft"]),
    "ewc": ("EWC", "mergan_jtr.py", ["--mode", "ewc"]),
    "jtr": ("MeRGAN-JTR", "mergan_jtr.py", []),
    "ra": ("MeRGAN-RA", "mergan_ra.py", []),
    # DGM's authors resize 28px digits to 32 (dgm.py's default); here DGM gets MeRGAN's
    # padded digits, so that every column sees the same images and the same evaluator
    # (--dgm-args "--to-32px resize" gives DGM its own). DGM still holds out its
    # validation split (--val-split) for the authors' model selection.
    "dgmw": ("DGM-w", "dgm.py", ["--to-32px", "pad"]),
    "dgma": ("DGM-a", "dgm.py", ["--variant", "a", "--to-32px", "pad"]),
}
DGM = ("dgmw", "dgma")
# MeRGAN Table 1 (Wu et al. 2018): average accuracy (%) after 5 and 10 one-digit tasks.
# DGM's paper reports A5/A10 on MNIST and SVHN too, but those values could not be checked
# against the paper's text for this repository, so none are printed (docs/dgm.md).
PAPER = {
    "mnist": {"jt": {5: 97.66, 10: 96.92}, "sft": {5: 19.87, 10: 10.06},
              "ewc": {5: 70.62, 10: 77.03}, "jtr": {5: 97.93, 10: 97.00},
              "ra": {5: 98.19, 10: 97.01}},
    "svhn": {"jt": {5: 85.30, 10: 84.82}, "sft": {5: 19.35, 10: 10.10},
             "ewc": {5: 39.84, 10: 33.02}, "jtr": {5: 80.90, 10: 66.50},
             "ra": {5: 76.05, 10: 66.78}},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="dataset of every run (Table 1: mnist "
                   "or svhn)")
    p.add_argument("--data-root", default="./data", help="where the dataset is read from")
    p.add_argument("--no-download", action="store_true", help="never try the network")
    p.add_argument("--out", default=None, help="folder of the whole table (default "
                   "runs/table1-<dataset>-s<seed>); an existing one is resumed")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--columns", default=",".join(COLUMNS),
                   help=f"comma-separated columns to run, of {', '.join(COLUMNS)}")
    p.add_argument("--jobs", type=int, default=None, help="runs at the same time (default: "
                   "every column at once on CUDA, one at a time on the CPU)")
    p.add_argument("--classes", default=None, help="classes in task order, e.g. 0,1,2 "
                   "(default: all, one per task: the papers' protocol)")
    p.add_argument("--iters", type=int, default=None, help="generator iterations per task "
                   "of the MeRGAN-family runs (default: the authors', 4001 MNIST, 8001 SVHN)")
    p.add_argument("--dgm-iters", type=int, default=None, help="iterations per task of the "
                   "DGM runs (default: the authors' epochs per task)")
    p.add_argument("--eval-samples", type=int, default=6400, help="generated images per "
                   "class for Acc (paper: 6400)")
    p.add_argument("--mergan-args", default="", help="extra flags for JT, SFT, EWC, JTR and "
                   "RA, ones all three scripts take, e.g. \"--dim 16 --lr 1e-3\"")
    p.add_argument("--ewc-args", default="", help="extra flags for the EWC run only, e.g. "
                   "\"--fisher-samples 200\"")
    p.add_argument("--dgm-args", default="", help="extra flags for DGM-w and DGM-a")
    p.add_argument("--status-every", type=float, default=30.0,
                   help="seconds between status lines while runs are going")
    args = p.parse_args(argv)
    args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = [c for c in args.columns if c not in COLUMNS]
    if unknown or not args.columns:
        raise C.UserError(f"--columns: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(COLUMNS)}")
    if args.out is None:
        args.out = os.path.join("runs", f"table1-{args.dataset}-s{args.seed}")
    # absolute, so that the runs (started from any folder) and this process agree
    args.out, args.data_root = os.path.abspath(args.out), os.path.abspath(args.data_root)
    return args


# ------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------
def run_command(args, col, resume):
    """The command line of one column's run (its run folder is <out>/<col>)."""
    _, script, own = COLUMNS[col]
    cmd = [sys.executable, os.path.join(ROOT, script), *own, "--dataset", args.dataset,
           "--data-root", args.data_root, "--seed", str(args.seed), "--device", args.device,
           "--eval-samples", str(args.eval_samples), "--out", os.path.join(args.out, col)]
    if args.no_download:
        cmd.append("--no-download")
    if args.classes is not None:
        cmd += ["--classes", args.classes]
    iters = args.dgm_iters if col in DGM else args.iters
    if iters is not None:
        cmd += ["--iters", str(iters)]
    cmd += shlex.split(args.dgm_args if col in DGM else args.mergan_args)
    if col == "ewc":
        cmd += shlex.split(args.ewc_args)
    return cmd + (["--resume"] if resume else [])


def read_metrics(folder):
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def state(folder):
    """'done' (every task finished), 'resume' (a checkpoint to continue) or 'new'."""
    m = read_metrics(folder)
    if m and m.get("tasks_done") == len(m.get("tasks", [])) and "avg_acc" in m:
        return "done"
    if os.path.exists(os.path.join(folder, C.CHECKPOINT)):
        return "resume"
    return "new"


# The settings that define the experiment: a table folder is only ever continued with these
# unchanged (--columns, --jobs, --device and --status-every may change between calls).
EXPERIMENT = ("dataset", "data_root", "seed", "classes", "iters", "dgm_iters", "eval_samples",
              "mergan_args", "ewc_args", "dgm_args")


def check_settings(args):
    """Write <out>/table1-args.json on the first call; later calls must match it, so that a
    finished run of another budget is never reported as this table's."""
    path = os.path.join(args.out, "table1-args.json")
    mine = {k: getattr(args, k) for k in EXPERIMENT}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [f"{k} {old.get(k)!r} -> {mine[k]!r}" for k in EXPERIMENT
                   if old.get(k) != mine[k]]
        if changed:
            raise C.UserError(f"{args.out} holds a table made with other settings "
                              f"({'; '.join(changed)}); choose another --out")
    else:
        C.save_json(path, mine)


def prepare_evaluator(args):
    """Train (or load) the dataset's evaluator once, before the runs start, so that parallel
    runs all load the same cached model instead of training it side by side."""
    log = os.path.join(args.out, "evaluator.log")
    cmd = [sys.executable, os.path.join(ROOT, "common.py"), "--dataset", args.dataset,
           "--data-root", args.data_root, "--device", args.device, "--out", args.out]
    if args.no_download:
        cmd.append("--no-download")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    text = open(log).read().strip().splitlines()
    if rc != 0:
        raise C.UserError(f"the evaluator could not be prepared: {text[-1] if text else rc}")
    print(next((line for line in reversed(text) if "real test accuracy" in line), text[-1]),
          flush=True)


def progress_of(args, col):
    """'col k/T tasks, it i/n' from the run's metrics.json and its last progress line."""
    m = read_metrics(os.path.join(args.out, col))
    text = ""
    try:
        with open(os.path.join(args.out, f"{col}.log"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 600))
            text = f.read().decode(errors="replace")
    except OSError:
        pass
    its = re.findall(r"\] it +(\d+/\d+)", text)
    done = f"{m['tasks_done']}/{len(m['tasks'])} tasks" if m else "0 tasks"
    return f"{col} {done}" + (f", it {its[-1]}" if its else "")


def run_all(args, jobs):
    """Run the columns' scripts, at most `jobs` at a time. Returns {column: exit status}."""
    todo = []
    for col in args.columns:
        st = state(os.path.join(args.out, col))
        print(f"{col:5s} {COLUMNS[col][0]:22s} {st}", flush=True)
        if st != "done":
            todo.append((col, st == "resume"))
    running, status, t_print = {}, {}, time.time()
    try:
        loop(args, jobs, todo, running, status, t_print)
    finally:  # this process stopped early (Ctrl-C, an error): stop its runs too
        for col, (proc, log, _) in running.items():
            if proc.poll() is None:
                proc.terminate()
        for col, (proc, log, _) in running.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return status


def loop(args, jobs, todo, running, status, t_print):
    """Start runs while fewer than `jobs` go, collect the finished ones, print status."""
    while todo or running:
        while todo and len(running) < jobs:
            col, resume = todo.pop(0)
            cmd = run_command(args, col, resume)
            log = open(os.path.join(args.out, f"{col}.log"), "a")
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            running[col] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                            log, time.time())
        time.sleep(0.5)
        for col, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[col]
            status[col] = proc.returncode
            if proc.returncode == 0:
                print(f"{col} finished ({time.time() - t0:.0f}s)", flush=True)
            else:
                tail = open(os.path.join(args.out, f"{col}.log")).read().strip()
                tail = tail.splitlines()[-1] if tail else ""
                print(f"{col} FAILED (exit {proc.returncode}): {tail}  -> see "
                      f"{os.path.join(args.out, col + '.log')}", flush=True)
        if running and time.time() - t_print >= args.status_every:
            t_print = time.time()
            print("[table1] " + " | ".join(progress_of(args, c) for c in running), flush=True)


# ------------------------------------------------------------------------------------------
# Report: accuracy-matrix pictures and the Markdown table
# ------------------------------------------------------------------------------------------
def colour(v):
    """0..100 -> an RGB triple on a dark-blue -> teal -> yellow ramp (viridis-like)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                      [253, 231, 37]], dtype=float)
    x = min(max(v / 100.0, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return tuple(int(c) for c in stops[i] + (x - i) * (stops[i + 1] - stops[i]))


def draw_matrix(R, row_names, col_names, title, path, cell=44):
    """A heatmap PNG of R[t][i] (%; None = not yet seen, drawn grey) with the values
    written in the cells: rows = after task t, columns = task i."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    T, left, top = len(R), 70, 60
    width = max(left + cell * len(col_names) + 10, 12 + int(font.getlength(title)))
    img = Image.new("RGB", (width, top + cell * T + 26), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 4), title, fill="black", font=font)
    d.text((left, 24), "task (classes)", fill="black", font=small)
    for j, name in enumerate(col_names):
        d.text((left + j * cell + cell // 2, top - 2), name, fill="black", font=small,
               anchor="mb")
    for t, row in enumerate(R):
        y0 = top + t * cell
        d.text((left - 6, y0 + cell // 2), row_names[t], fill="black", font=small, anchor="rm")
        for j, v in enumerate(row):
            x0 = left + j * cell
            fill = (225, 225, 225) if v is None else colour(v)
            d.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=fill)
            if v is not None:
                ink = "black" if v > 60 else "white"
                d.text((x0 + cell // 2 - 1, y0 + cell // 2 - 1), f"{v:.0f}", fill=ink,
                       font=font, anchor="mm")
    d.text((6, top + cell * T + 6), "rows: after task t; grey: not yet seen", fill="black",
           font=small)
    img.save(path)


def fmt(v):
    return "—" if v is None else f"{v:.2f}"


def report(args, results, device_name):
    """table1.md / table1.json from the finished runs' metrics.json; returns the Markdown."""
    cols = [c for c in args.columns if c in results]
    any_m = next(iter(results.values()))
    T, paper = len(any_m["tasks"]), PAPER.get(args.dataset, {})
    default_protocol = args.classes is None and all(len(t) == 1 for t in any_m["tasks"])
    marks = sorted({t for t in (5, 10) if t <= T} | {T})
    names = [",".join(map(str, task)) for task in any_m["tasks"]]
    lines = [f"## Table 1 on `{args.dataset}`: tasks {names}, seed {args.seed}",
             "",
             f"Device: {device_name}. Acc = MeRGAN's metric: the evaluator classifier "
             f"(real test accuracy {any_m['evaluator_test_acc']:.2f}%) labels "
             f"{any_m['args']['eval_samples']} generated images of every class seen; the "
             "mean of the per-task accuracies. A_t = DGM's metric: the accuracy of the DGM "
             "discriminator's classifier head on the real test images of the classes seen "
             "(A5, A10 in the DGM paper). Paper values inline only where the dataset and "
             "the tasks are the paper's (mnist/svhn, classes 0..9, one per task); they "
             "were obtained with the authors' budgets (4001/8001 iterations per task).",
             "",
             "| | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for t in marks:
        lines.append(f"| Acc after {t} tasks, ours | "
                     + " | ".join(fmt(results[c]["avg_acc"][t - 1]) for c in cols) + " |")
        if default_protocol and t in (5, 10) and paper:
            # never the paper's JT beside ours: not the same experiment (see the note below)
            lines.append(f"| Acc after {t} tasks, paper | "
                         + " | ".join("" if c == "jt" else fmt(paper.get(c, {}).get(t))
                                      for c in cols) + " |")
    if any(c in DGM for c in cols):
        for t in marks:
            lines.append(f"| A_{t} (DGM solver, real test data), ours | "
                         + " | ".join(fmt(results[c]["A"][t - 1]) if c in DGM else ""
                                      for c in cols) + " |")
    lines.append("| forgetting (avg, points) | "
                 + " | ".join(fmt(results[c]["avg_forgetting"]) for c in cols) + " |")
    lines.append("| iterations per task | "
                 + " | ".join(str(results[c]["args"].get("iters")
                                  or f"{results[c]['args'].get('epochs')} epochs")
                              for c in cols) + " |")
    lines.append("| training + evaluation time (s) | "
                 + " | ".join(f"{results[c]['seconds']:.0f}" for c in cols) + " |")
    ref = [c for c in cols if c in PAPER["mnist"]]
    if ref:  # the papers' numbers, always, for reference (inline above only when comparable)
        lines += ["", "For reference, MeRGAN's Table 1 (10 one-digit tasks, the full datasets, "
                  "the authors' budgets; their JT is one joint run):", "",
                  "| paper | " + " | ".join("JT (all classes at once)" if c == "jt" else
                                            COLUMNS[c][0].split(" (")[0] for c in ref) + " |",
                  "|---|" + "---|" * len(ref)]
        for ds in ("mnist", "svhn"):
            for t in (5, 10):
                lines.append(f"| {ds.upper()}, Acc after {t} tasks | "
                             + " | ".join(fmt(PAPER[ds][c][t]) for c in ref) + " |")
    lines += ["", "JT (ours: cumulative) trains task by task on the real data of every class "
              "seen so far; the paper's JT is one run on all classes at once: the two are "
              "not the same experiment. DGM's paper values for MNIST/SVHN are not printed: "
              "they could not be checked against the paper's text here. Accuracy matrices: "
              + ", ".join(f"`acc_matrix_{c}.png`" for c in cols) + "."]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table1.md"), "w") as f:
        f.write(md)
    C.save_json(os.path.join(args.out, "table1.json"), {
        "dataset": args.dataset, "seed": args.seed, "device": device_name,
        "tasks": any_m["tasks"], "evaluator_test_acc": any_m["evaluator_test_acc"],
        "columns": {c: {"label": COLUMNS[c][0], "avg_acc": results[c]["avg_acc"],
                        "acc_matrix": results[c]["acc_matrix"],
                        "A": results[c].get("A"), "seconds": results[c]["seconds"],
                        "paper": paper.get(c) if default_protocol and c != "jt" else None}
                    for c in cols}})
    for c in cols:
        m = results[c]
        rows = [f"after {t + 1}" for t in range(T)]
        draw_matrix(m["acc_matrix"], rows, names, f"{COLUMNS[c][0]}: Acc (%) of generated "
                    f"images, {args.dataset}", os.path.join(args.out, f"acc_matrix_{c}.png"))
        if c in DGM:
            draw_matrix(m["solver_acc_matrix"], rows, names, f"{COLUMNS[c][0]}: solver "
                        f"accuracy (%) on real test data", os.path.join(
                            args.out, f"solver_matrix_{c}.png"))
    return md


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    jobs = args.jobs or (len(args.columns) if device.type == "cuda" else 1)
    if jobs < 1:
        raise C.UserError("--jobs must be at least 1")
    args.device = device.type
    device_name = (f"cuda ({__import__('torch').cuda.get_device_name(0)})"
                   if device.type == "cuda" else "cpu")
    os.makedirs(args.out, exist_ok=True)
    check_settings(args)
    print(f"table1: {len(args.columns)} runs in {args.out}, {jobs} at a time on {device_name}",
          flush=True)
    t0 = time.time()
    prepare_evaluator(args)
    status = run_all(args, jobs)
    results = {c: read_metrics(os.path.join(args.out, c)) for c in args.columns}
    results = {c: m for c, m in results.items()
               if m and state(os.path.join(args.out, c)) == "done"}
    failed = [c for c, rc in status.items() if rc != 0]
    unfinished = [c for c in args.columns if c not in results and c not in failed]
    if unfinished:
        print(f"table1: not finished, left out of the table: {', '.join(unfinished)} "
              "(the same command continues them)", flush=True)
    if results:
        md = report(args, results, device_name)
        print("\n" + md, flush=True)
    print(f"table1: wall time {time.time() - t0:.0f}s -> {os.path.join(args.out, 'table1.md')}",
          flush=True)
    if failed:
        raise C.UserError(f"runs failed: {', '.join(failed)} (logs in {args.out})")
    return results


if __name__ == "__main__":
    C.cli(main)
