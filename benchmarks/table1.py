"""MeRGAN's Table 1 and DGM's A5/A10 in one command, on one protocol.

Runs every column of MeRGAN's Table 1 -- JT, SFT, EWC, DGR, MeRGAN-JTR, MeRGAN-RA -- and
DGM-w / DGM-a (DGM's Table) as separate runs of this repository's scripts, on the same dataset, task
order, seed, evaluator and number of generated samples; then writes one Markdown table with
our numbers beside the papers' and a picture of each run's accuracy matrix. JT is the
paper's: one run on every class at once for each reported task count (after 5 tasks:
classes 0-4 at once; after 10: 0-9), so the JT column is two runs (`jt5`, `jt10`).

On a GPU the runs go at once (`--jobs`, default: all of them): each digit-GAN run keeps the
GPU only partly busy (small kernels), so independent processes overlap well.
On the CPU they run one after the other. Each run is an ordinary run folder under --out;
calling the command again skips finished runs and resumes interrupted ones (`--resume`).

    python benchmarks/table1.py --dataset mnist                 # Table 1 + DGM, paper budgets
    python benchmarks/table1.py --dataset svhn --columns jtr,ra
    python benchmarks/table1.py --dataset synth --classes 0,1 --iters 3 --dgm-iters 3 \\
        --eval-samples 10 --mergan-args "--dim 8" --ewc-args "--fisher-samples 4"  # seconds

Outputs in --out: one folder per run (the script's own run folder: metrics.json, samples,
checkpoint; `jt5`, `jt10` for JT) and its log, `acc_matrix_<run>.png` (DGR and DGM also
`solver_matrix_<run>.png`), `table1.md`, `table1.json`.
"""
import argparse
import fcntl
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

