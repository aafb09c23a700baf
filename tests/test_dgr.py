"""Tests of DGR (dgr.py): Acc through the solver's labels, the losses, the replay and its
labels, end to end on synth, resume. DGR beside SFT at the demo budget: the slow
tests/test_mergan.py::test_sft_forgets_the_first_class_while_ra_jtr_and_dgr_keep_it."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import dgr
import taskrun as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synth", "--classes", "0,1,2", "--iters", "3", "--dim", "8",
        "--eval-samples", "16", "--device", "cpu", "--log-every", "2"]


def run_script(*args, timeout=600):
    r = subprocess.run([sys.executable, "dgr.py", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


# ---------------------------------------------------------------- Acc of an unconditional G
def test_dgr_accuracy_known_answer():
    """12 images, classes 0, 1, 2 seen, n = 4 per class: the solver calls six images 0 and
    six 1, none 2; the evaluator confirms 3 of the 0s (one image is NaN: -1) and all 1s."""
    assigned = torch.tensor([0] * 6 + [1] * 6)
    judged = torch.tensor([0, 0, 0, 1, 1, -1] + [1] * 6)
    acc, share, pooled = dgr.dgr_accuracy(assigned, judged, [0, 1, 2], 4, "assigned")
    assert acc == {0: 50.0, 1: 100.0, 2: 0.0}       # g/k; a class never assigned scores 0
    assert share == {0: 50.0, 1: 50.0, 2: 0.0}
    assert pooled == 75.0                             # 9 of 12 agree
    acc, share, pooled = dgr.dgr_accuracy(assigned, judged, [0, 1, 2], 4, "budget")
    assert acc == {0: 75.0, 1: 100.0, 2: 0.0}        # min(g, n) / n
    # a NaN image is -1 to both: in no class's share, never an agreement
    acc, share, pooled = dgr.dgr_accuracy(torch.tensor([0, -1]), torch.tensor([0, -1]),
                                          [0, 1], 1, "assigned")
    assert acc == {0: 100.0, 1: 0.0} and share == {0: 50.0, 1: 0.0} and pooled == 50.0
    # a class drawn rarely: perfect under "assigned", 1 of 4 under "budget"
    acc, _, _ = dgr.dgr_accuracy(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 1]),
                                 [0, 1], 2, "assigned")
    assert acc == {0: 100.0, 1: 100.0}
    acc, _, _ = dgr.dgr_accuracy(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 1]),
                                 [0, 1], 2, "budget")
    assert acc == {0: 50.0, 1: 100.0}


class ValueReader(nn.Module):
    """A hand-built classifier: the class is 10 x the image's mean pixel, rounded; an image
    with NaN pixels reads as class 2."""

    def forward(self, x):
        m = torch.nan_to_num(x.flatten(1).mean(1), nan=0.2)
        return F.one_hot((m * 10).round().long().clamp(0, 9), 10).float()


class Painter(nn.Module):
    """A hand-built unconditional generator: noise z draws class 1 (z_0 > split) or class 2
    (z_0 <= split), painted as the constant c / 10 + w; with `nan_rows`, the images with
    z_0 < -1 (about 16%) are NaN. It records whether autograd was on when it drew."""
    nz = 4

    def __init__(self, nan_rows=False, split=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.nan_rows, self.split, self.grad_on, self.groups = nan_rows, split, [], []

    def forward(self, z, y=None, groups=None, n_groups=None):  # y is None: unconditional
        self.grad_on.append(torch.is_grad_enabled())
        self.groups.append(None if groups is None else groups.tolist())
        c = torch.where(z[:, 0] > self.split, 1.0, 2.0)
        if self.nan_rows:
            c = torch.where(z[:, 0] < -1, torch.nan, c)
        return (c / 10 + self.w).view(-1, 1, 1, 1).expand(-1, 1, 32, 32)


class PaintedTest:
    """Real test images painted as their class, 5 per class (solver_accuracy's input)."""

    def subset(self, task):
        return torch.full((5, 1, 32, 32), task[0] / 10), torch.full((5,), task[0])


def new_results():
    return {"share": [], "pooled_acc": [], "solver_acc_matrix": [], "A": []}


def measure_setup(dgr_acc):
    env = argparse.Namespace(device=torch.device("cpu"), evaluator=ValueReader(),
                             test=PaintedTest(), tasks=[[0], [1], [2]])
    args = argparse.Namespace(eval_samples=500, batch_size=64, dgr_acc=dgr_acc)
    results = new_results()
    results.update(share=[[100.0], [50.0, 50.0]], pooled_acc=[100.0, 100.0],
                   solver_acc_matrix=[[100.0, None, None], [100.0, 100.0, None]],
                   A=[100.0, 100.0])  # tasks 1 and 2, measured before
    S = dgr.Solver(1, 10, width=4)
    S.net = ValueReader()
    S.learned[[0, 1, 2]] = True
    return env, args, results, S


def test_measure_assigns_with_the_solver_and_scores_with_the_evaluator():
    """After task 3 of [0], [1], [2], a generator that has forgotten class 0 and draws about
    16% NaN images: Acc_0 = 0 with share 0; every image the solver calls 1 or 2 is one; the
    NaN images are in no class's share and no agreement (the solver would call them 2 and
    the evaluator too, without the guard); no autograd graph is built."""
    torch.manual_seed(0)
    env, args, results, S = measure_setup("assigned")
    G = Painter(nan_rows=True)
    acc = dgr.make_measure(G, S, env, args, results)([0, 1, 2])
    share = dict(zip([0, 1, 2], results["share"][2]))
    assert acc == {0: 0.0, 1: 100.0, 2: 100.0} and share[0] == 0.0
    assert 45 < share[1] < 55 and 75 < share[1] + share[2] < 92  # ~16% NaN: no class's
    assert results["pooled_acc"][2] == pytest.approx(share[1] + share[2])
    assert results["A"][2] == 100.0 and results["solver_acc_matrix"][2] == [100.0] * 3
    assert G.grad_on and not any(G.grad_on)


def test_measure_budget_reading_scores_a_rare_class_by_its_share():
    """Class 2 drawn ~16% of the time (z_0 <= -1): perfect under --dgr-acc assigned, its
    confirmed images out of --eval-samples under budget: 3 x its share with 3 classes."""
    for reading in ("assigned", "budget"):
        torch.manual_seed(0)
        env, args, results, S = measure_setup(reading)
        acc = dgr.make_measure(Painter(split=-1.0), S, env, args, results)([0, 1, 2])
        share = results["share"][2]
        if reading == "assigned":
            assert acc == {0: 0.0, 1: 100.0, 2: 100.0}
        else:
            assert acc[0] == 0.0 and acc[1] == 100.0 and 35 < acc[2] < 60
            assert acc[2] == pytest.approx(3 * share[2])


def test_solver_labels_replays_with_the_frozen_previous_solver():
    """solver_step's targets for the replayed rows are S_{t-1}'s predictions of THOSE rows
    among ITS learned classes: S_{t-1} reads each painted replay (0, 1, 0, 1), S calls
    every image 0; the loss is the cross-entropy against S_{t-1}'s labels."""
    torch.manual_seed(0)
    S = dgr.Solver(1, 10, width=4).eval()  # eval: no dropout, the loss depends on labels only
    S.learned[[0, 1, 2]] = True
    with torch.no_grad():
        S.net.head.bias[0] = 50.0
    S_prev = dgr.Solver(1, 10, width=4)
    S_prev.net = ValueReader()
    S_prev.learned[[0, 1]] = True
    paint = torch.tensor([2, 2, 2, 2, 0, 1, 0, 1]) / 10   # 4 real rows of class 2, 4 replays
    x = paint.view(-1, 1, 1, 1).expand(-1, 1, 32, 32)
    y = torch.full((4,), 2)
    labels_prev = S_prev.predict(x[4:])
    assert labels_prev.tolist() == [0, 1, 0, 1]
    with torch.no_grad():
        expect = F.cross_entropy(S(x), torch.cat([y, labels_prev])).item()
        wrong = F.cross_entropy(S(x), torch.cat([y, S.predict(x[4:])])).item()
    assert abs(expect - wrong) > 1  # the solvers disagree: the test can tell them apart
    opt = torch.optim.SGD(S.parameters(), lr=0.0)
    assert dgr.solver_step(S, S_prev, opt, x, y).item() == pytest.approx(expect, rel=1e-6)


class MeanCritic(nn.Module):
    """A hand-built critic: the score is the image's mean pixel (input gradient 1/HW per
    pixel, norm 1/32 at 32 x 32); it records the batches it scores."""
    fast = False

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x):
        self.seen.append(len(x))
        return x.flatten(1).mean(1) + self.b, None


