"""A run's safety net, apart from the methods (a student can skip it; docs/core.md): its locked
folder and args.json, checkpoints and exact resume (RNG states, data and evaluator fingerprints),
one-line errors (`cli`), the progress line that stops a diverging run, `setup` and `TaskRun`."""
import argparse
import fcntl
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from datetime import datetime

import imageio.v2 as imageio
import numpy as np
import torch

import common as C


class Diverged(C.UserError):
    """NaN/Inf in training: stops before the task is evaluated or saved (nothing is lost)."""


RUN_FOLDER = RUN_SCRIPT = RUN_LOCK = None  # prepare_run's: run folder, script, flock-ed fd
CHECKPOINT = "checkpoint.pt"
RUN_INPUTS = {}  # fingerprints of the data and evaluator the run is made of (run_inputs)


def cli(main, argv=None):
    """Run `main(argv)`; a UserError ends in one line on stderr and exit status 2."""
    try:
        return main(argv)
    except C.UserError as err:  # after a write failure: fix it, then how to go on
        print(f"error: {err}" + (f"; fix it: {next_step()}" if isinstance(err, C.WriteError)
                                 else ""), file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        print(f"error: out of memory ({str(err).splitlines()[0][:120]}): try a smaller --dim "
              "(dgm: --ngf, --ndf), --batch-size or --eval-samples, or another --device",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {next_step()}", file=sys.stderr)
        sys.exit(130)


def next_step():
    """How to go on after a run stopped early: --resume, or (no checkpoint yet) anew."""
    if RUN_FOLDER and os.path.exists(os.path.join(RUN_FOLDER, CHECKPOINT)):
        return (f"the last finished task or stage is checkpointed in {RUN_FOLDER}; rerun "
                f"with --resume --out {RUN_FOLDER}")
    return "before the first checkpoint: nothing to resume; " + (
        f"{RUN_FOLDER} holds only this call's first files: delete it or pass another --out"
        if os.path.isdir(RUN_FOLDER or "") and unsaved(RUN_FOLDER) else "rerun the command")


def unsaved(folder):
    """folder's files but args.json and what a run that stopped before its first checkpoint
    leaves (sample grids, partial writes), which the same script's new run replaces."""
    return [f for f in sorted(os.listdir(folder)) if f != "args.json" and not
            re.fullmatch(r"samples_task\d+\.png|.+\.tmp", f)]


# Flags --resume may take anew: where and how this call runs; all others come from args.json.
RUN_FLAGS = ("out", "device", "data_root", "no_download", "log_every", "max_tasks")
PER_CALL = ("resume", "max_tasks")  # belong to one call: never taken from args.json
MAY_CHANGE = (*RUN_FLAGS, *PER_CALL)  # the flags a resumed run may take anew (parse_run_args)


def given_flags(parser, argv=None):
    """{dest: value} of the flags given on the command line (defaults left out)."""
    unset = object()  # argparse keeps what a namespace already has: only given flags change
    ns = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return {k: v for k, v in vars(ns).items() if v is not unset}


def parse_run_args(parser, argv=None, run_flags=(), script=""):
    """parser.parse_args(argv); with --resume the experiment's flags come from args.json (of a
    `script`* run): one given again must keep its value unless in RUN_FLAGS or `run_flags`."""
    global MAY_CHANGE
    args = parser.parse_args(argv)
    if not getattr(args, "resume", False):
        return args
    if args.out is None:
        raise C.UserError("--resume needs --out, the run folder to continue")
    path = os.path.join(args.out, "args.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        raise C.UserError(f"--resume: {args.out} holds no run (no args.json): nothing to resume")
    except (OSError, ValueError) as err:
        raise C.UserError(f"--resume: {path} cannot be read ({type(err).__name__})")
    if not isinstance(old, dict) or not str(old.get("script", script)).startswith(script):
        raise C.UserError(f"--resume: {path} is not the record of a {script}* run ("
                          + (f"a {old['script']} run's" if isinstance(old, dict) else
                             "not a dictionary") + ")")
    try:  # its values read as the command line's are: the flags' own type= and choices
        parser.parse_args([f"{a.option_strings[-1]}={old[a.dest]}" for a in parser._actions if
                           a.nargs != 0 and type(old.get(a.dest)) in (str, int, float)])
    except C.UserError as err:
        raise C.UserError(f"--resume: {path}: {err}")
    given = given_flags(parser, argv)
    MAY_CHANGE = may_change = {*RUN_FLAGS, *PER_CALL, *run_flags}
    changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {given[k]!r}" for k in sorted(old)
               if k in given and k not in may_change and given[k] != old[k]]
    if changed:
        raise C.UserError(f"--resume: the run in {args.out} was made with other settings "
                          f"({'; '.join(changed)}); resume it with its own or use another --out")
    for k, v in old.items():
        if hasattr(args, k) and k not in given and k not in PER_CALL:
            setattr(args, k, v)
    return args


def refuse_unread(parser, argv, rules):
    """rules {dest: (read, when)}: a flag given that this run would not read (read False)
    is refused in one line, rather than recorded in args.json as if it had acted."""
    given = given_flags(parser, argv)
    for k, (read, when) in rules.items():
        if k in given and not read:
            raise C.UserError(f"--{k.replace('_', '-')} acts only {when}; this run would ignore "
                              "it: drop it")


def rng_state():
    """Every random generator's state, so that a resumed run continues bit for bit."""
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), **cuda}