# column -> (label, script, its own flags). JT is the paper's (--mode jt: one run on every
# class at once, one run per reported task count). "cumulative" (not run by default) is
# another experiment -- task by task on the real data of every class seen so far -- and the
# paper's JT is never printed beside it.
COLUMNS = {
    "jt": ("JT", "mergan_jtr.py", ["--mode", "jt"]),
    "sft": ("SFT", "mergan_jtr.py", ["--mode", "sft"]),
    "ewc": ("EWC", "mergan_jtr.py", ["--mode", "ewc"]),
    "dgr": ("DGR", "dgr.py", []),  # deep generative replay: unconditional G + solver
    "jtr": ("MeRGAN-JTR", "mergan_jtr.py", []),
    "ra": ("MeRGAN-RA", "mergan_ra.py", []),
    # DGM's authors resize 28px digits to 32 (dgm.py's default); here DGM gets MeRGAN's
    # padded digits, so that every column sees the same images and the same evaluator
    # (--dgm-args "--to-32px resize" gives DGM its own). DGM still holds out its
    # validation split (--val-split) for the authors' model selection.
    "dgmw": ("DGM-w", "dgm.py", ["--to-32px", "pad"]),
    "dgma": ("DGM-a", "dgm.py", ["--variant", "a", "--to-32px", "pad"]),
    "cumulative": ("Cumulative (not the paper's JT)", "mergan_jtr.py",
                   ["--mode", "cumulative"]),
}
DEFAULT_COLUMNS = ["jt", "sft", "ewc", "dgr", "jtr", "ra", "dgmw", "dgma"]
DGM = ("dgmw", "dgma")
SOLVER = ("dgr", "dgmw", "dgma")  # columns with a solver classifier: A_t, DGM's metric
# MeRGAN Table 1 (Wu et al. 2018): average accuracy (%) after 5 and 10 one-digit tasks.
# DGM's paper reports A5/A10 on MNIST and SVHN too, but those values could not be checked
# against the paper's text for this repository, so none are printed (docs/dgm.md).
PAPER = {
    "mnist": {"jt": {5: 97.66, 10: 96.92}, "sft": {5: 19.87, 10: 10.06},
              "ewc": {5: 70.62, 10: 77.03}, "dgr": {5: 90.39, 10: 85.40},
              "jtr": {5: 97.93, 10: 97.00}, "ra": {5: 98.19, 10: 97.01}},
    "svhn": {"jt": {5: 85.30, 10: 84.82}, "sft": {5: 19.35, 10: 10.10},
             "ewc": {5: 39.84, 10: 33.02}, "dgr": {5: 61.29, 10: 47.28},
             "jtr": {5: 80.90, 10: 66.50}, "ra": {5: 76.05, 10: 66.78}},
}


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="dataset of every run (Table 1: mnist "
                   "or svhn)")
    p.add_argument("--data-root", default="./data", help="where the dataset is read from")
    p.add_argument("--no-download", action="store_true", help="never try the network")
    p.add_argument("--out", default=None, help="folder of the whole table (default "
                   "runs/table1-<dataset>-s<seed>); an existing one is resumed")
    p.add_argument("--seed", type=C.seed, default=0, help="seed of every run")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated columns to run, of {', '.join(COLUMNS)} (default: "
                        "all but cumulative)")
    p.add_argument("--jobs", type=C.at_least(1), default=None, help="runs at the same time "
                   "(default: every column at once on CUDA, one at a time on the CPU)")
    p.add_argument("--classes", default=None, help="classes in task order, e.g. 0,1,2 "
                   "(default: all, one per task: the papers' protocol)")
    p.add_argument("--iters", type=int, default=None, help="generator iterations per task "
                   "of the MeRGAN-family runs (default: the authors', 4001 MNIST, 8001 SVHN)")
    p.add_argument("--jt-iters", type=int, default=None, help="iterations of each JT run "
                   "(default: the authors' joint.py, 40001 MNIST / 80001 SVHN, when --iters "
                   "is not given; else --iters x the tasks that JT run covers, the sequential "
                   "runs' budget up to that task)")
    p.add_argument("--dgm-iters", type=int, default=None, help="iterations per task of the "
                   "DGM runs (default: the authors' epochs per task)")
    p.add_argument("--eval-samples", type=int, default=6400, help="generated images per "
                   "class for Acc (paper: 6400)")
    p.add_argument("--mergan-args", default="", help="extra flags for JT, SFT, EWC, DGR, JTR "
                   "and RA, ones mergan_jtr.py, mergan_ra.py and dgr.py all take, e.g. "
                   "\"--dim 16 --lr 1e-3\"")
    p.add_argument("--ewc-args", default="", help="extra flags for the EWC run only, e.g. "
                   "\"--fisher-samples 200\"")
    p.add_argument("--dgm-args", default="", help="extra flags for DGM-w and DGM-a")
    p.add_argument("--status-every", type=float, default=30.0,
                   help="seconds between status lines while runs are going")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # --mergan-args "--plain-step": argparse would take
        if a in PASS_THROUGH and argv[i + 1].startswith("-"):  # the value for an option
            argv[i:i + 2] = [f"{a}={argv[i + 1]}", None]
    args = p.parse_args([a for a in argv if a is not None])
    for flag in PASS_THROUGH:
        check_pass_through(flag, getattr(args, flag[2:].replace("-", "_")))
    args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = [c for c in args.columns if c not in COLUMNS]
    if unknown or not args.columns:
        raise C.UserError(f"--columns: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(COLUMNS)}")
    if args.dataset == "lsun" and "dgr" in args.columns:
        raise C.UserError("--columns dgr on lsun: MeRGAN's Table 2 leaves DGR out (its "
                          "generation is not conditioned on the category); pass --columns "
                          "sft,ewc,jtr,ra")
    if args.classes is not None:
        args.class_list = [int(c) for c in args.classes.split(",") if c.strip()]
    else:
        n = C.dataset_info(args.dataset)[1]
        if n is None and "jt" in args.columns:
            raise C.UserError(f"--columns jt on {args.dataset}: pass --classes (JT trains "
                              "the first k classes at once, so it needs the class list)")
        args.class_list = list(range(n or 0))
    if args.out is None:
        args.out = os.path.join("runs", f"table1-{args.dataset}-s{args.seed}")
    # absolute, so that the runs (started from any folder) and this process agree
    args.out, args.data_root = os.path.abspath(args.out), os.path.abspath(args.data_root)
    return args


PASS_THROUGH = ("--mergan-args", "--ewc-args", "--dgm-args")
# Flags the table gives every run itself: given again in a pass-through they would win
# (argparse keeps the last) while the table reports its own value.
TABLE_SETS = {"--seed": "the table's --seed", "--out": "each run's folder is <--out>/<run>",
              "--dataset": "the table's --dataset", "--data-root": "the table's --data-root",
              "--device": "the table's --device", "--eval-samples": "the table's "
              "--eval-samples", "--classes": "the table's --classes", "--iters": "the "
              "table's --iters, --jt-iters, --dgm-iters", "--no-download": "the table's "
              "--no-download", "--resume": "the table resumes its unfinished runs itself"}