def test_critic_and_generator_losses_known_answer():
    """Eq. (5) without the class on a joined batch of 128 real rows (value 0.1) against 128
    fakes (0.5): E[D(fake)] - E[D(real)] + 10 (1/32 - 1)^2; Eq. (2): -E[D(G(z))] over 128
    images, drawn as two batches of 64 (one call, two batch-norm groups)."""
    torch.manual_seed(0)
    G, D = Painter(split=-1e9), MeanCritic()  # G paints 0.1 everywhere; shifted to 0.5:
    with torch.no_grad():
        G.w.fill_(0.4)
    args = argparse.Namespace(batch_size=64, lambda_gp=10.0)
    opt = torch.optim.SGD(D.parameters(), lr=0.0)
    x = torch.full((128, 1, 32, 32), 0.1)
    loss = dgr.critic_step(D, opt, x, torch.full((128, 1, 32, 32), 0.5), args).item()
    assert loss == pytest.approx(0.5 - 0.1 + 10 * (1 / 32 - 1) ** 2, rel=1e-5)
    assert D.seen[0] == 256  # 128 real + 128 fakes in one pass
    args.plain_step = False
    loss = dgr.generator_step(G, D, torch.optim.SGD(G.parameters(), lr=0.0), 128, args)
    assert loss.item() == pytest.approx(-0.5) and G.grad_on == [True]
    assert G.groups == [[0] * 64 + [1] * 64]  # 2 batches of 64, each normalised alone