def set_rng_state(state):  # rng_state's inverse
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_run(args, script):
    """The run folder, held with an OS lock (fcntl.flock) until the process ends, so two runs never
    share one: with --resume the one in --out (its checkpoint returned, nothing written), else a new
    one, never written over (an --out holding more than a stopped run of this script's args.json is
    refused), where args.json is written, naming `script`."""
    global RUN_FOLDER, RUN_SCRIPT, RUN_LOCK
    ckpt, path = None, os.path.join(args.out or "", CHECKPOINT)
    if args.resume and not os.path.exists(path):
        raise C.UserError(f"--resume: {path} does not exist (nothing to resume)")
    if RUN_LOCK is not None:  # an earlier run of this process (tests, demo.py): released
        RUN_LOCK = os.close(RUN_LOCK)  # os.close returns None
    try:  # a new folder of its own (atomic, under ./runs without --out) or --out; locked
        os.makedirs("runs" if args.out is None else args.out, exist_ok=True)
        args.out = args.out or tempfile.mkdtemp(dir="runs", prefix=f"{script}-{args.dataset}-s"
                                                f"{args.seed}-{datetime.now():%Y%m%d-%H%M%S}-")
        path, RUN_LOCK = os.path.join(args.out, CHECKPOINT), os.open(args.out, os.O_RDONLY)
        fcntl.flock(RUN_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise C.UserError(f"--out {args.out} is held by a running process (a run, or a Python "
                          "session that ran one); wait for it to end or choose another --out")
    except OSError as err:  # a file, a read-only or full file system, ...
        why = "is a file, not a folder" if os.path.isfile(args.out or "") else (
            f"cannot write there ({type(err).__name__}: {err.strerror or err})")
        raise C.UserError(f"--out {args.out or './runs'}: {why}; pass --out to a writable place")
    others, left = sorted(set(os.listdir(args.out)) - {"args.json"}), unsaved(args.out)
    if args.resume:
        ckpt = load_checkpoint(path)
        if ckpt.get("script", script) != script:
            raise C.UserError(f"--resume: {args.out} is a run of {ckpt['script']}, not of {script}")
        now = json.loads(json.dumps(vars(args)))  # the checkpoint's copy checks args.json
        edited = [f"--{k.replace('_', '-')} {now[k]!r}, checkpoint {v!r}" for k, v in
                  json.loads(json.dumps(ckpt.get("args", {}))).items()
                  if k in now and k not in MAY_CHANGE and now[k] != v]
        if edited:
            raise C.UserError(f"--resume: {args.out}/args.json differs from the run's own "
                              f"record in its checkpoint ({'; '.join(edited)}): restore it")
        for f in [f for f in others if f.endswith(".tmp")]:  # a kill during a save: stale
            os.remove(os.path.join(args.out, f))
            print(f"resume: removed {f}, a partial write of the interrupted run")
    elif os.path.exists(path):
        raise C.UserError(f"{args.out} already holds a run; pass --resume to continue it or "
                          "choose another --out")
    elif left or os.listdir(args.out) and script_of(args.out) != script:
        raise C.UserError(f"--out {args.out} is not empty ({(left or others or ['args.json'])[0]}, "
                          f"no args.json of a stopped {script} run: the user's, another "
                          "script's or an older version's); nothing is overwritten")
    RUN_FOLDER, RUN_SCRIPT = args.out, script
    RUN_INPUTS.clear()
    if not args.resume:  # with --resume, args.json defines the run (parse_run_args)
        C.save_json(os.path.join(args.out, "args.json"), {**vars(args), "script": script})
    return args.out, ckpt


def script_of(folder):
    """The script named by folder/args.json (None: no such file, or not a run's)."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            return json.load(f).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def fingerprint(*tensors):
    """A short hash of tensors' shapes, types and bytes (e.g. a dataset, a state_dict's)."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.flatten().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def run_inputs(ckpt, out, **fps):
    """Record what the run is made of (name=fingerprint, e.g. data=, evaluator=) in every
    checkpoint; on --resume (ckpt given) first refuse inputs other than the run's own."""
    recorded = (ckpt or {}).get("inputs", {})
    for k, v in fps.items():
        if recorded.get(k, v) != v:
            raise C.UserError(f"--resume: {k} fingerprint {v} is not the run's ({recorded[k]} "
                              f"in {out}); a run never mixes two: pass the data root it was "
                              "made with (its args.json) or start a new run")
    RUN_INPUTS.update(fps)