def check_pass_through(flag, value):
    """One line for a pass-through that cannot be split or sets what the table sets."""
    try:
        tokens = shlex.split(value)
    except ValueError as err:
        raise C.UserError(f"{flag} {value!r}: {err}") from None
    for t in tokens:
        name = t.split("=")[0]
        if name in TABLE_SETS:
            raise C.UserError(f"{flag}: {name} is set by the table for every run; use "
                              f"{TABLE_SETS[name]}")


# ------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------
def marks(n_tasks):
    """The task counts the table reports: 5 and 10 (the papers'), where reached, and the
    last."""
    return sorted({t for t in (5, 10) if t <= n_tasks} | {n_tasks})


def runs_of(args):
    """[(run name = its folder under --out, column)]: one run per column, except JT: one
    run per reported task count k (jt<k>, classes of the first k tasks at once)."""
    out = []
    for col in args.columns:
        if col == "jt":
            out += [(f"jt{k}", col) for k in marks(len(args.class_list))]
        else:
            out.append((col, col))
    return out


def run_label(name, col):
    return f"JT, {name[2:]} classes at once" if col == "jt" else COLUMNS[col][0]


def run_command(args, name, col, resume):
    """The command line of one run (its run folder is <out>/<name>)."""
    _, script, own = COLUMNS[col]
    cmd = [sys.executable, os.path.join(ROOT, script), *own, "--dataset", args.dataset,
           "--data-root", args.data_root, "--seed", str(args.seed), "--device", args.device,
           "--eval-samples", str(args.eval_samples), "--out", os.path.join(args.out, name)]
    if args.no_download:
        cmd.append("--no-download")
    if col == "jt":  # the paper's JT of k tasks: classes of the first k tasks at once
        k = int(name[2:])
        cmd += ["--classes", ",".join(map(str, args.class_list[:k]))]
        iters = args.jt_iters or (args.iters * k if args.iters is not None else None)
    else:
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
EXPERIMENT = ("dataset", "data_root", "seed", "classes", "iters", "jt_iters", "dgm_iters",
              "eval_samples", "mergan_args", "ewc_args", "dgm_args")


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
    device = C.pick_device(args.device)
    data = [C.load_dataset(args.dataset, args.data_root, train, download=not args.no_download)
            for train in (True, False)]
    with open(os.path.join(args.out, "evaluator.log"), "w") as f:
        _, acc = C.get_evaluator(args, C.TaskData(*data[0][:2], device),
                                 C.TaskData(*data[1][:2], device), len(data[0][2]), device,
                                 log=lambda line: print(line, file=f, flush=True))
    print(f"evaluator: real test accuracy {acc:.2f}%", flush=True)


def progress_of(args, name):
    """'run k/T tasks, it i/n' from the run's metrics.json and its last progress line."""
    m = read_metrics(os.path.join(args.out, name))
    text = ""
    try:
        with open(os.path.join(args.out, f"{name}.log"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 600))
            text = f.read().decode(errors="replace")
    except OSError:
        pass
    its = re.findall(r"\] it +(\d+/\d+)", text)
    done = f"{m['tasks_done']}/{len(m['tasks'])} tasks" if m else "0 tasks"
    return f"{name} {done}" + (f", it {its[-1]}" if its else "")


# Each run starts through this (Linux): PR_SET_PDEATHSIG (1) makes the kernel SIGTERM the run
# when the table command dies, even by SIGKILL, so that no run goes on as an orphan writing
# into --out. It outlives execv; done in a fresh interpreter, not in a preexec_fn (unsafe in
# a process with threads). Elsewhere the `finally` of run_all stops the runs.
DIE_WITH_PARENT = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):  # the command died before prctl took hold
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])"""


def lock(out):
    """Hold --out for this command (released when it exits, however): a second table
    command on the same folder would run the same runs twice at once."""
    if getattr(lock, "held", None):  # an earlier main() of this process: not another
        lock.held.close()
    f = open(os.path.join(out, "table1.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise C.UserError(f"another table command (pid {f.read().strip() or '?'}) is running "
                          f"in {out}; wait for it or stop it, then run this again")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    lock.held = f  # open (and locked) until the command exits


def run_all(args, jobs):
    """Run the columns' scripts, at most `jobs` at a time. Returns {run name: exit status}."""
    todo = []
    for name, col in runs_of(args):
        st = state(os.path.join(args.out, name))
        print(f"{name:5s} {run_label(name, col):22s} {st}", flush=True)
        if st != "done":
            todo.append((name, col, st == "resume"))
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
            name, col, resume = todo.pop(0)
            cmd = run_command(args, name, col, resume)
            log = open(os.path.join(args.out, f"{name}.log"), "a")
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            running[name] = (subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT,
                                               str(os.getpid()), *cmd], stdout=log,
                                              stderr=subprocess.STDOUT), log, time.time())
        time.sleep(0.5)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            status[name] = proc.returncode
            if proc.returncode == 0:
                print(f"{name} finished ({time.time() - t0:.0f}s)", flush=True)
            else:
                tail = open(os.path.join(args.out, f"{name}.log")).read().strip()
                tail = tail.splitlines()[-1] if tail else ""
                print(f"{name} FAILED (exit {proc.returncode}): {tail}  -> see "
                      f"{os.path.join(args.out, name + '.log')}", flush=True)
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
    C.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def fmt(v):
    return "—" if v is None else f"{v:.2f}"


