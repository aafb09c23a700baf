"""MeRGAN's Table 1 and DGM's A5/A10 in one command, on one protocol.

Runs every column of MeRGAN's Table 1 -- JT, SFT, EWC, DGR, MeRGAN-JTR, MeRGAN-RA -- and
DGM-w / DGM-a (DGM's Table) as separate runs of this repository's scripts, on the same dataset, task
order, seeds, evaluator and number of generated samples; then writes one Markdown table with
our numbers (mean ± sd over the seeds) beside the papers' and a picture of each run's accuracy
matrix. `--check` compares the finished table with the paper's Table 1 cell by cell. JT is the
paper's: one run on every class at once for each reported task count (after 5 tasks:
classes 0-4 at once; after 10: 0-9), so the JT column is two runs (`jt5`, `jt10`).

On a GPU the runs go at once (`--jobs`, default: all of them): each digit-GAN run keeps the
GPU only partly busy (small kernels), so independent processes overlap well.
On the CPU they run one after the other. Each run is an ordinary run folder under --out;
calling the command again skips finished runs and resumes interrupted ones (`--resume`).

    python benchmarks/table1.py --dataset mnist                 # Table 1 + DGM, paper budgets
    python benchmarks/table1.py --dataset mnist --classes 0,1,2,3,4 --budget teaching \
        --seeds 0,1,2 --jobs 2                                  # real digits on a CPU, hours
    python benchmarks/table1.py --report docs/results/mnist5k-teaching   # rebuild, no runs
    python benchmarks/table1.py --dataset mnist --seeds 0,1,2 --check   # ... against the paper
    python benchmarks/table1.py --dataset svhn --columns jtr,ra
    python benchmarks/table1.py --dataset synth --classes 0,1 --iters 3 --dgm-iters 3 \\
        --eval-samples 10 --mergan-args "--dim 8" --ewc-args "--fisher-samples 4"  # seconds

Outputs in --out: seed<k>/ per seed, holding one folder per run (the script's own run folder:
metrics.json, samples, checkpoint; `jt5`, `jt10` for JT) and its log; `acc_matrix_<run>.png`
(DGR and DGM also `solver_matrix_<run>.png`: the mean over the seeds), `table1.md`,
`table1.json`, `forgetting.png` (one generated image per class and column after the last task).
A copy of the small files (table1-args.json, the logs, each run's metrics.json and last sample
grid) is enough for `--report` and for adding seeds later.
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
import taskrun as R  # noqa: E402

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
# The papers' values (benchmarks/paper_values.json): MeRGAN's Table 1 -- Acc after 5 and 10
# one-digit tasks -- as {dataset: {column: {tasks: Acc}}}, and its Table 2 (LSUN). DGM's
# MNIST/SVHN A5/A10 could not be checked against the paper's text for this repository, so
# none are printed (docs/dgm.md).
with open(os.path.join(ROOT, "benchmarks", "paper_values.json")) as _f:
    PAPER_FILE = json.load(_f)
PAPER = {ds: {c: {int(t): v for t, v in cells.items()} for c, cells in cols.items()}
         for ds, cols in PAPER_FILE["mergan_table1"].items() if ds != "source"}
TABLE2 = PAPER_FILE["mergan_table2"]["lsun"]  # after task 4: acc, rev_acc, fid
# The sizes of the paper's training sets: --check refuses a subset (MNIST: torchvision's 60,000;
# the authors' TF loader held 5,000 of them out, --mnist-train 55000, docs/mergan.md).
FULL_TRAIN = {"mnist": (60000, 55000), "svhn": (73257,)}


def parse_args(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="dataset of every run (Table 1: mnist "
                   "or svhn)")
    p.add_argument("--data-root", default="./data", help="where the dataset is read from")
    p.add_argument("--no-download", action="store_true", help="never try the network")
    p.add_argument("--mnist-train", type=int, choices=(60000, 55000), default=60000,
                   help="MNIST training images of every run: 60000 (torchvision's) or 55000 "
                        "(the MeRGAN authors' TF split)")
    p.add_argument("--out", default=None, help="folder of the whole table (default "
                   "runs/table1-<dataset>); an existing one is resumed, and may gain seeds")
    p.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated seeds, e.g. "
                   "0,1,2: every column runs once per seed (in <out>/seed<k>/) and the table "
                   "prints mean ± sd over the seeds (default: 0, one seed for a quick look)")
    p.add_argument("--check", action="store_true", help="compare the finished table with the "
                   "paper's Table 1 (benchmarks/paper_values.json) cell by cell; refused "
                   "before any run where the protocol is not the paper's")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated columns to run, of {', '.join(COLUMNS)} (default: "
                        "all but cumulative)")
    p.add_argument("--jobs", type=C.at_least(1), default=None, help="runs at the same time "
                   "(default: every run -- each column of each seed -- at once on CUDA, one "
                   "at a time on the CPU)")
    p.add_argument("--classes", type=class_list, default=None, help="classes in task order, "
                   "e.g. 0,1,2 "
                   "(default: all, one per task: the papers' protocol)")
    p.add_argument("--iters", type=int, default=None, help="generator iterations per task "
                   "of the MeRGAN-family runs (default: the authors', 4001 MNIST, 8001 SVHN)")
    p.add_argument("--jt-iters", type=C.at_least(1), default=None, help="iterations of each "
                   "JT run "
                   "(default: the authors' joint.py, 40001 MNIST / 80001 SVHN, when --iters "
                   "is not given; else --iters x the tasks that JT run covers, the sequential "
                   "runs' budget up to that task)")
    p.add_argument("--dgm-iters", type=int, default=None, help="iterations per task of the "
                   "DGM runs (default: the authors' epochs per task)")
    p.add_argument("--budget", default="paper", choices=sorted(BUDGETS), help="named "
                   "defaults of --iters, --eval-samples and the MeRGAN family's --dim/--lr: "
                   "paper (the authors') or teaching (real digits on a CPU: 400 iterations "
                   "per task at lr 1e-3, width 16, 320 images per class; DGM keeps the "
                   "authors' epochs); a flag given explicitly wins")
    p.add_argument("--eval-samples", type=int, default=None, help="generated images per "
                   "class for Acc (default: the budget's; paper: 6400)")
    p.add_argument("--mergan-args", default="", help="extra flags for JT, SFT, EWC, DGR, JTR "
                   "and RA, ones mergan_jtr.py, mergan_ra.py and dgr.py all take, e.g. "
                   "\"--dim 16 --lr 1e-3\"")
    p.add_argument("--ewc-args", default="", help="extra flags for the EWC run only, e.g. "
                   "\"--fisher-samples 200\"")
    p.add_argument("--dgm-args", default="", help="extra flags for DGM-w and DGM-a")
    p.add_argument("--report", metavar="FOLDER", help="rebuild table1.md, table1.json and "
                   "the pictures of the table in FOLDER from its finished runs, running "
                   "nothing (with --check only; its settings are FOLDER's)")
    p.add_argument("--status-every", type=float, default=30.0,
                   help="seconds between status lines while runs are going")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # --mergan-args "--plain-step": argparse would take
        if a in PASS_THROUGH and argv[i + 1].startswith("-"):  # the value for an option
            argv[i:i + 2] = [f"{a}={argv[i + 1]}", None]
    args = p.parse_args([a for a in argv if a is not None])
    budget = BUDGETS[args.budget]
    if args.iters is None:
        args.iters = budget["iters"]
    if args.eval_samples is None:
        args.eval_samples = budget["eval_samples"]
    args.mergan_args = " ".join(filter(None, (budget["mergan_args"], args.mergan_args)))
    for flag in PASS_THROUGH:
        check_pass_through(flag, getattr(args, flag[2:].replace("-", "_")))
    args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = [c for c in args.columns if c not in COLUMNS]
    if unknown or not args.columns:
        raise C.UserError(f"--columns: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(COLUMNS)}")
    twice = sorted({c for c in args.columns if args.columns.count(c) > 1})
    if twice:
        raise C.UserError(f"--columns: {', '.join(twice)} given twice (one run folder each)")
    if args.mnist_train != 60000 and args.dataset != "mnist":
        raise C.UserError(f"--mnist-train is read with --dataset mnist only, not {args.dataset}")
    if args.dataset == "lsun" and set(DGM) & set(args.columns):
        raise C.UserError("--columns dgmw/dgma on lsun: DGM is not run on MeRGAN's Table 2 "
                          "scenes; pass --columns sft,ewc,dgr,jtr,ra")
    if args.classes is not None:
        args.class_list = [int(c) for c in args.classes.split(",")]
    else:
        n = C.dataset_info(args.dataset)[1]
        if n is None and "jt" in args.columns:
            raise C.UserError(f"--columns jt on {args.dataset}: pass --classes (JT trains "
                              "the first k classes at once, so it needs the class list)")
        args.class_list = list(range(n or 0))
    if args.out is None:
        args.out = os.path.join("runs", f"table1-{args.dataset}")
    # absolute, so that the runs (started from any folder) and this process agree
    args.out, args.data_root = os.path.abspath(args.out), os.path.abspath(args.data_root)
    return args


def class_list(text):
    """argparse type of --classes: "0,1,2" (distinct integers >= 0), kept as given."""
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        classes = None
    if not classes or min(classes) < 0 or len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"expected distinct class numbers such as 0,1,2, "
                                         f"got {text!r}")
    return text


def seed_list(text):
    """argparse type of --seeds: "0,1,2" -> [0, 1, 2] (distinct, each a valid seed)."""
    seeds = [C.seed(t.strip()) for t in text.split(",") if t.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds such as 0,1,2, got {text!r}")
    return seeds


# --budget: defaults of flags the user did not give. "teaching" is real digits on a CPU:
# 400 iterations per task at lr 1e-3 is the authors' 4001 at 1e-4 in steps x rate, at width 16
# (the authors': 64), with 320 generated images per class for Acc. DGM's budget is counted in
# epochs of the task's training set: the authors' 101 epochs are about 8,100 iterations on
# full MNIST but 606 on the MNIST-5k subset, so it stays the authors' (lr 2e-3 included).
BUDGETS = {"paper": {"iters": None, "eval_samples": 6400, "mergan_args": ""},
           "teaching": {"iters": 400, "eval_samples": 320, "mergan_args": "--dim 16 --lr 1e-3"}}
PASS_THROUGH = ("--mergan-args", "--ewc-args", "--dgm-args")
# Flags the table gives every run itself: given again in a pass-through they would win
# (argparse keeps the last) while the table reports its own value.
TABLE_SETS = {"--seed": "the table's --seeds", "--out": "each run's folder is "
              "<--out>/seed<k>/<run>",
              "--dataset": "the table's --dataset", "--data-root": "the table's --data-root",
              "--device": "the table's --device", "--eval-samples": "the table's "
              "--eval-samples", "--classes": "the table's --classes", "--iters": "the "
              "table's --iters, --jt-iters, --dgm-iters", "--no-download": "the table's "
              "--no-download", "--mnist-train": "the table's --mnist-train",
              "--resume": "the table resumes its unfinished runs itself",
              "--mode": "--columns (sft, ewc, jt, cumulative; jtr is mergan_jtr's default)",
              "--variant": "--columns dgmw or dgma"}


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
    """[(run name, column)] of one seed: one run per column, except JT: one run per reported
    task count k (jt<k>, classes of the first k tasks at once)."""
    out = []
    for col in args.columns:
        if col == "jt":
            out += [(f"jt{k}", col) for k in marks(len(args.class_list))]
        else:
            out.append((col, col))
    return out


def all_runs(args):
    """[(run id, seed, name, column)] of every seed; the run id is its folder under --out,
    seed<k>/<name>, and <out>/<id>.log its log."""
    return [(f"seed{seed}/{name}", seed, name, col) for seed in args.seeds
            for name, col in runs_of(args)]


def run_label(name, col):
    return f"JT, {name[2:]} classes at once" if col == "jt" else COLUMNS[col][0]


def jt_iterations(args, k):
    """Iterations of the JT run on the first k classes: --jt-iters, else --iters x k (the
    sequential runs' budget up to task k), else None (the script's default, joint.py's)."""
    if args.jt_iters is not None:
        return args.jt_iters
    return args.iters * k if args.iters is not None else None


def run_command(args, seed, name, col, resume):
    """The command line of one run (its run folder is <out>/seed<seed>/<name>)."""
    _, script, own = COLUMNS[col]
    if col in DGM and args.dataset not in ("mnist", "fashion"):  # pad: of 28-px digits only
        own = [a for a in own if a not in ("--to-32px", "pad")]
    cmd = [sys.executable, os.path.join(ROOT, script), *own, "--dataset", args.dataset,
           "--data-root", args.data_root, "--seed", str(seed), "--device", args.device,
           "--eval-samples", str(args.eval_samples),
           "--out", os.path.join(args.out, f"seed{seed}", name)]
    if args.no_download:
        cmd.append("--no-download")
    if args.mnist_train != 60000:
        cmd += ["--mnist-train", str(args.mnist_train)]
    if col == "jt":  # the paper's JT of k tasks: classes of the first k tasks at once
        k = int(name[2:])
        cmd += ["--classes", ",".join(map(str, args.class_list[:k]))]
        iters = jt_iterations(args, k)
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
    if os.path.exists(os.path.join(folder, R.CHECKPOINT)):
        return "resume"
    return "new"


# The settings that define the experiment: a table folder is only ever continued with these
# unchanged (--seeds, --columns, --jobs, --device, --check and --status-every may change
# between calls: each seed's runs have their own folder, seed<k>/).
EXPERIMENT = ("dataset", "data_root", "mnist_train", "classes", "iters", "jt_iters", "dgm_iters",
              "eval_samples", "mergan_args", "ewc_args", "dgm_args")


def check_settings(args):
    """Write <out>/table1-args.json on the first call; once a run has started, later calls
    must match it, so that a finished run of another budget is never reported as this
    table's. Before any run (a first call that failed, e.g. on missing data) the new
    command's settings replace it."""
    path = os.path.join(args.out, "table1-args.json")
    mine = {k: getattr(args, k) for k in EXPERIMENT}
    started = any(os.path.exists(os.path.join(args.out, d, n, "args.json"))  # a run began
                  for d in os.listdir(args.out) if re.fullmatch(r"seed\d+", d)
                  for n in os.listdir(os.path.join(args.out, d)))
    old = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            if started:
                raise C.UserError(f"{path} is not readable JSON (cut short?); restore it, or "
                                  "choose another --out") from None
    if isinstance(old, dict) and "seed" in old:  # one seed, its runs <out>/<name>
        raise C.UserError(f"{args.out} holds a table of an earlier table1.py (one seed, its "
                          "runs directly in it, made with older code); choose another --out")
    if started and old is not None:
        changed = [f"{k} {old.get(k)!r} -> {mine[k]!r}" for k in EXPERIMENT
                   if not isinstance(old, dict) or old.get(k) != mine[k]]
        if changed:
            raise C.UserError(f"{args.out} holds a table made with other settings "
                              f"({'; '.join(changed)}); choose another --out")
    else:
        C.save_json(path, mine)


def prepare_evaluator(args):
    """Train (or load) the dataset's evaluator once, before the runs start, so that parallel
    runs all load the same cached model instead of training it side by side."""
    device = C.pick_device(args.device)
    load = C.load_dataset
    if args.dataset == "lsun":  # Table 2's lmdb reader, as the MeRGAN scripts load it
        import mergan_lsun
        load = mergan_lsun.load_dataset
    data = [load(args.dataset, args.data_root, train, download=not args.no_download,
                 mnist_train=args.mnist_train) for train in (True, False)]
    args.n_train = len(data[0][1])
    refuse_check(args)  # a subset is known only now
    with open(os.path.join(args.out, "evaluator.log"), "w") as f:
        _, acc = C.get_evaluator(args, C.TaskData(*data[0][:2], device),
                                 C.TaskData(*data[1][:2], device), len(data[0][2]), device,
                                 log=lambda line: print(line, file=f, flush=True))
    print(f"evaluator: real test accuracy {acc:.2f}%", flush=True)


def progress_of(args, name):
    """'run k/T tasks, it i/n' from the run's metrics.json and its last progress line (name:
    the run id, seed<k>/<name>)."""
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


def code_version():
    """The repository's commit (git describe --always --dirty: '-dirty' when files differ
    from it), written into each run's log when the run starts or resumes; without git
    (a downloaded copy): unknown."""
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def codes_of(args, rid):
    """The commits a run was started and resumed at, in order, from its log."""
    try:
        with open(os.path.join(args.out, f"{rid}.log"), errors="replace") as f:
            found = re.findall(r"^# code (\S+)$", f.read(), re.M)
    except OSError:
        return []
    return list(dict.fromkeys(found))


def run_all(args, jobs):
    """Run the columns' scripts, at most `jobs` at a time. Returns {run name: exit status}."""
    todo = []
    for rid, seed, name, col in all_runs(args):
        st = state(os.path.join(args.out, rid))
        print(f"{rid:11s} {run_label(name, col):22s} {st}", flush=True)
        if st != "done":
            todo.append((rid, seed, name, col, st == "resume"))
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


def run_env(args, jobs):
    """The runs' environment: on the CPU, `jobs` runs at once share the cores, each with
    cores // jobs threads (torch would give each all of them), unless OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    if args.device == "cpu" and jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return env


def loop(args, jobs, todo, running, status, t_print):
    """Start runs while fewer than `jobs` go, collect the finished ones, print status."""
    while todo or running:
        while todo and len(running) < jobs:
            name, seed, short, col, resume = todo.pop(0)
            cmd = run_command(args, seed, short, col, resume)
            os.makedirs(os.path.join(args.out, f"seed{seed}"), exist_ok=True)
            log = open(os.path.join(args.out, f"{name}.log"), "a")
            log.write(f"# code {code_version()}\n$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            running[name] = (subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT,
                                               str(os.getpid()), *cmd], stdout=log,
                                              stderr=subprocess.STDOUT, env=run_env(args, jobs)),
                             log, time.time())
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


def spread(values):
    """{"mean", "sd", "n", "seeds"} of {seed: value}; sd is the sample standard deviation
    (n - 1 in the denominator), None for one seed. None when no seed has a value."""
    v = [x for x in values.values() if x is not None]
    if not v:
        return None
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v), "seeds": {str(s): x for s, x in values.items() if x is not None}}


def fmt_spread(cell, several):
    """'97.12' for one seed of a one-seed table; else 'mean ± sd (n=k)'."""
    if cell is None:
        return "—"
    if not several:
        return f"{cell['mean']:.2f}"
    sd = "—" if cell["sd"] is None else f"{cell['sd']:.2f}"
    return f"{cell['mean']:.2f} ± {sd} (n={cell['n']})"


def mean_matrix(mats):
    """Element-wise mean of accuracy matrices (None, a class not yet seen, stays None)."""
    return [[None if row[0][j] is None else float(np.mean([r[j] for r in row]))
             for j in range(len(row[0]))] for row in zip(*mats)]


def cells_of(args, results, cols, seeds):
    """{column: {"acc_after"/"A_after": {t: spread}, "forgetting": spread}} over the seeds:
    Acc after t tasks (JT: its run on the first t classes at once), the solver's A_t,
    the average forgetting; each a spread over the seeds whose run finished."""
    T = len(args.class_list)

    def metric(col, seed, key, t=None):
        name = f"jt{t}" if col == "jt" and key == "avg_acc" else col
        m = results.get(f"seed{seed}/{name}")
        if m is None:
            return None
        if col == "jt" and key == "avg_acc":
            return m["avg_acc"][-1]
        return m[key] if t is None else m[key][t - 1]

    out = {}
    for c in cols:
        out[c] = {"acc_after": {t: spread({s: metric(c, s, "avg_acc", t) for s in seeds})
                                for t in marks(T)}}
        if c in SOLVER:
            out[c]["A_after"] = {t: spread({s: metric(c, s, "A", t) for s in seeds})
                                 for t in marks(T)}
        if c != "jt":
            out[c]["forgetting"] = spread({s: metric(c, s, "avg_forgetting") for s in seeds})
    return out


def report(args, results, device_name):
    """table1.md / table1.json from the finished runs' metrics.json (results: {run id:
    metrics}), each cell the mean ± sd over the seeds; returns the Markdown."""
    runs = [r for r in all_runs(args) if r[0] in results]
    cols = [c for c in args.columns if any(col == c for *_, col in runs)]
    seeds = [s for s in args.seeds if any(seed == s for _, seed, _, _ in runs)]
    several = len(args.seeds) > 1
    seq = [rid for rid, _, _, col in runs if col != "jt"]
    ref_m = results[seq[0]] if seq else None
    T = len(args.class_list)
    paper = PAPER.get(args.dataset, {})
    default_protocol = (args.classes is None or args.class_list == list(range(10))) and (
        ref_m is None or all(len(t) == 1 for t in ref_m["tasks"]))
    any_m = results[runs[0][0]]
    cells = cells_of(args, results, cols, seeds)
    jt_names = [name for name, col in runs_of(args) if col == "jt"]
    lines = [f"## Table 1 on `{args.dataset}`: classes {args.class_list}, one per task, "
             + (f"seeds {', '.join(map(str, seeds))}: mean ± sample sd over the seeds "
                "(n = the seeds whose run finished)" if several else f"seed {seeds[0]}"),
             "",
             f"Device: {device_name}. Acc = MeRGAN's metric: the evaluator classifier "
             f"(real test accuracy {any_m['evaluator_test_acc']:.2f}%) labels "
             f"{any_m['args']['eval_samples']} generated images of every class seen; the "
             "mean of the per-task accuracies. "
             + ("JT is the paper's: after t tasks = one run on the first t classes at once ("
                + ", ".join(f"`{n}`" for n in jt_names) + "). " if jt_names else "")
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
        lines.append(f"| Acc after {t} tasks, ours | " + " | ".join(
            fmt_spread(cells[c]["acc_after"][t], several) for c in cols) + " |")
        if default_protocol and t in (5, 10) and paper:
            # the paper's JT beside our JT only: never beside the cumulative run
            lines.append(f"| Acc after {t} tasks, paper | "
                         + " | ".join(fmt(paper[c].get(t)) if c in paper else ""
                                      for c in cols) + " |")
        if args.dataset == "lsun" and default_protocol and t == 4:
            lines.append("| Acc after 4 tasks, paper's Table 2 (a 10-way evaluator) | "
                         + " | ".join(fmt(TABLE2["acc"].get(c)) for c in cols) + " |")
    if any(c in SOLVER for c in cols):
        for t in marks(T):
            lines.append(f"| A_{t} (solver on real test data), ours | " + " | ".join(
                fmt_spread(cells[c]["A_after"][t], several) if c in SOLVER else ""
                for c in cols) + " |")
    lines.append("| forgetting (avg, points) | " + " | ".join(
        "— (one task)" if c == "jt" else fmt_spread(cells[c]["forgetting"], several)
        for c in cols) + " |")
    def run_args(name):  # the flags of the first seed's finished run of that name
        return next(results[rid]["args"] for rid, _, n, _ in runs if n == name)

    def iters(c):
        if c == "jt":
            return " / ".join(f"{run_args(n)['iters']} ({n[2:]} classes)"
                              for n in jt_names if any(r[2] == n for r in runs))
        a = run_args(c)
        return str(a.get("iters") or f"{a.get('epochs')} epochs")
    lines.append("| iterations per task (JT: of its one task) | "
                 + " | ".join(iters(c) for c in cols) + " |")
    seconds = {c: sum(results[rid]["seconds"] for rid, *_, col in runs if col == c)
               for c in cols}
    lines.append("| training + evaluation time (s" + (", all seeds" if several else "")
                 + ") | " + " | ".join(f"{seconds[c]:.0f}" for c in cols) + " |")
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
    if args.dataset == "lsun":
        notes.append(LSUN_NOTE)
    if "cumulative" in cols:
        notes.append("The cumulative column trains task by task on the real data of every "
                     "class seen so far; it is not the paper's JT (one run on all classes at "
                     "once), so no paper value stands beside it.")
    notes.append("Accuracy matrices" + (" (the mean over the seeds)" if several else "")
                 + ": " + ", ".join(f"`acc_matrix_{n}.png`" for n, _ in runs_of(args)
                                    if any(r[2] == n for r in runs)) + ". `forgetting.png`: "
                 f"one generated image per class after the last task (seed {seeds[0]}).")
    codes = {rid: codes_of(args, rid) for rid, *_ in runs}
    kinds = sorted({c for cs in codes.values() for c in cs} | ({"not recorded"} if not all(
        codes.values()) else set()))
    notes.append(f"Code: every run at commit {kinds[0]}." if len(kinds) == 1 else
                 "Code: the runs are at several commits (table1.json, `code` of each run): "
                 + ", ".join(kinds) + ".")
    md = "\n".join(lines + ["", " ".join(notes)]) + "\n"
    if args.check:
        md += "\n" + "\n".join(check_lines(args, cells)) + "\n"

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(md)
    C.atomic_write(os.path.join(args.out, "table1.md"), write_md)
    C.save_json(os.path.join(args.out, "table1.json"), {
        "dataset": args.dataset, "seeds": seeds, "device": device_name,
        "classes": args.class_list, "evaluator_test_acc": any_m["evaluator_test_acc"],
        "n_train": getattr(args, "n_train", None),
        "columns": {c: {"label": COLUMNS[c][0], **{
            k: ({str(t): v for t, v in cell.items()} if k != "forgetting" else cell)
            for k, cell in cells[c].items()},
            "paper": ({t: paper[c].get(t) for t in marks(T) if t in paper[c]}
                      if default_protocol and c in paper else None)} for c in cols},
        "runs": {rid: {"column": col, "seed": seed, "tasks": results[rid]["tasks"],
                       "avg_acc": results[rid]["avg_acc"],
                       "acc_matrix": results[rid]["acc_matrix"], "A": results[rid].get("A"),
                       "seconds": results[rid]["seconds"], "code": codes_of(args, rid)}
                 for rid, seed, name, col in runs}})
    draw_matrices(args, results, runs, several)
    draw_gallery(args, runs, os.path.join(args.out, "forgetting.png"))
    return md


def draw_gallery(args, runs, path, scale=2):
    """Forgetting at a glance: one row per column of the table, one generated image per class
    after the last task (each run's first grid image of that class: its samples_task<T>.png,
    JT's of its one task; the first seed's run). SFT draws the last class in every row."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=13)
    T, cell, left, top = len(args.class_list), 34 * scale, 110, 24  # cells of 32 px, scaled
    rows = []
    for name, col in runs_of(args):
        rid = next((rid for rid, _, n, _ in runs if n == name), None)
        png = rid and os.path.join(args.out, rid, f"samples_task{1 if col == 'jt' else T}.png")
        if col == "jt" and name != f"jt{T}" or rid is None or not os.path.exists(png):
            continue  # JT's run of every task, or a run whose grid is not kept
        grid = Image.open(png).convert("RGB")
        s = (grid.width - 2) // 10 - 2  # image side: class_grid draws 10 a row, padding 2
        rows.append((run_label(name, col) if col != "jt" else "JT", [grid.crop(
            (2, 2 + (s + 2) * i, 2 + s, 2 + s + (s + 2) * i)) for i in range(T)]))  # class i
    if not rows:
        return
    img = Image.new("RGB", (left + cell * T + 6, top + cell * len(rows) + 6), "white")
    d = ImageDraw.Draw(img)
    for i, c in enumerate(args.class_list):
        d.text((left + i * cell + cell // 2, top - 4), f"class {c}", fill="black", font=font,
               anchor="mb")
    for r, (label, cells) in enumerate(rows):
        d.text((6, top + r * cell + cell // 2), label, fill="black", font=font, anchor="lm")
        for i, im in enumerate(cells):
            img.paste(im.resize((cell - 2, cell - 2), Image.NEAREST),
                      (left + i * cell, top + r * cell))
    C.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def draw_matrices(args, results, runs, several):
    """acc_matrix_<run>.png (and solver_matrix_<run>.png) of each run name: the mean of its
    seeds' matrices."""
    for name, col in runs_of(args):
        ms = [results[rid] for rid, _, n, _ in runs if n == name]
        if not ms:
            continue
        of = f", mean of {len(ms)} seeds" if several else ""
        if col == "jt":  # one task: its per-class accuracies
            classes = ms[0]["tasks"][0]
            draw_matrix(mean_matrix([[[m["class_acc"][str(c)][0] for c in classes]]
                                     for m in ms]), ["joint"], [str(c) for c in classes],
                        f"{run_label(name, col)}: Acc (%) of generated images, "
                        f"{args.dataset}{of}", os.path.join(args.out, f"acc_matrix_{name}.png"))
            continue
        names = [",".join(map(str, task)) for task in ms[0]["tasks"]]
        rows = [f"after {t + 1}" for t in range(len(ms[0]["tasks"]))]
        draw_matrix(mean_matrix([m["acc_matrix"] for m in ms]), rows, names,
                    f"{COLUMNS[col][0]}: Acc (%) of generated images, {args.dataset}{of}",
                    os.path.join(args.out, f"acc_matrix_{name}.png"))
        if col in SOLVER:
            draw_matrix(mean_matrix([m["solver_acc_matrix"] for m in ms]), rows, names,
                        f"{COLUMNS[col][0]}: solver accuracy (%) on real test data{of}",
                        os.path.join(args.out, f"solver_matrix_{name}.png"))


# ------------------------------------------------------------------------------------------
# --check: the finished table against the paper's Table 1
# ------------------------------------------------------------------------------------------
LSUN_NOTE = ("LSUN: our evaluator classifies the 4 scenes of the tasks (chance 25%); the "
             "paper's is a VGG over the ten LSUN categories (chance 10%), so confusions with "
             "the other six scenes cannot happen here: JTR/RA Acc reads higher and SFT's floor "
             "sits near 25% instead of 10%. The Table 2 row is for orientation, not a "
             "comparison (docs/mergan.md, \"LSUN\", says how to score with ten categories).")
CHECKED = ("jt", "sft", "ewc", "dgr", "jtr", "ra")  # the columns with a paper value
# Flags of how a run goes, not of what it computes: a pass-through may set them under --check.
RUN_ONLY = set(R.RUN_FLAGS) | set(R.PER_CALL) | {"cuda_graphs", "plain_step", "final_metrics",
                                                 "inception_fid"}


def protocol_problems(args, n_train):
    """Why the table is not the paper's Table 1 protocol ([] when it is): dataset, tasks,
    budgets, generated samples, training set, flags passed to the runs."""
    if args.dataset == "lsun":
        return ["lsun is the paper's Table 2, whose Acc is judged by a 10-way LSUN evaluator; "
                "ours has the 4 scenes of the tasks (docs/mergan.md, \"LSUN\")"]
    if args.dataset not in PAPER:
        return [f"the paper has no table on {args.dataset} (Table 1: mnist, svhn)"]
    why = []
    if args.classes is not None and args.class_list != list(range(10)):
        why.append(f"--classes {args.classes} (the paper: 0..9, one per task)")
    budget, jt_budget = {"mnist": (4001, 40001), "svhn": (8001, 80001)}[args.dataset]
    if args.iters is not None and args.iters < budget:
        why.append(f"--iters {args.iters} (the authors: {budget} per task)")
    for name, col in runs_of(args):
        iters = jt_iterations(args, int(name[2:])) if col == "jt" else None
        if iters is not None and iters < jt_budget:
            why.append(f"{name} would train {iters} iterations (the authors' joint.py: "
                       f"{jt_budget}; --jt-iters sets it)")
    if args.eval_samples != 6400:
        why.append(f"--eval-samples {args.eval_samples} (the paper: 6400 per class)")
    if n_train is not None and n_train not in FULL_TRAIN[args.dataset]:
        why.append(f"{n_train} training images in --data-root (the full {args.dataset}: "
                   f"{' or '.join(map(str, FULL_TRAIN[args.dataset]))})")
    for flag in ("--mergan-args", "--ewc-args"):
        changed = experiment_changes(args, flag)
        if changed:
            why.append(f"{flag} changes {', '.join(changed)}")
    return why


def experiment_changes(args, flag):
    """The experiment settings a pass-through changes in the checked columns' scripts
    (e.g. '--dim 32 -> 16'); flags of the run only (--log-every, --cuda-graphs) are not."""
    tokens = shlex.split(getattr(args, flag[2:].replace("-", "_")))
    if not tokens:
        return []
    import importlib
    changed = set()
    for col in (["ewc"] if flag == "--ewc-args" else CHECKED):
        if col not in args.columns:
            continue
        _, script, own = COLUMNS[col]
        mod = importlib.import_module(script[:-3])
        base = [*own, "--dataset", args.dataset, "--out", "x"]
        try:
            a, b = vars(mod.parse_args(base)), vars(mod.parse_args(base + tokens))
        except C.UserError:  # a flag this script does not take: the run itself says so
            continue
        changed |= {f"--{k.replace('_', '-')} {a[k]} -> {b[k]}" for k in a
                    if k not in RUN_ONLY and a[k] != b.get(k)}
    return sorted(changed)


def check_lines(args, cells):
    """The check, in Markdown: each column's Acc after 5 and 10 tasks against the paper's;
    within the seeds' spread (|ours - paper| <= 2 sd) or how far off."""
    paper = PAPER[args.dataset]
    out = ["### Check against the paper (MeRGAN Table 1, benchmarks/paper_values.json)", "",
           "| column | tasks | ours | paper | ours − paper | verdict |",
           "|---|---|---|---|---|---|"]
    inside = total = 0
    for c in [c for c in CHECKED if c in cells]:
        for t in (5, 10):
            cell = cells[c]["acc_after"].get(t)
            if cell is None or t not in paper[c]:
                continue
            total += 1
            d = cell["mean"] - paper[c][t]
            if cell["sd"] is None:
                verdict = "one seed, no spread: run --seeds 0,1,2 to tell this from noise"
            elif abs(d) <= 2 * cell["sd"]:
                verdict, inside = "within 2 sd of the seeds", inside + 1
            else:
                verdict = (f"off by {abs(d) / cell['sd']:.1f} sd" if cell["sd"] > 0 else
                           "off (the seeds agree exactly)")
            out.append(f"| {COLUMNS[c][0]} | {t} | {fmt_spread(cell, True)} | "
                       f"{paper[c][t]:.2f} | {d:+.2f} | {verdict} |")
    out += ["", f"{inside} of {total} cells within 2 sd of the paper's value."]
    return out


def refuse_check(args):
    """--check on a protocol that is not the paper's: one line, saying why."""
    why = protocol_problems(args, getattr(args, "n_train", None)) if args.check else []
    if why:
        raise C.UserError("--check: this table is not the paper's protocol, so it cannot be "
                          "compared with it: " + "; ".join(why))


def rebuild(folder, check=False):
    """--report FOLDER: table1.md, table1.json and the pictures again from the finished runs
    in FOLDER (their metrics.json, logs and last sample grids; e.g. a committed copy under
    docs/results/), with the settings of its table1-args.json; nothing is run."""
    try:
        with open(os.path.join(folder, "table1-args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise C.UserError(f"--report {folder}: no readable table1-args.json ({err})") from None
    seeds = sorted(int(d[4:]) for d in os.listdir(folder) if re.fullmatch(r"seed\d+", d))
    if not seeds:
        raise C.UserError(f"--report {folder}: no seed<k> folder of runs in it")
    argv = ["--out", folder, "--device", "cpu", "--seeds", ",".join(map(str, seeds)),
            "--columns", ",".join(c for c in COLUMNS if any(  # the columns with a run folder
                os.path.isdir(os.path.join(folder, f"seed{s}", c)) or c == "jt" and any(
                    re.fullmatch(r"jt\d+", n) for n in os.listdir(os.path.join(
                        folder, f"seed{s}"))) for s in seeds))]
    for k in EXPERIMENT:
        if saved.get(k) is not None:
            argv.append(f"--{k.replace('_', '-')}={saved[k]}")
    args = parse_args(argv + (["--check"] if check else []))
    try:
        with open(os.path.join(folder, "table1.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    args.n_train = old.get("n_train")  # the training set's size, known to the first report
    refuse_check(args)
    results = {rid: read_metrics(os.path.join(folder, rid)) for rid, *_ in all_runs(args)}
    results = {r: m for r, m in results.items() if m and state(os.path.join(folder, r)) == "done"}
    if not results:
        raise C.UserError(f"--report {folder}: no finished run in it")
    device_name = old.get("device") or next(iter(results.values())).get("device", "unknown")
    print(report(args, results, device_name), flush=True)
    return results


def main(argv=None):
    argv = [w for a in (sys.argv[1:] if argv is None else argv)  # --report=F: --report F
            for w in (a.split("=", 1) if a.startswith("--report=") else [a])]
    if "--report" in argv:  # --report FOLDER [--check]: nothing else is read
        rest = [a for a in argv if a not in ("--report", "--check")]
        if len(rest) != 1 or argv.index("--report") + 1 >= len(argv):
            raise C.UserError("--report takes one folder (and --check), e.g. "
                              "--report docs/results/mnist5k-teaching")
        return rebuild(rest[0], "--check" in argv)
    args = parse_args(argv)
    refuse_check(args)
    device = C.pick_device(args.device)
    jobs = args.jobs or (len(all_runs(args)) if device.type == "cuda" else 1)
    args.device = device.type
    device_name = (f"cuda ({__import__('torch').cuda.get_device_name(0)})"
                   if device.type == "cuda" else "cpu")
    if os.path.exists(args.out) and not (  # empty but for a lock, or a table's
            os.path.isdir(args.out) and (not set(os.listdir(args.out)) - {"table1.lock"}
                                         or os.path.exists(os.path.join(args.out,
                                                                        "table1-args.json")))):
        raise C.UserError(f"--out {args.out} is not a table's folder (a file, or a folder "
                          "of other files without table1-args.json); choose another --out")
    try:
        os.makedirs(args.out, exist_ok=True)
        lock(args.out)  # first: a second command never touches a running table's settings
        check_settings(args)
    except OSError as err:
        raise C.UserError(f"--out {args.out}: cannot write there ({err.strerror or err}); "
                          "choose another --out") from None
    print(f"table1: {len(all_runs(args))} runs in {args.out}, {jobs} at a time on "
          f"{device_name}", flush=True)
    t0 = time.time()
    prepare_evaluator(args)
    status = run_all(args, jobs)
    names = [rid for rid, *_ in all_runs(args)]
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
    R.cli(main)