def save_checkpoint(out, state):
    """checkpoint.pt: `state` with every RNG state, the script that wrote it, run_inputs."""
    C.atomic_save(dict(state, rng=rng_state(), script=RUN_SCRIPT, inputs=dict(RUN_INPUTS)),
                  os.path.join(out, CHECKPOINT))


def load_checkpoint(path):
    """A checkpoint dictionary; a missing or unreadable file is one clear UserError."""
    if not os.path.isfile(path):
        raise C.UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict):
            raise ValueError("not a checkpoint dictionary")
        return ckpt
    except Exception as err:
        why = str(err).splitlines()[0][:80] if str(err) else ""
        raise C.UserError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: "
                          f"{why})")


# Divergence that stays finite: beyond bounds no healthy run reaches (largest measured:
# |loss| 1,237, |parameter| 1.53; benchmarks/healthy_bounds.py), divergent ones do (1e13).
LOSS_BOUND, WEIGHT_BOUND = 1e6, 1e4
BLAME = "--lr"  # the flag most likely at fault when training diverges (suspect)


def suspect(args, usual, flags):
    """Set BLAME: the flag of `flags` furthest above its default (in `usual`), else --lr."""
    global BLAME
    ratio = {f: getattr(args, f) / getattr(usual, f) for f in flags
             if getattr(usual, f, None) and getattr(args, f, None)}
    worst = max(ratio, key=ratio.get, default=None)
    BLAME = (f"--{worst.replace('_', '-')} (now {getattr(args, worst):g}, default "
             f"{getattr(usual, worst):g})" if worst and ratio[worst] > 1 else "--lr")


class Progress:
    """A progress line every `every` iterations: losses, it/s, ETA; `update(it, losses)` reads the
    loss tensors (one host sync) only when it prints. NaN/Inf, or a loss tensor beyond LOSS_BOUND,
    stops the run (Diverged); not bounded: penalties (sized by lambda: EWC's 1e9), DGM's s."""

    def __init__(self, total, every, prefix=""):
        self.total, self.every, self.prefix, self.t0 = total, max(1, every), prefix, time.time()

    def update(self, it, losses):
        done = it + 1
        if done % self.every and done != self.total:
            return
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        values = {k: float(v) for k, v in losses.items()}  # the one host sync
        parts = "  ".join(f"{k} {v:+.4f}" for k, v in values.items())
        print(f"{self.prefix}it {done:>6}/{self.total}  {parts}  {rate:6.2f} it/s  "
              f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}", flush=True)
        bad = [f"{k} = {v:g}" for k, v in values.items() if not math.isfinite(v) or (
            torch.is_tensor(losses[k]) and "penalty" not in k and abs(v) > LOSS_BOUND)]
        if bad:  # checked where the values are read anyway: no extra sync in the loop
            raise Diverged(f"{self.prefix}training diverged by iteration {done}: "
                           f"{', '.join(bad)} (NaN/Inf or beyond {LOSS_BOUND:g}, which no "
                           f"healthy run reaches; try a smaller {BLAME}); nothing of this "
                           "stage was evaluated or saved, earlier checkpoints are unchanged")