def report(args, results, device_name):
    """table1.md / table1.json from the finished runs' metrics.json (results: {run name:
    metrics}); returns the Markdown."""
    runs = [(name, col) for name, col in runs_of(args) if name in results]
    cols = [c for c in args.columns if any(col == c for _, col in runs)]
    seq = [name for name, col in runs if col != "jt"]
    ref_m = results[seq[0]] if seq else None
    T = len(args.class_list)
    paper = PAPER.get(args.dataset, {})
    default_protocol = args.classes is None and (ref_m is None or all(
        len(t) == 1 for t in ref_m["tasks"]))
    any_m = next(iter(results.values()))

    def acc(col, t):  # Acc after t tasks; JT: its run on the first t classes at once
        if col == "jt":
            m = results.get(f"jt{t}")
            return m["avg_acc"][-1] if m else None
        return results[col]["avg_acc"][t - 1] if col in results else None

    jt_runs = [name for name, col in runs if col == "jt"]
    lines = [f"## Table 1 on `{args.dataset}`: classes {args.class_list}, one per task, "
             f"seed {args.seed}",
             "",
             f"Device: {device_name}. Acc = MeRGAN's metric: the evaluator classifier "
             f"(real test accuracy {any_m['evaluator_test_acc']:.2f}%) labels "
             f"{any_m['args']['eval_samples']} generated images of every class seen; the "
             "mean of the per-task accuracies. "
             + ("JT is the paper's: after t tasks = one run on the first t classes at once ("
                + ", ".join(f"`{n}`" for n in jt_runs) + "). " if jt_runs else "")
             + "DGR's Acc: its solver names the class of each unconditional image "
             "(docs/dgr.md). A_t = DGM's metric: the accuracy of the solver (DGM: the "
             "discriminator's classifier head) on the real test images of the classes seen "
             "(A5, A10 in the DGM paper). Paper values inline only where the dataset and "
             "the tasks are the paper's (mnist/svhn, classes 0..9, one per task). The "
             "authors' train.sh runs 4001 (MNIST) / 8001 (SVHN) iterations per task (JT "
             "40001/80001); their issue #4 reports that 10-task MNIST needed 8001 to reach "
             "the paper's values (docs/mergan.md).",
             "",
             "| | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for t in marks(T):
        lines.append(f"| Acc after {t} tasks, ours | "
                     + " | ".join(fmt(acc(c, t)) for c in cols) + " |")
        if default_protocol and t in (5, 10) and paper:
            # the paper's JT beside our JT only: never beside the cumulative run
            lines.append(f"| Acc after {t} tasks, paper | "
                         + " | ".join(fmt(paper[c].get(t)) if c in paper else ""
                                      for c in cols) + " |")
    if any(c in SOLVER for c in cols):
        for t in marks(T):
            lines.append(f"| A_{t} (solver on real test data), ours | "
                         + " | ".join(fmt(results[c]["A"][t - 1]) if c in SOLVER else ""
                                      for c in cols) + " |")
    lines.append("| forgetting (avg, points) | "
                 + " | ".join("— (one task)" if c == "jt" else
                              fmt(results[c]["avg_forgetting"]) for c in cols) + " |")

    def iters(c):
        if c == "jt":
            return " / ".join(f"{results[n]['args']['iters']} ({n[2:]} classes)"
                              for n in jt_runs)
        a = results[c]["args"]
        return str(a.get("iters") or f"{a.get('epochs')} epochs")
    lines.append("| iterations per task (JT: of its one task) | "
                 + " | ".join(iters(c) for c in cols) + " |")
    lines.append("| training + evaluation time (s) | "
                 + " | ".join(f"{sum(results[n]['seconds'] for n, col in runs if col == c):.0f}"
                              for c in cols) + " |")
    ref = [c for c in cols if c in PAPER["mnist"]]
    if ref:  # the papers' numbers, always, for reference (inline above only when comparable)
        lines += ["", "For reference, MeRGAN's Table 1 (10 one-digit tasks, the full datasets, "
                  "the authors' budgets):", "",
                  "| paper | " + " | ".join(COLUMNS[c][0] for c in ref) + " |",
                  "|---|" + "---|" * len(ref)]
        for ds in ("mnist", "svhn"):
            for t in (5, 10):
                lines.append(f"| {ds.upper()}, Acc after {t} tasks | "
                             + " | ".join(fmt(PAPER[ds][c][t]) for c in ref) + " |")
    notes = ["DGM's paper values for MNIST/SVHN are not printed: they could not be "
             "checked against the paper's text here."]
    if "cumulative" in cols:
        notes.append("The cumulative column trains task by task on the real data of every "
                     "class seen so far; it is not the paper's JT (one run on all classes at "
                     "once), so no paper value stands beside it.")
    notes.append("Accuracy matrices: " + ", ".join(f"`acc_matrix_{n}.png`" for n, _ in runs)
                 + ".")
    md = "\n".join(lines + ["", " ".join(notes)]) + "\n"
    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(md)
    C.atomic_write(os.path.join(args.out, "table1.md"), write_md)
    C.save_json(os.path.join(args.out, "table1.json"), {
        "dataset": args.dataset, "seed": args.seed, "device": device_name,
        "classes": args.class_list, "evaluator_test_acc": any_m["evaluator_test_acc"],
        "columns": {c: {"label": COLUMNS[c][0],
                        "acc_after": {str(t): acc(c, t) for t in marks(T)},
                        "paper": ({t: paper[c].get(t) for t in marks(T) if t in paper[c]}
                                  if default_protocol and c in paper else None)}
                    for c in cols},
        "runs": {n: {"column": col, "tasks": results[n]["tasks"],
                     "avg_acc": results[n]["avg_acc"], "acc_matrix": results[n]["acc_matrix"],
                     "A": results[n].get("A"), "seconds": results[n]["seconds"]}
                 for n, col in runs}})
    for n, col in runs:
        m = results[n]
        if col == "jt":  # one task: its per-class accuracies
            classes = m["tasks"][0]
            draw_matrix([[m["class_acc"][str(c)][0] for c in classes]], ["joint"],
                        [str(c) for c in classes], f"{run_label(n, col)}: Acc (%) of "
                        f"generated images, {args.dataset}",
                        os.path.join(args.out, f"acc_matrix_{n}.png"))
            continue
        names = [",".join(map(str, task)) for task in m["tasks"]]
        rows = [f"after {t + 1}" for t in range(len(m["tasks"]))]
        draw_matrix(m["acc_matrix"], rows, names, f"{COLUMNS[col][0]}: Acc (%) of generated "
                    f"images, {args.dataset}", os.path.join(args.out, f"acc_matrix_{n}.png"))
        if col in SOLVER:
            draw_matrix(m["solver_acc_matrix"], rows, names, f"{COLUMNS[col][0]}: solver "
                        f"accuracy (%) on real test data", os.path.join(
                            args.out, f"solver_matrix_{n}.png"))
    return md


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    jobs = args.jobs or (len(runs_of(args)) if device.type == "cuda" else 1)
    args.device = device.type
    device_name = (f"cuda ({__import__('torch').cuda.get_device_name(0)})"
                   if device.type == "cuda" else "cpu")
    if os.path.exists(args.out) and not (
            os.path.isdir(args.out) and (not os.listdir(args.out) or os.path.exists(
                os.path.join(args.out, "table1-args.json")))):
        raise C.UserError(f"--out {args.out} is not a table's folder (a file, or a folder "
                          "of other files without table1-args.json); choose another --out")
    os.makedirs(args.out, exist_ok=True)
    check_settings(args)
    lock(args.out)
    print(f"table1: {len(runs_of(args))} runs in {args.out}, {jobs} at a time on {device_name}",
          flush=True)
    t0 = time.time()
    prepare_evaluator(args)
    status = run_all(args, jobs)
    names = [name for name, _ in runs_of(args)]
    results = {n: read_metrics(os.path.join(args.out, n)) for n in names}
    results = {n: m for n, m in results.items()
               if m and state(os.path.join(args.out, n)) == "done"}
    failed = [n for n, rc in status.items() if rc != 0]
    unfinished = [n for n in names if n not in results and n not in failed]
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