def test_replays_come_from_the_frozen_previous_generator_and_solver(synth_eval, monkeypatch):
    """Task 3 of [0], [1], [2]: every critic batch is 64 real images of class 2, then 64
    replays of G_{t-1}, a copy taken before the task (images of every class it draws,
    whatever the current G becomes during the task); the solver's labeller is S_{t-1}, a
    frozen copy of the solver at the task's start that knows classes 0 and 1 only."""
    _, _, _, train, _ = synth_eval
    torch.manual_seed(0)
    env = argparse.Namespace(device=torch.device("cpu"), train=train, tasks=[[0], [1], [2]])
    args = argparse.Namespace(batch_size=64, plain_step=False, critic_iters=2, iters=3,
                              lr=1e-4, solver_lr=1e-3, log_every=100, cuda_graphs=False)
    G, D = Painter(), nn.Linear(1, 1)  # G draws classes 1 and 2; D is never called here
    S = dgr.Solver(1, 10, width=4)
    S.learned[[0, 1]] = True
    start = {k: v.clone() for k, v in S.state_dict().items()}
    seen = {"x": [], "solver": []}

    def spy_critic(D_, opt, x, fake, a):
        seen["x"].append(x.clone())
        assert fake.shape == x.shape and not fake.requires_grad
        with torch.no_grad():
            G.w.add_(1.0)  # the current G moves away: the replays must not follow it
        return torch.zeros(())

    def spy_solver(S_, S_prev, opt, x, y):
        assert torch.equal(x, seen["x"][-1])  # the last critic step's joined batch
        seen["solver"].append((S_prev, y.clone()))
        return torch.zeros(())
    monkeypatch.setattr(dgr, "critic_step", spy_critic)
    monkeypatch.setattr(dgr, "generator_step", lambda *a: torch.zeros(()))
    monkeypatch.setattr(dgr, "solver_step", spy_solver)
    dgr.train_task(2, G, D, S, env, args)
    assert len(seen["x"]) == 6 and len(seen["solver"]) == 3
    for x in seen["x"]:
        assert x.shape == (128, 1, 32, 32)
        assert set((x[64:].flatten(1).mean(1) * 10).round().long().tolist()) == {1, 2}
    for S_prev, y in seen["solver"]:
        assert (y == 2).all() and len(y) == 64
        assert S_prev is not S and not S_prev.training
        assert S_prev.learned.nonzero().flatten().tolist() == [0, 1]
        assert all(torch.equal(S_prev.state_dict()[k], v) for k, v in start.items())
        assert not any(p.requires_grad for p in S_prev.parameters())
    assert S.learned.nonzero().flatten().tolist() == [0, 1, 2]