def check_finite(module, where):
    """Diverged if `module`'s float state is NaN/Inf or a parameter is beyond WEIGHT_BOUND."""
    ts = [v for v in module.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()]
    big = [p.detach().abs().max() > WEIGHT_BOUND for p in module.parameters() if p.numel()]
    if ts and not bool(torch.stack([torch.isfinite(v).all() for v in ts]
                                   + [~b for b in big]).all()):
        raise Diverged(f"{where}: the weights hold NaN/Inf or values beyond {WEIGHT_BOUND:g} "
                       f"(those of healthy runs stay below 2; try a smaller {BLAME}); nothing "
                       "of it was evaluated or saved, earlier checkpoints are unchanged")


def setup(args, script, digits="pad", load=None):
    """A sequential script's device, seed, data on the device, tasks, run folder (or checkpoint to
    resume) and evaluator. `digits`: 28 -> 32 px; `load`: e.g. mergan_lsun.load_dataset."""
    device = C.pick_device(args.device)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.type == "cuda" else ""), flush=True)
    C.seed_everything(args.seed)
    size, download = args.image_size, not args.no_download
    if args.mnist_train != 60000 and args.dataset != "mnist":
        raise C.UserError(f"--mnist-train is read with --dataset mnist only, not {args.dataset}")
    load = load or C.load_dataset
    x, y, names = load(args.dataset, args.data_root, True, size, download, digits, args.mnist_train)
    tx, ty, _ = load(args.dataset, args.data_root, False, size, download, digits)
    if len(names) < 2:  # an evaluator of one class would score 100% whatever G draws
        raise C.UserError(f"{args.dataset} in {args.data_root}: {len(names)} class found; the "
                          "class-incremental scripts need at least 2 (one sub-folder per class)")
    tasks = C.task_split(args.classes, len(names), args.classes_per_task)
    out, ckpt = prepare_run(args, script)
    run_inputs(ckpt, out, data=fingerprint(x, y, tx, ty))
    print(f"{args.dataset}: {len(y)} train / {len(ty)} test images {tuple(x.shape[1:])}; "
          f"tasks {tasks}; run folder {out}", flush=True)
    train, test = C.TaskData(x, y, device), C.TaskData(tx, ty, device)
    prep = f"-{digits}" if args.dataset in ("mnist", "fashion") and digits != "pad" else ""
    evaluator, evaluator_acc = C.get_evaluator(args, train, test, len(names), device, prep=prep)
    run_inputs(ckpt, out, evaluator=fingerprint(*evaluator.state_dict().values()))
    return argparse.Namespace(device=device, train=train, test=test, tasks=tasks, out=out,
                              ckpt=ckpt, evaluator=evaluator, evaluator_acc=evaluator_acc,
                              n_classes=len(names), channels=x.shape[1], image_size=x.shape[-1])


