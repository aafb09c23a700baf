"""The Table 1 command (benchmarks/table1.py) at tiny budgets on the CPU: every column runs,
the table and the accuracy-matrix pictures are written, and a second call resumes."""
import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "benchmarks", "table1.py")
LABELS = ("JT", "SFT", "EWC", "DGR", "MeRGAN-JTR", "MeRGAN-RA", "DGM-w", "DGM-a")


def table_argv(data_root, out, *extra):
    return ["--dataset", "synth", "--data-root", data_root, "--classes", "0,1", "--iters", "2",
            "--dgm-iters", "2", "--eval-samples", "10", "--device", "cpu", "--mergan-args",
            "--dim 8", "--ewc-args", "--fisher-samples 4", "--out", str(out), *extra]


def table(data_root, out, *extra):
    return subprocess.run([sys.executable, TABLE, *table_argv(data_root, out, *extra)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_table_runs_every_column_and_reports_beside_the_paper(data_root, tmp_path):
    out = tmp_path / "t1"
    res = table(data_root, out, "--jobs", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    md = (out / "table1.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == list(LABELS)
    assert "| Acc after 2 tasks, ours |" in md and "| A_2 (solver on real test data), ours |" in md
    # the paper's Table 1 values, e.g. MNIST JTR 97.93 / 97.00 and EWC 70.62 / 77.03
    assert "| paper | JT | SFT | EWC | DGR | MeRGAN-JTR | MeRGAN-RA |" in md
    assert "| MNIST, Acc after 5 tasks | 97.66 | 19.87 | 70.62 | 90.39 | 97.93 | 98.19 |" in md
    assert "| SVHN, Acc after 10 tasks | 84.82 | 10.10 | 33.02 | 47.28 | 66.50 | 66.78 |" in md
    assert "Cumulative" not in md  # not a default column
    assert md in res.stdout  # printed too
    summary = json.load(open(out / "table1.json"))
    assert set(summary["runs"]) == {f"seed0/{n}" for n in ("jt2", "sft", "ewc", "dgr", "jtr",
                                                            "ra", "dgmw", "dgma")}
    for rid, entry in summary["runs"].items():
        m = json.load(open(out / rid / "metrics.json"))
        assert entry["avg_acc"] == m["avg_acc"]  # the table reads the runs' own numbers
        assert f"{m['avg_acc'][-1]:.2f}" in md
        img = imageio.imread(out / f"acc_matrix_{rid.split('/')[1]}.png")
        assert img.ndim == 3 and img.shape[0] > 60
    # JT after 2 tasks is ONE run on classes 0 and 1 at once, with the sequential runs'
    # budget up to task 2 (2 tasks x 2 iterations)
    jt = json.load(open(out / "seed0" / "jt2" / "metrics.json"))
    assert jt["tasks"] == [[0, 1]] and jt["args"]["iters"] == 4 and jt["method"] == "mergan-jt"
    assert summary["columns"]["jt"]["acc_after"] == {"2": {
        "mean": jt["avg_acc"][0], "sd": None, "n": 1, "seeds": {"0": jt["avg_acc"][0]}}}
    assert (out / "solver_matrix_dgr.png").exists() and summary["runs"]["seed0/dgr"]["A"]
    assert (out / "solver_matrix_dgmw.png").exists()
    assert (out / "solver_matrix_dgma.png").exists()

    # A second call finds every run finished: it starts no run and prints the same table.
    again = table(data_root, out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(" done\n") == 8
    for col in ("sft", "dgmw"):
        assert open(out / "seed0" / f"{col}.log").read().count("$ ") == 1  # launched once


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_table_resumes_an_interrupted_run(data_root, tmp_path):
    out = tmp_path / "t1"
    # an SFT run of this table, stopped after its first task: the table had written its
    # table1-args.json first, then started the run
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    os.makedirs(out)
    table1.check_settings(table1.parse_args(table_argv(data_root, out, "--columns", "sft")))
    first = subprocess.run(
        [sys.executable, os.path.join(ROOT, "mergan_jtr.py"), "--mode", "sft", "--dataset",
         "synth", "--data-root", data_root, "--seed", "0", "--device", "cpu",
         "--eval-samples", "10", "--out", str(out / "seed0" / "sft"), "--classes", "0,1",
         "--iters", "2",
         "--dim", "8", "--max-tasks", "1"], capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    res = table(data_root, out, "--columns", "sft")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "seed0/sft   SFT" in res.stdout and "resume" in res.stdout
    assert "resuming after task 1/2" in (out / "seed0" / "sft.log").read_text()
    assert json.load(open(out / "seed0" / "sft" / "metrics.json"))["tasks_done"] == 2
    # the folder now holds a table of this budget: another budget is refused, in one line,
    # instead of reporting the finished 2-iteration runs as the new table
    other = table(data_root, out, "--columns", "sft", "--eval-samples", "20")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "holds a table made with other settings (eval_samples 10 -> 20)" in other.stderr


def test_jt_runs_one_per_reported_task_count():
    """The paper's JT after t tasks is one run on the first t classes at once: a 10-task
    table runs jt5 (classes 0-4) and jt10 (0-9); the cumulative run is no JT column."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    args = table1.parse_args(["--dataset", "mnist", "--out", "/nonexistent/t"])
    assert [r for r in table1.runs_of(args) if r[1] == "jt"] == [("jt5", "jt"), ("jt10", "jt")]
    assert "cumulative" not in args.columns
    cmd = table1.run_command(args, 0, "jt5", "jt", False)
    assert cmd[cmd.index("--classes") + 1] == "0,1,2,3,4" and "--iters" not in cmd  # 40001
    args = table1.parse_args(["--dataset", "mnist", "--iters", "200", "--classes",
                              "3,1,4,0,2,5", "--out", "/nonexistent/t"])
    assert [r[0] for r in table1.runs_of(args)][:2] == ["jt5", "jt6"]
    cmd = table1.run_command(args, 7, "jt5", "jt", False)
    assert cmd[cmd.index("--classes") + 1] == "3,1,4,0,2"
    assert cmd[cmd.index("--seed") + 1] == "7" and cmd[cmd.index("--out") + 1].endswith(
        os.path.join("t", "seed7", "jt5"))
    assert cmd[cmd.index("--iters") + 1] == "1000"  # 5 tasks x 200: the same budget
    cmd = table1.run_command(args, 0, "sft", "sft", False)
    assert cmd[cmd.index("--classes") + 1] == "3,1,4,0,2,5" and "--mode" in cmd


def test_table_user_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, TABLE, "--columns", "jt,xyz", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: --columns")
    assert len(res.stderr.strip().splitlines()) == 1
    # DGM is not on MeRGAN's Table 2 (LSUN); DGR is (Acc 15.40, Rev acc 26.17, FID 93.70)
    res = subprocess.run([sys.executable, TABLE, "--dataset", "lsun", "--columns", "sft,dgma",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "--columns dgmw/dgma on lsun" in res.stderr
    assert "sft,ewc,dgr,jtr,ra" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_table_refuses_what_it_would_misreport_and_folders_not_its_own(tmp_path):
    """Each case one line, exit 2, nothing written: --jobs 0; a pass-through that sets what
    the table sets for every run (the table would report its own --seed, or end with 'the
    same command continues them' for runs it cannot find); a quote left open; an --out
    holding the user's own files (never overwritten) or that is a file."""
    tiny = ["--columns", "sft", "--classes", "0,1", "--iters", "1", "--eval-samples", "4",
            "--mergan-args", "--dim 4"]  # were a check ever broken: seconds, not hours

    def refused(*argv, match):
        res = subprocess.run([sys.executable, TABLE, "--dataset", "synth", "--device", "cpu",
                              *tiny, *argv], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert match in res.stderr, res.stderr

    out = str(tmp_path / "t")
    refused("--jobs", "0", "--out", out, match="--jobs: must be at least 1, got 0")
    refused("--mergan-args", "--dim 8 --seed 7", "--out", out,
            match="--mergan-args: --seed is set by the table for every run")
    refused("--ewc-args", "--out=elsewhere", "--out", out,
            match="--ewc-args: --out is set by the table for every run")
    refused("--dgm-args", "--iters 5", "--out", out, match="--dgm-args: --iters is set")
    refused("--mergan-args", "--dim '8", "--out", out, match="No closing quotation")
    assert not os.path.exists(out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table1.md").write_text("my notes")
    refused("--out", str(mine), match="is not a table's folder")
    refused("--out", str(mine / "table1.md"), match="is not a table's folder")
    assert os.listdir(mine) == ["table1.md"] and (mine / "table1.md").read_text() == "my notes"


def test_pass_through_values_may_start_with_a_dash():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    args = table1.parse_args(["--mergan-args", "--plain-step", "--dgm-args", "--keep-d"])
    assert (args.mergan_args, args.dgm_args) == ("--plain-step", "--keep-d")


def children_of(pid):
    """Pids of the processes whose parent is pid (Linux /proc)."""
    kids = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                if p.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p))
        except OSError:
            pass
    return kids


def alive(pid):
    """Running (a zombie, dead and not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and "
                    "/proc are Linux's; elsewhere only a Ctrl-C of the command stops its runs")
def test_a_killed_table_command_takes_its_runs_with_it(data_root, tmp_path):
    """SIGKILL of the table command (no `finally` runs) once left its runs going on as
    orphans, writing into --out; and while one command runs, a second on the same --out is
    refused in one line (it would run the same runs twice at once)."""
    import signal
    import time
    out = tmp_path / "t"
    argv = [sys.executable, TABLE, *table_argv(data_root, out, "--columns", "sft", "--iters",
                                                "100000")]
    table_cmd = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    t0, kids = time.time(), []
    try:
        while time.time() - t0 < 120 and not kids:  # the run has started (after exec)
            kids = [k for k in children_of(table_cmd.pid)
                    if b"mergan_jtr.py" in open(f"/proc/{k}/cmdline", "rb").read()]
            time.sleep(0.2)
        assert kids, "the sft run never started"
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"another table command (pid {table_cmd.pid}) is running" in res.stderr
        table_cmd.send_signal(signal.SIGKILL)
        table_cmd.wait()
        t0 = time.time()
        while time.time() - t0 < 20 and alive(kids[0]):
            time.sleep(0.2)
        assert not alive(kids[0]), "the run outlived the table command"
    finally:
        table_cmd.kill()
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)


@pytest.mark.slow  # the slow tier: two table calls, two runs
def test_seeds_give_mean_and_sd_and_a_table_gains_seeds(data_root, tmp_path):
    """--seeds runs each column once per seed (seed<k>/) and prints mean ± sample sd (n);
    a one-seed table called again with more seeds keeps its finished run and adds the
    others; the heatmap is drawn from the mean matrix."""
    out = tmp_path / "t1"
    budget = ("--iters", "40", "--mergan-args", "--dim 8 --lr 1e-3")  # seeds 0, 1 differ here
    one = table(data_root, out, "--columns", "sft", "--seeds", "1", *budget)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-2000:]
    assert "seed 1" in (out / "table1.md").read_text()
    res = table(data_root, out, "--columns", "sft", "--seeds", "0,1", *budget)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "seed1/sft   SFT                    done" in res.stdout
    assert open(out / "seed1" / "sft.log").read().count("$ ") == 1  # not run again
    m = [json.load(open(out / f"seed{s}" / "sft" / "metrics.json")) for s in (0, 1)]
    assert [x["args"]["seed"] for x in m] == [0, 1]
    accs = [x["avg_acc"][-1] for x in m]
    assert accs[0] != accs[1]  # two equal values would give sd 0 whatever its formula
    mean, sd = sum(accs) / 2, abs(accs[0] - accs[1]) / 2 ** 0.5  # sample sd of two values
    md = (out / "table1.md").read_text()
    assert f"| Acc after 2 tasks, ours | {mean:.2f} ± {sd:.2f} (n=2) |" in md, md
    assert "seeds 0, 1: mean ± sample sd" in md
    cell = json.load(open(out / "table1.json"))["columns"]["sft"]["acc_after"]["2"]
    assert cell["n"] == 2 and abs(cell["mean"] - mean) < 1e-9 and abs(cell["sd"] - sd) < 1e-9
    assert cell["seeds"] == {"0": accs[0], "1": accs[1]}
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    assert table1.mean_matrix([x["acc_matrix"] for x in m])[1][0] == (
        m[0]["acc_matrix"][1][0] + m[1]["acc_matrix"][1][0]) / 2
    assert imageio.imread(out / "acc_matrix_sft.png").ndim == 3


def mnist_args(*extra):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    return table1, table1.parse_args(["--dataset", "mnist", "--out", "/nonexistent/t",
                                      "--check", *extra])


def test_check_refuses_a_protocol_that_is_not_the_papers(tmp_path):
    """--check names every way the table departs from Table 1's protocol -- tasks, budget,
    generated samples, a training subset, flags that change the model -- and accepts the
    paper's own (flags of the run only, such as --log-every, change nothing)."""
    table1, args = mnist_args()
    assert table1.protocol_problems(args, 60000) == []
    assert table1.protocol_problems(args, 55000) == []  # the authors' TF split
    table1, args = mnist_args("--iters", "8001", "--mergan-args", "--log-every 50 --plain-step")
    assert table1.protocol_problems(args, 60000) == []  # issue #4's budget; how it runs
    table1, args = mnist_args("--iters", "4001")  # JT would get 4001 x 5, not joint.py's 40001
    assert table1.protocol_problems(args, 60000) == [
        "jt5 would train 20005 iterations (the authors' joint.py: 40001; --jt-iters sets it)"]
    table1, args = mnist_args("--iters", "4001", "--jt-iters", "40001")
    assert table1.protocol_problems(args, 60000) == []
    table1, args = mnist_args("--classes", "0,1,2,3,4", "--iters", "200", "--eval-samples",
                              "320", "--mergan-args", "--dim 16 --lr 1e-3")
    why = "; ".join(table1.protocol_problems(args, 5000))
    for part in ("--classes 0,1,2,3,4", "--iters 200 (the authors: 4001 per task)",
                 "--eval-samples 320", "5000 training images",
                 "--mergan-args changes --dim 32 -> 16, --lr 0.0001 -> 0.001"):
        assert part in why, why
    # end to end: refused in one line before anything is written or run
    out = tmp_path / "t"
    for argv, match in ((["--dataset", "synth", "--classes", "0,1"], "no table on synth"),
                        (["--dataset", "lsun", "--columns", "sft"], "10-way LSUN evaluator"),
                        (["--dataset", "mnist", "--iters", "5"], "--iters 5")):
        res = subprocess.run([sys.executable, TABLE, *argv, "--check", "--out", str(out)],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "not the paper's protocol" in res.stderr and match in res.stderr, res.stderr
    assert not out.exists()
    # a folder of the one-seed layout (runs directly in it) is refused, not mixed in
    old = tmp_path / "old"
    old.mkdir()
    (old / "table1-args.json").write_text(json.dumps({"seed": 0, "dataset": "mnist"}))
    _, args = mnist_args("--out", str(old))
    with pytest.raises(table1.C.UserError, match="a table of an earlier table1.py"):
        table1.check_settings(args)


def test_check_compares_each_cell_with_the_paper():
    """Within the seeds' spread (|ours - paper| <= 2 sd), how far off, or one seed."""
    table1, args = mnist_args("--columns", "sft,jtr,ra,dgmw")

    def cell(mean, sd, n):
        return {"mean": mean, "sd": sd, "n": n, "seeds": {}}
    cells = {"jtr": {"acc_after": {5: cell(97.5, 0.3, 3), 10: cell(90.0, 1.0, 3)}},
             "ra": {"acc_after": {5: cell(98.19, 0.0, 2), 10: cell(96.0, 0.0, 2)}},
             "sft": {"acc_after": {5: cell(20.5, None, 1)}},
             "dgmw": {"acc_after": {5: cell(90.0, 1.0, 3)}}}  # no paper value: not checked
    text = "\n".join(table1.check_lines(args, cells))
    assert ("| MeRGAN-JTR | 5 | 97.50 ± 0.30 (n=3) | 97.93 | -0.43 | within 2 sd of the "
            "seeds |") in text  # 0.43 <= 0.6
    assert "| MeRGAN-JTR | 10 | 90.00 ± 1.00 (n=3) | 97.00 | -7.00 | off by 7.0 sd |" in text
    assert "| MeRGAN-RA | 5 | 98.19 ± 0.00 (n=2) | 98.19 | +0.00 | within 2 sd" in text
    assert "| MeRGAN-RA | 10 | 96.00 ± 0.00 (n=2) | 97.01 | -1.01 | off (the seeds agree" in text
    assert "| SFT | 5 | 20.50 ± — (n=1) | 19.87 | +0.63 | one seed, no spread" in text
    assert "DGM" not in text
    assert "2 of 5 cells within 2 sd of the paper's value." in text


def fake_metrics(seed, tasks, acc, iters=5):
    """A finished run's metrics.json as the scripts write it (the fields report() reads)."""
    T = len(tasks)
    R = [[acc + t + seed if i <= t else None for i in range(T)] for t in range(T)]
    return {"tasks": tasks, "tasks_done": T, "acc_matrix": R, "solver_acc_matrix": R,
            "avg_acc": [sum(r[:t + 1]) / (t + 1) for t, r in enumerate(R)], "A": [50.0] * T,
            "avg_forgetting": 1.0 + seed, "evaluator_test_acc": 99.0, "seconds": 10.0,
            "class_acc": {str(c): [acc + seed] for task in tasks for c in task},
            "args": {"eval_samples": 10, "iters": iters, "seed": seed}}


def test_report_of_partial_seeds_and_lsuns_table_2(tmp_path):
    """The table from whatever finished: a column one seed lacks is the mean of the others
    (n says how many), JT's iterations come from any seed that has the run; on LSUN the
    paper's Table 2 Acc stands beside ours with the 4-way evaluator's caveat."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    args = table1.parse_args(["--dataset", "mnist", "--classes", "0,1", "--columns",
                              "jt,sft", "--seeds", "0,1", "--out", str(tmp_path / "m")])
    os.makedirs(args.out)
    results = {"seed0/sft": fake_metrics(0, [[0], [1]], 80.0),
               "seed1/sft": fake_metrics(1, [[0], [1]], 80.0),
               "seed1/jt2": fake_metrics(1, [[0, 1]], 90.0, iters=40)}  # seed 0's JT unfinished
    md = table1.report(args, results, "cpu")
    assert "| Acc after 2 tasks, ours | 91.00 ± — (n=1) | 81.50 ± 0.71 (n=2) |" in md, md
    assert "| iterations per task (JT: of its one task) | 40 (2 classes) | 5 |" in md
    assert "| forgetting (avg, points) | — (one task) | 1.50 ± 0.71 (n=2) |" in md
    tasks = [[0], [1], [2], [3]]
    lsun = table1.parse_args(["--dataset", "lsun", "--columns", "sft,dgr,jtr", "--out",
                              str(tmp_path / "l")])
    os.makedirs(lsun.out)
    md = table1.report(lsun, {"seed0/sft": fake_metrics(0, tasks, 20.0),
                              "seed0/dgr": fake_metrics(0, tasks, 20.0),
                              "seed0/jtr": fake_metrics(0, tasks, 70.0)}, "cpu")
    assert ("| Acc after 4 tasks, paper's Table 2 (a 10-way evaluator) | 15.02 | 15.40 | "
            "79.19 |") in md
    assert "our evaluator classifies the 4 scenes of the tasks (chance 25%)" in md


def test_lsun_table_reads_lsun_through_the_mergan_reader(lsun_root, tmp_path, monkeypatch):
    """Table 2's evaluator data comes from mergan_lsun's lmdb reader (common.load_dataset
    refuses lsun), and DGM's columns are refused on lsun in one line."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import common as C
    import table1
    with pytest.raises(C.UserError, match="dgmw/dgma on lsun"):
        table1.parse_args(["--dataset", "lsun", "--columns", "sft,dgmw"])
    args = table1.parse_args(["--dataset", "lsun", "--data-root", lsun_root, "--columns",
                              "sft", "--out", str(tmp_path), "--device", "cpu"])
    seen = {}

    def fake_evaluator(a, train, test, n_classes, device, log):
        seen.update(train=len(train.y), test=len(test.y), classes=n_classes,
                    size=train.x.shape[-1])
        return None, 50.0
    monkeypatch.setattr(C, "get_evaluator", fake_evaluator)
    table1.prepare_evaluator(args)
    assert seen == {"train": 24, "test": 12, "classes": 4, "size": 64}


def test_teaching_budget_sets_defaults_that_explicit_flags_override():
    """--budget teaching: 400 iterations per task, 320 images per class, width 16 at lr 1e-3
    for the MeRGAN family (JT: 400 x its tasks), DGM at the authors' epochs; a flag given
    explicitly wins; --budget paper is the authors' (the scripts' defaults)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import mergan_jtr
    import table1
    base = ["--dataset", "mnist", "--classes", "0,1,2,3,4", "--out", "/nonexistent/t"]
    args = table1.parse_args(base + ["--budget", "teaching"])
    assert (args.iters, args.eval_samples, args.mergan_args) == (400, 320, "--dim 16 --lr 1e-3")
    sft = table1.run_command(args, 0, "sft", "sft", False)
    a = mergan_jtr.parse_args(sft[2:])
    assert (a.iters, a.eval_samples, a.dim, a.lr, a.mode) == (400, 320, 16, 1e-3, "sft")
    jt = table1.run_command(args, 0, "jt5", "jt", False)
    assert jt[jt.index("--iters") + 1] == "2000"
    dgm = table1.run_command(args, 0, "dgmw", "dgmw", False)
    assert "--iters" not in dgm and "--dim" not in dgm  # the authors' epochs and widths
    assert dgm[dgm.index("--to-32px") + 1] == "pad"  # MeRGAN's padded digits, one evaluator
    synth = table1.parse_args(["--dataset", "synth", "--out", "/nonexistent/t"])
    assert "--to-32px" not in table1.run_command(synth, 0, "dgma", "dgma", False)  # 32 px
    args = table1.parse_args(base + ["--budget", "teaching", "--iters", "100", "--eval-samples",
                                     "64", "--mergan-args", "--dim 32"])
    a = mergan_jtr.parse_args(table1.run_command(args, 0, "ra", "sft", False)[2:])
    assert (a.iters, a.eval_samples, a.dim, a.lr) == (100, 64, 32, 1e-3)
    paper = table1.parse_args(base)
    assert (paper.iters, paper.eval_samples, paper.mergan_args) == (None, 6400, "")
    table1, checked = mnist_args("--budget", "teaching")
    assert "--iters 400" in "; ".join(table1.protocol_problems(checked, 60000))


def test_runs_share_the_cpu_one_thread_each_unless_the_user_says():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    args = table1.parse_args(["--dataset", "mnist", "--device", "cpu", "--out", "/x/t"])
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    cores = len(os.sched_getaffinity(0))
    try:
        saved, os.environ = os.environ, env
        assert table1.run_env(args, 2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
        assert "OMP_NUM_THREADS" not in table1.run_env(args, 1)  # one run: torch's own
        env["OMP_NUM_THREADS"] = "3"
        assert table1.run_env(args, 2)["OMP_NUM_THREADS"] == "3"  # the user's wins
    finally:
        os.environ = saved


def grid_of_classes(classes, shade, size=32):
    """A run's samples_task<T>.png as common.class_grid draws it: one row per class, ten
    images; here every image of class c is the flat grey shade[c]."""
    import torch
    sys.path.insert(0, ROOT)
    import common as C
    x = torch.cat([torch.full((10, 1, size, size), shade[c] * 2 - 1) for c in classes])
    return C.image_grid(x, nrow=10)


def test_report_rebuilds_a_committed_table_with_its_commits_and_gallery(tmp_path):
    """--report FOLDER: the table again from the small files a results folder keeps (no
    checkpoint, nothing run); the commit each run was started at, from its log; the gallery
    holds, per column, the image of each class after the last task, from the right cell
    whatever the image size (seed 0: 64 px)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    out = tmp_path / "committed"
    args = table1.parse_args(["--dataset", "mnist", "--classes", "0,1", "--columns", "sft",
                              "--seeds", "0,1", "--budget", "teaching", "--out", str(out)])
    os.makedirs(out)
    table1.check_settings(args)
    shade = {0: 0.2, 1: 0.8}
    for s in (0, 1):
        run = out / f"seed{s}" / "sft"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(fake_metrics(s, [[0], [1]], 80.0)))
        imageio.imwrite(run / "samples_task2.png", grid_of_classes([0, 1], shade, 64 - 48 * s))
        (out / f"seed{s}" / "sft.log").write_text("# code abc123\n$ python ...\n")
    res = subprocess.run([sys.executable, TABLE, "--report", str(out)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    md = (out / "table1.md").read_text()
    assert "| Acc after 2 tasks, ours | 81.50 ± 0.71 (n=2) |" in md, md
    assert "Code: every run at commit abc123." in md
    assert json.load(open(out / "table1.json"))["runs"]["seed1/sft"]["code"] == ["abc123"]
    g = imageio.imread(out / "forgetting.png")
    cell, left, top = 68, 110, 24  # draw_gallery's layout at scale 2
    for i, c in enumerate((0, 1)):
        centre = g[top + cell // 2, left + i * cell + cell // 2]
        assert abs(int(centre[0]) - round(255 * shade[c])) <= 1, (c, centre)
    # a run resumed at another commit: the table says so
    with open(out / "seed1" / "sft.log", "a") as f:
        f.write("# code def456\n")
    res = subprocess.run([sys.executable, TABLE, "--report", str(out)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert "runs are at several commits" in (out / "table1.md").read_text()
    again = subprocess.run([sys.executable, TABLE, f"--report={out}"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "runs are at several commits" in again.stdout
    abbrev = subprocess.run([sys.executable, TABLE, "--rep", str(out)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)  # never a table run instead
    assert abbrev.returncode == 2 and "unrecognized arguments" in abbrev.stderr
    bad = subprocess.run([sys.executable, TABLE, "--report", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "no readable table1-args.json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_table_misuse_ends_in_one_line_or_the_right_behaviour(tmp_path):
    """Issue 37's table cases: each a one-line refusal (exit 2) or the right behaviour."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import table1
    C = table1.C

    def one_line(*argv, match):
        res = subprocess.run([sys.executable, TABLE, *argv], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert match in res.stderr, res.stderr
        return res
    out = str(tmp_path / "t")
    one_line("--classes", "a,b", "--out", out, match="--classes")
    one_line("--columns", "sft,sft", "--out", out, match="twice")
    one_line("--jt-iters", "0", "--out", out, match="--jt-iters")
    one_line("--columns", "sft", "--mergan-args", "--mode jtr", "--out", out,
             match="--mode is set by the table")
    one_line("--columns", "dgmw", "--dgm-args", "--variant a", "--out", out,
             match="--variant is set by the table")
    assert not os.path.exists(out)
    # --jt-iters is read when given, not only when non-zero
    args = table1.parse_args(["--dataset", "mnist", "--iters", "3", "--jt-iters", "7",
                              "--out", "/x/t"])
    assert table1.jt_iterations(args, 5) == 7
    # a truncated table1-args.json of a table that has runs: one line, no JSONDecodeError
    os.makedirs(out)
    with open(os.path.join(out, "table1-args.json"), "w") as f:
        f.write('{"dataset": "mn')
    os.makedirs(os.path.join(out, "seed0", "sft"))
    open(os.path.join(out, "seed0", "sft", "args.json"), "w").write("{}")  # a run began
    one_line("--dataset", "synth", "--classes", "0,1", "--out", out, match="not readable JSON")
    # a table that never started a run (it failed before any, e.g. on missing data) takes
    # the corrected command's settings instead of refusing them
    empty = tmp_path / "e"
    first = table1.parse_args(["--dataset", "mnist", "--iters", "5", "--out", str(empty)])
    os.makedirs(first.out)
    table1.check_settings(first)
    fixed = table1.parse_args(["--dataset", "mnist", "--iters", "6", "--out", str(empty)])
    table1.check_settings(fixed)
    assert json.load(open(empty / "table1-args.json"))["iters"] == 6
    os.makedirs(empty / "seed0" / "sft")  # a run launched that died in argparse: not begun
    table1.check_settings(first)
    (empty / "seed0" / "sft" / "args.json").write_text("{}")  # begun: settings are kept
    with pytest.raises(C.UserError, match="other settings"):
        table1.check_settings(fixed)
    # an --out that cannot be written (read-only to every user, root included): one line
    one_line("--dataset", "synth", "--classes", "0,1", "--out", "/proc/no/t",
             match="cannot write there")