# ---------------------------------------------------------------- end to end
def test_dgr_runs_end_to_end_and_resumes_bit_identically(data_root, tmp_path):
    """Run a: 3 tasks uninterrupted (every output checked); run b: stopped after task 1,
    then resumed: the same metrics and the same weights."""
    args = [*TINY, "--data-root", data_root]
    r = run_script(*args, "--out", str(tmp_path / "a"))
    assert "it/s" in r.stdout and "ETA" in r.stdout and "s_loss" in r.stdout
    assert "share of generated images per class" in r.stdout and "solver A_3" in r.stdout
    a = json.load(open(tmp_path / "a" / "metrics.json"))
    assert a["method"] == "dgr" and a["classes"] == [0, 1, 2] and a["tasks_done"] == 3
    assert len(a["acc_matrix"]) == 3 and a["acc_matrix"][0][1] is None
    assert [len(s) for s in a["share"]] == [1, 2, 3]
    assert all(sum(s) == pytest.approx(100.0) for s in a["share"])  # seen classes only
    assert len(a["A"]) == 3 and a["solver_acc_matrix"][1][2] is None
    for name in ("args.json", "samples_task1.png", "samples_task3.png", "samples.gif",
                 "checkpoint.pt"):
        assert (tmp_path / "a" / name).exists(), name
    ca = R.load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))["models"]
    assert ca["S"]["learned"].nonzero().flatten().tolist() == [0, 1, 2]
    assert "classifier.weight" not in ca["D"]  # an unconditional critic
    assert ca["G"]["bns.0.scale"].shape[0] == 1  # one batch-norm scale: no classes

    r = run_script(*args, "--out", str(tmp_path / "b"), "--max-tasks", "1")
    assert "stopped after task 1/3" in r.stdout
    r = run_script(*args, "--out", str(tmp_path / "b"), "--resume")
    assert "resuming after task 1/3" in r.stdout
    b = json.load(open(tmp_path / "b" / "metrics.json"))
    for k in ("acc_matrix", "class_acc", "share", "pooled_acc", "solver_acc_matrix", "A"):
        assert a[k] == b[k], k
    cb = R.load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["models"]
    for net in ("G", "D", "S"):
        assert all(torch.equal(ca[net][k], cb[net][k]) for k in ca[net]), net


def test_user_mistakes_are_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, "dgr.py", "--dataset", "lsun", "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lsun" in r.stderr and "Traceback" not in r.stderr  # no LSUN data in that folder
    for argv, msg in ((["--dgr-acc", "pooled"], "invalid choice"),
                      (["--arch", "vgg"], "invalid choice")):
        with pytest.raises(C.UserError, match=msg):
            dgr.parse_args(["--dataset", "synth", *argv])


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_dgr_runs_table_2_on_lsun_with_the_solver_naming_each_image(lsun_root, tmp_path):
    """MeRGAN's Table 2 reports DGR (Acc 15.40, Rev acc 26.17, FID 93.70): dgr.py on
    (miniature) LSUN with the unconditional ResNets; Rev acc trains on the generated images
    with the solver's labels; the paper's row is printed beside ours."""
    a = dgr.parse_args(["--dataset", "lsun"])
    assert (a.arch, a.dim, a.iters, a.final_metrics) == ("resnet", 64, 20001, True)
    out = tmp_path / "o"
    r = run_script("--dataset", "lsun", "--data-root", lsun_root, "--image-size", "16",
                   "--arch", "resnet", "--dim", "4", "--iters", "2", "--eval-samples", "8", "--device", "cpu",
                   "--out", str(out))
    m = json.load(open(out / "metrics.json"))
    assert m["classes"] == [0, 1, 2, 3] and m["args"]["arch"] == "resnet"
    assert 0 <= m["rev_acc"] <= 100 and m["fd_evaluator"] > 0 and len(m["A"]) == 4
    assert "Rev acc (%)" in r.stdout and "26.17" in r.stdout and "15.40" in r.stdout
    ck = R.load_checkpoint(str(out / "checkpoint.pt"))["models"]
    assert not any("classifier" in k for k in ck["D"]) and ck["G"]["fc.weight"].shape[1] == 128