class TaskRun:
    """Bookkeeping around a script's own loop, `for t in run.remaining_tasks(): train_task(t, ...);
    run.end_task(t)`, then `run.finish(paper)`. `models`, `extra` (plain data, also in metrics.json)
    are checkpointed; `measure(seen)` -> {class: Acc %} replaces generated_accuracy."""

    def __init__(self, args, env, method, models, generate, nz=128, extra=None, measure=None):
        self.args, self.env, self.method, self.models = args, env, method, models
        self.generate, self.nz, self.measure = generate, nz, measure
        self.extra = {} if extra is None else extra
        self.R, self.class_acc, self.seconds, self.start = [], {}, 0.0, 0
        self.metrics, self.fields = None, {}  # metrics.json, and fields added to it
        if env.ckpt is not None:
            try:
                for name, module in models.items():
                    module.load_state_dict(env.ckpt["models"][name])
                self.extra.update(env.ckpt.get("extra", {}))
                self.R, self.class_acc = env.ckpt["R"], env.ckpt["class_acc"]
                self.seconds, self.start = env.ckpt["seconds"], env.ckpt["task"] + 1
                set_rng_state(env.ckpt["rng"])
            except (KeyError, RuntimeError) as err:  # another version's or a damaged file
                raise C.UserError(f"--resume: the checkpoint in {env.out} does not fit these "
                                  f"networks or lacks a part ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:80]})")
            print(f"resuming after task {self.start}/{len(env.tasks)} from {env.out}", flush=True)
        self.all_classes = [c for task in env.tasks for c in task]
        g = torch.Generator().manual_seed(1234)
        self.z_grid = torch.randn(10, nz, generator=g).to(env.device)  # the grids' noise
        T = len(env.tasks)  # --max-tasks: this call stops early
        self.stop = min(T, self.start + (args.max_tasks or T))

    def remaining_tasks(self):
        """The tasks this call trains: the first unfinished one on (--max-tasks of them)."""
        for t in range(self.start, self.stop):
            self.t0 = time.time()
            yield t

    def end_task(self, t):
        """After task t: refuse NaN/Inf weights; Acc of every class seen so far (row t of the
        accuracy matrix R); the sample grid; the checkpoint, then metrics.json."""
        tasks, args = self.env.tasks, self.args
        for name, module in self.models.items():  # never evaluate or save diverged weights
            check_finite(module, f"[task {t + 1}/{len(tasks)}] {name}")
        seen = [c for task in tasks[:t + 1] for c in task]
        acc = (self.measure(seen) if self.measure else C.generated_accuracy(
            self.generate, self.env.evaluator, seen, args.eval_samples, self.nz, self.env.device))
        for c in seen:  # per-class history, None before the class is seen
            self.class_acc.setdefault(str(c), [None] * t).append(acc[c])
        self.R.append([float(np.mean([acc[c] for c in task])) for task in tasks[:t + 1]]
                      + [None] * (len(tasks) - t - 1))
        C.class_grid(self.generate, self.all_classes, seen, self.z_grid,
                     os.path.join(self.env.out, f"samples_task{t + 1}.png"))
        self.seconds += time.time() - self.t0
        print(f"[task {t + 1}/{len(tasks)}] Acc per task: "
              + " ".join(f"{v:.1f}" for v in self.R[t][:t + 1]) + f"  avg "
              f"{np.mean(self.R[t][:t + 1]):.2f}%  ({time.time() - self.t0:.0f}s)", flush=True)
        save_checkpoint(self.env.out, {  # first: metrics.json is never a task ahead of it
            "task": t, "models": {k: m.state_dict() for k, m in self.models.items()},
            "R": self.R, "class_acc": self.class_acc, "seconds": self.seconds,
            "extra": self.extra, "args": vars(args)})
        self.write_metrics(tasks_done=t + 1)

    def write_metrics(self, seconds=0.0, **fields):
        """(Re)write metrics.json; `seconds` joins the run's time, `fields` the file."""
        self.seconds += seconds
        self.fields.update(fields)
        env, tasks = self.env, self.env.tasks
        self.metrics = {"method": self.method, "dataset": self.args.dataset,
                        "classes": [c for task in tasks for c in task], "tasks": tasks,
                        "acc_matrix": self.R, **C.acc_summary(self.R),
                        "evaluator_test_acc": env.evaluator_acc, "device": str(env.device),
                        "seconds": self.seconds, "args": vars(self.args),
                        "class_acc": self.class_acc, **self.extra, **self.fields}
        C.save_json(os.path.join(env.out, "metrics.json"), self.metrics)
        return self.metrics

    def finish(self, paper=None):
        """After the loop: the GIF and the accuracy table (`paper` = {task count: average
        accuracy} beside ours). metrics.json's dict, or None if --max-tasks stopped early."""
        tasks, args, out = self.env.tasks, self.args, self.env.out
        if self.stop < len(tasks):
            print(f"stopped after task {self.stop}/{len(tasks)} (--max-tasks); continue with "
                  f"--resume --out {out}", flush=True)
            return None
        if self.metrics is None:  # resumed after the last task: nothing was trained
            self.write_metrics(tasks_done=len(tasks))
        C.save_gif([imageio.imread(os.path.join(out, f"samples_task{t + 1}.png"))
                    for t in range(len(tasks))], os.path.join(out, "samples.gif"))
        m = self.metrics
        header = (["after task"] + [",".join(map(str, task)) for task in tasks] + ["avg"]
                  + (["paper avg"] if paper else []))
        rows = [[t + 1] + self.R[t] + [m["avg_acc"][t]] + ([paper.get(t + 1)] if paper else [])
                for t in range(len(tasks))]
        print(f"\n{self.method} on {args.dataset}: generated-sample accuracy (%) by the "
              f"evaluator (real test accuracy {self.env.evaluator_acc:.2f}%), "
              f"{args.eval_samples} samples/class\n{C.fmt_table(header, rows)}\nforgetting (avg) "
              f"{m['avg_forgetting']:.2f}  BWT {m['bwt']:.2f}  training+eval time "
              f"{self.seconds:.0f}s  -> {out}/metrics.json", flush=True)
        return m
