"""Tests of the shared core (common.py): maths against known answers, data, outputs.

Everything here runs offline on data the code generates itself.
"""
import argparse
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import urllib.error

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C
import dgm
import frechet as FD
import local_data as LD
import mergan_lsun as L
import mergan_nets as M
import taskrun as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- WGAN-GP
def test_gradient_penalty_linear_critic_known_answer():
    # D(x) = <w, x>: grad_x D = w everywhere, so the penalty is (||w|| - 1)^2 exactly.
    torch.manual_seed(0)
    w = torch.randn(1, 3, 8, 8, requires_grad=True)
    real, fake = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    gp = C.gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake)
    norm = w.detach().norm()
    assert gp.item() == pytest.approx((norm.item() - 1) ** 2, rel=1e-5)
    # create_graph: the penalty is differentiable w.r.t. the critic's parameters,
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||.
    gp.backward()
    expected = 2 * (norm - 1) * w.detach() / norm
    assert torch.allclose(w.grad, expected, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_unit_norm_critic_is_zero():
    # D(x) = ||x||_2 has a unit-norm gradient everywhere (away from 0): penalty 0.
    real, fake = torch.rand(32, 1, 4, 4) + 1, torch.rand(32, 1, 4, 4) + 1
    gp = C.gradient_penalty(lambda x: x.flatten(1).norm(dim=1), real, fake)
    assert gp.item() < 1e-8


def test_gradient_penalty_on_the_critic_network():
    torch.manual_seed(0)
    D = M.Critic(channels=1, n_classes=10, dim=8)
    real, fake = torch.rand(8, 1, 32, 32) * 2 - 1, torch.rand(8, 1, 32, 32) * 2 - 1
    gp = C.gradient_penalty(lambda x: D(x)[0], real, fake)
    gp.backward()
    assert gp.item() > 0 and D.convs[0].weight.grad is not None


# ---------------------------------------------------------------- Frechet distance
def test_frechet_identity_covariances_is_mean_distance():
    mu1, mu2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, -1.0, 5.0])
    eye = torch.eye(3)
    assert FD.frechet_from_stats(mu1, eye, mu2, eye) == pytest.approx(1 + 9 + 4, abs=1e-10)


def test_frechet_one_dimensional_closed_form():
    # Gaussians N(m1, a^2), N(m2, b^2): d^2 = (m1 - m2)^2 + (a - b)^2.
    d = FD.frechet_from_stats(torch.tensor([1.0]), torch.tensor([[4.0]]),
                             torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert d == pytest.approx(9 + 1, abs=1e-10)


def test_frechet_rank_deficient_diagonal_closed_form():
    # Diagonal covariances with zeros: tr (S1 S2)^(1/2) = sum sqrt(a_i b_i).
    a, b = torch.tensor([4.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 9.0, 0.0, 0.0])
    mu = torch.zeros(4)
    want = a.sum() + b.sum() - 2 * (a * b).sqrt().sum()
    assert FD.frechet_from_stats(mu, torch.diag(a), mu, torch.diag(b)) == pytest.approx(
        want.item(), abs=1e-9)


def test_frechet_identical_sets_and_symmetry():
    torch.manual_seed(0)
    x, y = torch.randn(500, 16), torch.randn(400, 16) * 1.5 + 0.3
    assert abs(FD.frechet_distance(x, x)) < 1e-8
    assert FD.frechet_distance(x, y) == pytest.approx(FD.frechet_distance(y, x), rel=1e-8)


def test_frechet_matches_scipy_on_full_rank_data():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    torch.manual_seed(1)
    x = torch.randn(300, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    y = torch.randn(300, 8, dtype=torch.float64) + 0.5
    s1, s2 = np.cov(x.numpy().T), np.cov(y.numpy().T)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = (((x.mean(0) - y.mean(0)) ** 2).sum().item() + np.trace(s1) + np.trace(s2)
           - 2 * np.trace(covmean))
    assert FD.frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_frechet_rank_deficient_samples_are_finite():
    # 20 samples in 64 dimensions: both covariances have rank <= 19.
    torch.manual_seed(2)
    x, y = torch.randn(20, 64), torch.randn(20, 64) + 1.0
    d = FD.frechet_distance(x, y)
    assert math.isfinite(d) and d > 0
    assert abs(FD.frechet_distance(x, x.clone())) < 1e-8


# ---------------------------------------------------------------- tasks and data
def test_task_split_default_and_custom_orders():
    assert C.task_split(None, 10, 1) == [[c] for c in range(10)]
    assert C.task_split("3,1,2", 10, 1) == [[3], [1], [2]]
    assert C.task_split("0,1,2,3", 10, 2) == [[0, 1], [2, 3]]
    assert C.task_split(None, 10, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("classes, per_task, msg", [
    ("0,1,10", 1, "in 0..9"), ("1,1", 1, "twice"), ("0,1,2", 2, "whole tasks"),
    ("a,b", 1, "integers")])
def test_task_split_rejects_bad_input(classes, per_task, msg):
    with pytest.raises(C.UserError, match=msg):
        C.task_split(classes, 10, per_task)


def test_synth_is_deterministic_balanced_and_in_range():
    x1, y1 = LD.make_synth(20, seed=3)
    x2, y2 = LD.make_synth(20, seed=3)
    x3, _ = LD.make_synth(20, seed=4)
    assert x1.shape == (200, 1, 32, 32) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.bincount(y1).tolist() == [20] * 10
    xc, _ = LD.make_synth(5, seed=3, color=True)
    assert xc.shape == (50, 3, 32, 32)
    # glyphs differ between classes: class means are far apart
    m = torch.stack([C.to_float(x1[y1 == c]).mean(0) for c in range(10)])
    assert torch.cdist(m.flatten(1), m.flatten(1)).add(torch.eye(10) * 1e9).min() > 1.0


def test_load_dataset_synth_and_digit_padding():
    x, y, names = C.load_dataset("synth", train=False)
    assert x.shape == (2000, 1, 32, 32) and len(names) == 10
    f = C.to_float(x)
    assert f.min() >= -1 and f.max() <= 1


def test_task_data_batches_hold_only_requested_classes():
    x, y = LD.make_synth(10, seed=0)
    data = C.TaskData(x, y, torch.device("cpu"))
    xb, yb = data.batch(64, [2, 7])
    assert xb.shape == (64, 1, 32, 32) and xb.dtype == torch.float32
    assert set(yb.tolist()) <= {2, 7}
    assert -1 <= xb.min() and xb.max() <= 1
    with pytest.raises(C.UserError):
        C.TaskData(x, y[:0].new_zeros(len(y)), torch.device("cpu")).batch(4, [5])


def test_folder_dataset_splits(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cats", 12), ("dogs", 10), ("few", 3)):
        os.makedirs(tmp_path / cls)
        for i in range(n):
            imageio.imwrite(tmp_path / cls / f"{i}.png",
                            rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    x, y, names = C.load_dataset("folder", str(tmp_path), train=True, image_size=16)
    tx, ty, _ = C.load_dataset("folder", str(tmp_path), train=False, image_size=16)
    assert names == ["cats", "dogs", "few"] and x.shape[1:] == (3, 16, 16)
    # every 10th image of a class >= 10 images is held out; tiny classes are in both
    assert torch.bincount(y).tolist() == [10, 9, 3]
    assert torch.bincount(ty).tolist() == [2, 1, 3]


# ---------------------------------------------------------------- missing data
def test_missing_dataset_offline_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "mergan_ra.py", "--dataset", "mnist", "--data-root",
                        str(tmp_path), "--no-download", "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: dataset 'mnist' not found in")
    assert os.path.join(str(tmp_path), "MNIST", "raw") in lines[0]
    assert "train-images-idx3-ubyte" in lines[0] and "Traceback" not in r.stderr


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    # torchvision's downloader is replaced: this exercises the download path without network
    monkeypatch.setattr(tvd.SVHN, "download", offline)
    with pytest.raises(C.UserError, match=r"dataset 'svhn' not found .*train_32x32.mat.*"
                                          r"download failed: URLError"):
        C.load_dataset("svhn", str(tmp_path), train=True, download=True)


def test_unknown_dataset_and_device_are_user_errors():
    with pytest.raises(C.UserError, match="unknown dataset"):
        C.load_dataset("imagenet-21k")
    with pytest.raises(C.UserError, match="unknown --device"):
        C.pick_device("tpu")


# ---------------------------------------------------------------- networks
@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_critic_shapes(size):
    G = M.Generator(channels=3, n_classes=10, dim=8, image_size=size)
    D = M.Critic(channels=3, n_classes=10, dim=8, image_size=size)
    x = G(torch.randn(5, 128), torch.arange(5))
    assert x.shape == (5, 3, size, size) and x.abs().max() <= 1
    score, logits = D(x)
    assert score.shape == (5,) and logits.shape == (5, 10)


def test_default_generator_is_the_authors_digit_net():
    G, D = M.Generator(), M.Critic()
    assert [m.out_channels for m in G.ups] == [64, 32, 1] and G.fc.out_features == 2048
    assert [m.out_channels for m in D.convs] == [32, 64, 128]
    assert D.critic.in_features == 2048


def test_conditional_bn_uses_batch_statistics_and_labels():
    torch.manual_seed(0)
    G = M.Generator(dim=8)
    with torch.no_grad():
        for bn in G.bns:  # give classes distinct scales/offsets
            bn.scale.normal_(1, 0.5)
            bn.offset.normal_(0, 0.5)
    z = torch.randn(16, 128)
    y = torch.full((16,), 3)
    a = G.train()(z, y)
    b = G.eval()(z, y)
    assert torch.equal(a, b)  # no running averages: train/eval identical
    assert not torch.allclose(G(z, y), G(z, torch.full((16,), 4)))
    # batch statistics: an image depends on the rest of its batch
    assert not torch.allclose(G(z[:8], y[:8]), a[:8])


def bn_with_classes():
    """A conditional BN with distinct per-class scales/offsets, and a mixed batch x, y."""
    torch.manual_seed(0)
    bn = M.CondBatchNorm2d(6, n_classes=4)
    with torch.no_grad():
        bn.scale.normal_(1, 0.5)
        bn.offset.normal_(0, 0.5)
    return bn, torch.randn(30, 6, 5, 5) * 3 + 1, torch.tensor([0, 2, 3] * 10)


def test_conditional_bn_mixed_batch_equals_single_class_batches():
    # Per-class statistics: one mixed batch == one single-class batch per class (the
    # authors' protocol), each normalised like F.batch_norm over that class alone.
    bn, x, y = bn_with_classes()
    mixed = bn(x, y)
    for c in (0, 2, 3):
        alone = F.batch_norm(x[y == c], None, None, training=True, eps=1e-5)
        want = alone * bn.scale[c].view(1, -1, 1, 1) + bn.offset[c].view(1, -1, 1, 1)
        assert torch.allclose(mixed[y == c], want, atol=1e-5)
        assert torch.allclose(bn(x[y == c], y[y == c]), want, atol=1e-5)


def test_generator_mixed_batch_equals_one_call_per_class():
    # Generator.forward computes the grouping once and gives it to all its layers: a mixed
    # batch must still be, row for row, one single-class call per class.
    torch.manual_seed(0)
    G = M.Generator(dim=8)
    with torch.no_grad():
        for bn in G.bns:
            bn.scale.normal_(1, 0.5)
            bn.offset.normal_(0, 0.5)
    z, y = torch.randn(30, 128), torch.tensor([0, 2, 3] * 10)
    mixed = G(z, y)
    for c in (0, 2, 3):
        assert torch.allclose(mixed[y == c], G(z[y == c], y[y == c]), atol=1e-5)
    groups = torch.tensor([0] * 12 + [1] * 18)  # JT's form: the given rows share statistics
    two = G(z, y, groups, 2)
    for g in (0, 1):
        rows = groups == g
        assert torch.allclose(two[rows], G(z[rows], y[rows], groups[rows] * 0, 1), atol=1e-5)


@pytest.mark.parametrize("net", ["digits", "digits-jt", "unconditional", "resnet"])
def test_draw_batches_in_one_call_equals_one_call_per_batch(net):
    # The critic steps' fakes (and JTR/DGR's replays) in one generator call: each batch of
    # 16 rows normalised by itself (per class within it; JT: as one), the same images as
    # one call per batch (the plain form, --plain-step), not those of one 48-row batch.
    torch.manual_seed(0)
    G = (L.ResNetGenerator(3, 10, dim=4, image_size=16) if net == "resnet" else
         M.Generator(dim=8, n_classes=None if net == "unconditional" else 10))
    for m in G.modules():
        if isinstance(m, M.CondBatchNorm2d):
            with torch.no_grad():
                m.scale.normal_(1, 0.5)
                m.offset.normal_(0, 0.5)
    z = torch.randn(48, 128)
    y = None if net == "unconditional" else torch.tensor([0, 1, 1, 2] * 12)
    per_class = net != "digits-jt"
    fast = M.draw_batches(G, z, y, 16, per_class)
    plain = M.draw_batches(G, z, y, 16, per_class, plain=True)
    assert fast.shape == plain.shape == (48, *G(z[:2], None if y is None else y[:2]).shape[1:])
    assert torch.allclose(fast, plain, atol=1e-5)
    whole = G(z, y) if per_class else G(z, y, torch.zeros_like(y), 1)
    assert not torch.allclose(fast, whole, atol=1e-3)  # not one batch of 48


def test_conditional_bn_groups_set_which_rows_share_statistics():
    # JT's generator (mergan_jtr.py --mode jt): a mixed batch normalised as ONE batch, each
    # row still scaled and shifted by its own class; groups=k: one such batch per group.
    bn, x, y = bn_with_classes()

    def affine(h, labels):
        return h * bn.scale[labels][:, :, None, None] + bn.offset[labels][:, :, None, None]

    whole = bn(x, y, torch.zeros(30, dtype=torch.long), 1)
    want = affine(F.batch_norm(x, None, None, training=True, eps=1e-5), y)
    assert torch.allclose(whole, want, atol=1e-5)
    assert not torch.allclose(whole, bn(x, y), atol=1e-3)  # not the per-class statistics
    groups = torch.tensor([0] * 12 + [1] * 18)
    two = bn(x, y, groups, 2)
    for g in (0, 1):
        rows = groups == g
        want = affine(F.batch_norm(x[rows], None, None, training=True, eps=1e-5), y[rows])
        assert torch.allclose(two[rows], want, atol=1e-5)


# ---------------------------------------------------------------- metrics
def test_acc_summary_known_answer():
    R = [[100.0, None, None],
         [60.0, 90.0, None],
         [40.0, 80.0, 70.0]]
    s = C.acc_summary(R)
    assert s["avg_acc"] == [100.0, 75.0, pytest.approx(190 / 3)]
    assert s["forgetting"] == [60.0, 10.0]           # max earlier - final
    assert s["bwt"] == pytest.approx(((40 - 100) + (80 - 90)) / 2)


def test_evaluator_reaches_high_accuracy_on_synth(synth_eval):
    _, model, acc, _, test = synth_eval
    # measured 98.0% on 2 CPU cores in about 25 s (600 steps, width 16)
    assert acc >= 95.0
    x, y = test.subset([4])
    assert C.accuracy(model, x, y) > 90.0


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_evaluator_cache_is_reused_and_corrupt_cache_retrains(synth_eval, tmp_path):
    args, model, acc, train, test = synth_eval
    logs = []
    _, acc2 = C.get_evaluator(args, train, test, 10, torch.device("cpu"), log=logs.append)
    assert acc2 == acc and "loaded" in logs[0]
    # a corrupt cache is reported and replaced, not a crash (tested on a copy)
    bad = argparse.Namespace(dataset="synth", data_root=str(tmp_path))
    small = C.TaskData(train.x[:200], train.y[:200], torch.device("cpu"))
    path = tmp_path / "evaluators" / "synth-32px-n200-v1.pt"  # named by what it learns from
    os.makedirs(path.parent)
    path.write_bytes(b"not a checkpoint")
    logs = []
    C.get_evaluator(bad, small, test, 10, torch.device("cpu"), log=logs.append)
    assert "unreadable" in logs[0] and path.stat().st_size > 1000


def test_generated_accuracy_in_chunks_equals_all_at_once(synth_eval, monkeypatch):
    """Acc holds at most ACC_CHUNK images at once (a huge --eval-samples once exhausted the
    memory); the noise is drawn in the same order, so chunks change nothing."""
    _, model, _, train, _ = synth_eval

    def blurry(z, y):  # images of class y, some of them wrong: an Acc strictly inside 0..100
        x, _ = train.batch(len(y), [int(y[0])])
        return x + 2.0 * z[:, :1, None, None] * (z[:, 1:2, None, None] > 0.5)
    torch.manual_seed(0)
    whole = C.generated_accuracy(blurry, model, [0, 3], 320, 4, torch.device("cpu"))
    monkeypatch.setattr(C, "ACC_CHUNK", 128)
    torch.manual_seed(0)
    chunks = C.generated_accuracy(blurry, model, [0, 3], 320, 4, torch.device("cpu"))
    assert chunks == whole and all(0 < v < 100 for v in whole.values()), whole


def test_generated_accuracy_with_known_generators(synth_eval):
    _, model, _, _, test = synth_eval
    pools = {c: test.subset([c])[0] for c in range(10)}

    def perfect(z, y):  # "generates" real test images of the asked class
        c = int(y[0])
        return pools[c][torch.randint(len(pools[c]), (len(z),))]

    def shifted(z, y):  # always the wrong class
        return perfect(z, (y + 1) % 10)

    acc = C.generated_accuracy(perfect, model, [0, 5, 9], 128, 128, torch.device("cpu"))
    assert set(acc) == {0, 5, 9} and min(acc.values()) > 90
    wrong = C.generated_accuracy(shifted, model, [0, 5], 128, 128, torch.device("cpu"))
    assert max(wrong.values()) < 10


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_reverse_accuracy_of_a_generator_of_real_images(synth_eval):
    _, _, _, train, test = synth_eval
    pools = {c: train.subset([c])[0] for c in range(10)}

    def real(z, y):
        c = int(y[0])
        return pools[c][torch.randint(len(pools[c]), (len(z),))]

    def noise(z, y):
        return torch.rand(len(z), 1, 32, 32) * 2 - 1

    dev = torch.device("cpu")
    good = L.reverse_accuracy(real, [1, 2, 3], 300, 128, test, 10, dev, steps=400, width=16)
    bad = L.reverse_accuracy(noise, [1, 2, 3], 300, 128, test, 10, dev, steps=400, width=16)
    assert good > 90 and bad < 60


def test_inception_fid_offline_is_a_user_error(monkeypatch):
    import torchvision.models as tvm

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvm, "inception_v3", offline)
    with pytest.raises(C.UserError, match="Inception-v3 weights"):
        FD.inception_features(torch.device("cpu"))


# ---------------------------------------------------------------- run outputs
def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    C.add_common_args(p, iters=10)
    a = p.parse_args(["--dataset", "synth", "--out", str(tmp_path / "run")])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_run_folders_never_overwrite_and_never_collide(tmp_path, monkeypatch):
    """A folder with anything in it but a stopped run's args.json is refused (nothing is
    overwritten); --out naming a file is one line; two runs started in the same second
    with the default name get two folders."""
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "metrics.json").write_text('{"my": 1}')
    with pytest.raises(C.UserError, match="is not empty.*metrics.json"):
        R.prepare_run(_args(tmp_path, out=str(tmp_path / "u")), "test")
    assert (tmp_path / "u" / "metrics.json").read_text() == '{"my": 1}'
    (tmp_path / "f").write_text("x")
    with pytest.raises(C.UserError, match="is a file"):
        R.prepare_run(_args(tmp_path, out=str(tmp_path / "f")), "test")
    R.prepare_run(_args(tmp_path, out=str(tmp_path / "s")), "test")  # only args.json:
    R.prepare_run(_args(tmp_path, out=str(tmp_path / "s")), "test")  # a stopped run, reused
    monkeypatch.chdir(tmp_path)
    outs = {R.prepare_run(_args(tmp_path, out=None), "test")[0] for _ in range(3)}
    assert len(outs) == 3 and all(os.path.isdir(o) for o in outs)


def test_one_run_per_folder_and_only_a_stopped_run_of_the_same_script(tmp_path):
    """Issue 37: a second run on a folder in use is refused in one line (an OS lock held for
    the whole run), and the first run's files are its own; an args.json that no run of this
    script wrote (the user's, another script's) is never overwritten."""
    import fcntl
    import time
    out = tmp_path / "x"
    argv = [sys.executable, "mergan_jtr.py", "--mode", "sft", "--dataset", "synth",
            "--data-root", str(tmp_path / "data"), "--classes", "0,1", "--iters", "400",
            "--dim", "8", "--eval-samples", "10", "--device", "cpu", "--out", str(out)]
    first = subprocess.Popen(argv + ["--seed", "5"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):  # until it has written args.json (in task 1 soon after)
            if (out / "args.json").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        second = subprocess.run(argv + ["--seed", "6"], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert "held by a running process" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()
    saved = json.loads((out / "args.json").read_text())
    assert saved["seed"] == 5 and saved["script"] == "mergan_sft"
    # in-process: a folder another descriptor holds is refused; released, it is taken
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(C.UserError, match="held by a running process"):
        R.prepare_run(_args(tmp_path, out=str(tmp_path)), "test")
    os.close(held)
    for name, text in (("mine", '{"lr": 0.1}'), ("dgr", '{"script": "dgr", "seed": 0}'),
                       ("bad", "[1, 2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(text)
        with pytest.raises(C.UserError, match="no args.json of a stopped test run"):
            R.prepare_run(_args(tmp_path, out=str(tmp_path / name)), "test")
        assert (tmp_path / name / "args.json").read_text() == text


def test_run_folder_checkpoint_and_resume_rules(tmp_path):
    args = _args(tmp_path)
    out, ckpt = R.prepare_run(args, "test")
    assert ckpt is None and os.path.exists(os.path.join(out, "args.json"))
    R.save_checkpoint(out, {"task": 3, "args": vars(args), "w": torch.ones(2)})
    with pytest.raises(C.UserError, match="already holds a run"):
        R.prepare_run(_args(tmp_path), "test")
    out2, ckpt = R.prepare_run(_args(tmp_path, resume=True), "test")
    assert out2 == out and ckpt["task"] == 3 and torch.equal(ckpt["w"], torch.ones(2))
    assert "rng" in ckpt and not os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))
    # resume with no checkpoint, and a corrupt checkpoint: one clear error each
    with pytest.raises(C.UserError, match="nothing to resume"):
        R.prepare_run(_args(tmp_path, resume=True, out=str(tmp_path / "none")), "test")
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(C.UserError, match="corrupt or unreadable"):
        R.prepare_run(_args(tmp_path, resume=True), "test")


def _parser():
    p = C.Parser()
    C.add_common_args(p, iters=10)
    p.add_argument("--lr", type=C.positive, default=1e-4)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    return p


def test_resume_takes_the_experiment_flags_from_args_json(tmp_path):
    """--resume --out X is the whole command: every flag not given comes from X/args.json
    (experiment and data location alike); a changed experiment flag is refused, naming
    it; where/how this call runs may change; --max-tasks belongs to one call."""
    out = str(tmp_path / "run")
    first = ["--dataset", "synth", "--classes", "0,1,2", "--iters", "3", "--lr", "0.5",
             "--data-root", "/d", "--max-tasks", "1", "--no-cuda-graphs", "--out", out]
    R.prepare_run(R.parse_run_args(_parser(), first), "test")
    a = R.parse_run_args(_parser(), ["--resume", "--out", out])
    assert (a.dataset, a.classes, a.iters, a.lr, a.data_root, a.cuda_graphs) == (
        "synth", "0,1,2", 3, 0.5, "/d", False)
    assert a.max_tasks is None and a.resume
    with pytest.raises(C.UserError, match="--iters 3 -> 20; --lr 0.5 -> 0.1"):
        R.parse_run_args(_parser(), ["--resume", "--out", out, "--iters", "20", "--lr", "0.1"])
    with pytest.raises(C.UserError, match="--seed 0 -> 5"):
        R.parse_run_args(_parser(), ["--resume", "--out", out, "--seed", "5"])
    a = R.parse_run_args(_parser(), ["--resume", "--out", out, "--iters", "3", "--device",
                                     "cpu", "--log-every", "7", "--data-root", "/e"])
    assert (a.device, a.log_every, a.data_root) == ("cpu", 7, "/e")
    with pytest.raises(C.UserError, match="cuda-graphs"):  # a script's own run flag ...
        R.parse_run_args(_parser(), ["--resume", "--out", out, "--cuda-graphs"])
    a = R.parse_run_args(_parser(), ["--resume", "--out", out, "--cuda-graphs"],
                         run_flags=("cuda_graphs",))  # ... may change when it says so
    assert a.cuda_graphs is True
    with pytest.raises(C.UserError, match="needs --out"):
        R.parse_run_args(_parser(), ["--resume"])
    with pytest.raises(C.UserError, match="nothing to resume"):
        R.parse_run_args(_parser(), ["--resume", "--out", str(tmp_path / "none")])
    (tmp_path / "run" / "args.json").write_text("{not json")
    with pytest.raises(C.UserError, match="cannot be read"):
        R.parse_run_args(_parser(), ["--resume", "--out", out])


def test_numeric_flags_are_checked_by_their_types():
    """Each number flag declares its range with a `type=`; a mistake is one UserError."""
    for argv, msg in ((["--iters", "0"], "argument --iters: must be at least 1, got 0"),
                      (["--iters", "1.5"], "must be at least 1, got '1.5'"),
                      (["--lr", "nan"], "argument --lr: must be a positive number, got nan"),
                      (["--lr", "-1"], "must be a positive number, got -1"),
                      (["--lr", "inf"], "must be a positive number, got inf"),
                      (["--nope", "1"], "unrecognized arguments: --nope 1")):
        with pytest.raises(C.UserError, match=re.escape(msg)):
            _parser().parse_args(argv)
    assert C.non_negative("0") == 0.0 and C.fraction("0.5") == 0.5
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            C.fraction(bad)


def test_metrics_file_has_the_shared_fields(tmp_path):
    args = _args(tmp_path)
    acc = [[90.0, None], [50.0, 80.0]]
    env = argparse.Namespace(ckpt=None, tasks=[[0], [1]], device="cpu", out=str(tmp_path),
                             evaluator_acc=98.0)
    run = R.TaskRun(args, env, "sft", {}, generate=None)
    run.R = acc
    run.write_metrics(seconds=1.5)
    m = __import__("json").load(open(tmp_path / "metrics.json"))
    for key in ("method", "dataset", "classes", "acc_matrix", "avg_acc", "evaluator_test_acc",
                "device", "seconds", "args", "forgetting", "bwt"):
        assert key in m
    assert m["acc_matrix"] == [[90.0, None], [50.0, 80.0]] and m["avg_acc"] == [90.0, 65.0]
    assert m["classes"] == [0, 1] and m["args"]["dataset"] == "synth"


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    """--resume of a checkpoint whose models do not fit the networks (another version of the
    script, a damaged file): one UserError, not a traceback from load_state_dict."""
    env = argparse.Namespace(ckpt={"models": {"G": {"weight": torch.zeros(3)}}},
                             tasks=[[0]], device="cpu", out=str(tmp_path), evaluator_acc=0.0)
    with pytest.raises(C.UserError, match="does not fit these networks or lacks a part "
                                          r"\(RuntimeError: Error"):
        R.TaskRun(_args(tmp_path), env, "x", {"G": torch.nn.Linear(2, 2)}, generate=None)
    env.ckpt = {"task": 0}
    with pytest.raises(C.UserError, match="lacks a part \\(KeyError: 'models'\\)"):
        R.TaskRun(_args(tmp_path), env, "x", {"G": torch.nn.Linear(2, 2)}, generate=None)
    G = torch.nn.Linear(2, 2)  # models that fit, without the rest (once a traceback)
    env.ckpt = {"models": {"G": G.state_dict()}, "task": 0}
    with pytest.raises(C.UserError, match="lacks a part \\(KeyError: 'R'\\)"):
        R.TaskRun(_args(tmp_path), env, "x", {"G": G}, generate=None)


def test_training_the_evaluator_leaves_every_random_generator_as_found():
    # train_classifier seeds itself (its own seed) and must not reseed the caller: the
    # run's noise follows --seed whether the evaluator was trained or loaded from cache.
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 2
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    C.train_classifier(x, y, 2, torch.device("cpu"), steps=2, width=4, batch=8, seed=123)
    assert torch.equal(torch.rand(4), want)


def test_rng_state_round_trip():
    C.seed_everything(7)
    state = R.rng_state()
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    R.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_class_grid_and_gif(tmp_path):
    G = M.Generator(dim=8)
    z = torch.randn(6, 128)
    frames = [C.class_grid(G, [0, 1, 2], seen, z, str(tmp_path / f"t{i}.png"))
              for i, seen in enumerate([[0], [0, 1], [0, 1, 2]])]
    assert frames[0].shape == frames[2].shape and frames[0].shape[2] == 3
    assert (frames[0][-20:] == 255).all()  # rows of unseen classes are blank
    C.save_gif(frames, str(tmp_path / "tasks.gif"))
    gif = imageio.mimread(str(tmp_path / "tasks.gif"))
    assert len(gif) == 3 and os.path.exists(tmp_path / "t2.png")


def test_progress_line(capsys):
    p = R.Progress(total=20, every=10, prefix="[task 1/2] ")
    for it in range(20):
        p.update(it, {"d_loss": torch.tensor(-1.5), "g_loss": torch.tensor(0.25)})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "it     20/20" in lines[1] and "d_loss -1.5000" in lines[1]
    assert "it/s" in lines[1] and "ETA 0:00" in lines[1]


class _FakeStream:
    def wait_stream(self, other):
        pass


def _fake_cuda(monkeypatch, state, fail):
    """Stand-ins for torch.cuda's stream and graph calls that GraphedStep makes, so that its
    bookkeeping can be checked without a GPU: `recording` is on inside the graph context
    (the step then records instead of running), replay runs one iteration."""
    import contextlib

    class FakeGraph:
        def replay(self):
            state["done"] += 1

    @contextlib.contextmanager
    def graph(g, **kw):
        state["recording"] = True
        try:
            yield
        finally:
            state["recording"] = False
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")

    for name, value in [("CUDAGraph", FakeGraph), ("graph", graph), ("Stream", _FakeStream),
                        ("current_stream", lambda: _FakeStream()),
                        ("stream", lambda s: contextlib.nullcontext()),
                        ("set_stream", lambda s: None), ("synchronize", lambda: None)]:
        monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("fail", [None, "at the end", "inside the step"])
def test_graphed_step_runs_exactly_one_iteration_per_call(monkeypatch, fail):
    state = {"done": 0, "recording": False, "recorded": 0}

    def step():
        if state["recording"]:
            state["recorded"] += 1
            if fail == "inside the step":  # e.g. an .item() in the recorded iteration
                raise RuntimeError("operation not permitted when stream is capturing")
            return {"loss": "static"}
        state["done"] += 1
        return {"loss": state["done"]}

    _fake_cuda(monkeypatch, state, fail == "at the end")
    graphed = C.GraphedStep(step, enabled=True, warmup=3)
    outs = [graphed() for _ in range(3)]
    assert outs == [{"loss": 1}, {"loss": 2}, {"loss": 3}]  # eager warm-up
    if fail:  # recording failed: one clear line that names the way out, nothing run twice
        with pytest.raises(C.UserError, match="rerun without --cuda-graphs"):
            graphed()
        assert state["done"] == 3 and state["recorded"] == 1
        return
    outs = [graphed() for _ in range(7)]
    assert state["done"] == 10 and state["recorded"] == 1  # recorded once, never run twice
    assert outs == [{"loss": "static"}] * 7  # every later call replays the recording


def test_graphed_step_disabled_is_the_plain_loop():
    calls = []
    graphed = C.GraphedStep(lambda: calls.append(1) or {"n": len(calls)}, enabled=False)
    assert [graphed()["n"] for _ in range(5)] == [1, 2, 3, 4, 5]


def test_progress_stops_on_nan_where_it_reads_the_losses(capsys):
    p = R.Progress(total=10, every=5, prefix="[task 2/3] ")
    nan = torch.tensor(float("nan"))
    p.update(2, {"d_loss": nan})  # iteration 3: no line, the value is not read (no sync)
    with pytest.raises(R.Diverged, match=r"\[task 2/3\] training diverged by iteration 5: "
                                         r"g_loss = inf"):
        p.update(4, {"d_loss": torch.tensor(0.5), "g_loss": torch.tensor(float("inf"))})
    assert "it      5/10" in capsys.readouterr().out  # the line is printed first


def test_check_finite_names_the_module():
    net = torch.nn.Linear(3, 2)
    R.check_finite(net, "[task 1/2] G")
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(R.Diverged, match=r"\[task 1/2\] G: the weights hold NaN"):
        R.check_finite(net, "[task 1/2] G")


def test_divergence_that_stays_finite_is_caught_and_names_the_flag_at_fault(monkeypatch):
    """Losses of 1e13 and weights of 1e6 are finite: runs with --lr 1 once printed their
    table and exited 0. Beyond the bounds (no healthy run comes near) they stop, naming
    the flag set furthest above its default; a number that is no loss (DGM's slope s) is
    not bounded."""
    monkeypatch.setattr(R, "BLAME", "--lr")
    p = R.Progress(total=4, every=1)
    p.update(0, {"d_loss": torch.tensor(R.LOSS_BOUND * 0.99), "s": 1e9,  # s: no loss,
                 "ewc_penalty": torch.tensor(5e9)})  # a penalty's size is its lambda's
    with pytest.raises(R.Diverged, match=r"d_loss = 1.01e\+06 \(NaN/Inf or beyond 1e\+06.*"
                                         r"try a smaller --lr\)"):
        p.update(1, {"d_loss": torch.tensor(R.LOSS_BOUND * 1.01)})
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight[0, 0] = -R.WEIGHT_BOUND * 0.99
    R.check_finite(net, "G")
    with torch.no_grad():
        net.weight[0, 0] = -R.WEIGHT_BOUND * 1.01
    with pytest.raises(R.Diverged, match="G: the weights hold NaN/Inf or values beyond 10000"):
        R.check_finite(net, "G")
    usual = argparse.Namespace(lr=1e-4, lambda_ra=1e-3, lambda_gp=10.0)
    for given, blamed in (({}, "--lr"), ({"lr": 1e-5}, "--lr"),
                          ({"lr": 1.0}, "--lr (now 1, default 0.0001)"),
                          ({"lr": 1.0, "lambda_ra": 1e38},
                           "--lambda-ra (now 1e+38, default 0.001)")):
        R.suspect(argparse.Namespace(**dict(vars(usual), **given)), usual,
                  ("lr", "lambda_ra", "lambda_gp"))
        assert R.BLAME == blamed


def test_nan_images_are_never_counted_as_a_class(synth_eval):
    _, evaluator, _, train, _ = synth_eval
    x0, _ = train.subset([0])

    def nan_generator(z, y):  # the image of a diverged generator
        return torch.full((len(y), 1, 32, 32), float("nan"))

    acc = C.generated_accuracy(nan_generator, evaluator, [0, 1, 2], 20, 4,
                               torch.device("cpu"))
    assert acc == {0: 0.0, 1: 0.0, 2: 0.0}
    half = lambda z, y: torch.cat([x0[:10], torch.full((10, 1, 32, 32), float("inf"))])
    assert C.generated_accuracy(half, evaluator, [0], 20, 4, torch.device("cpu"))[0] <= 50.0


@pytest.mark.parametrize("script, flags, msg", [
    ("mergan_ra.py", ["--iters", "0"], "--iters: must be at least 1, got 0"),
    ("mergan_jtr.py", ["--batch-size", "-4"], "--batch-size: must be at least 1"),
    ("mergan_jtr.py", ["--eval-samples", "0"], "--eval-samples: must be at least 1"),
    ("mergan_ra.py", ["--max-tasks", "-1"], "--max-tasks: must be at least 1"),
    ("mergan_jtr.py", ["--critic-iters", "0"], "--critic-iters: must be at least 1"),
    ("mergan_ra.py", ["--lr", "nan"], "--lr: must be a positive number, got nan"),
    ("mergan_jtr.py", ["--lr", "-1"], "--lr: must be a positive number"),
    ("mergan_jtr.py", ["--dim", "0"], "--dim: must be at least 1"),
    ("mergan_jtr.py", ["--mode", "ewc", "--ewc-lambda", "nan"], "--ewc-lambda: must be a"),
    ("mergan_ra.py", ["--lambda-ra", "-1"], "--lambda-ra: must be a number >= 0"),
    ("dgm.py", ["--ngf", "0"], "--ngf: must be at least 1"),
    ("dgm.py", ["--batch-size", "0"], "--batch-size: must be at least 1"),
    ("ewc_fewshot.py", ["--lr", "0"], "--lr: must be a positive number, got 0"),
    ("ewc_fewshot.py", ["--iters", "0"], "--iters: must be at least 1"),
    ("ewc_fewshot.py", ["--fd-samples", "1"], "--fd-samples: must be at least 2"),
    ("ewc_fewshot.py", ["--ewc-lambda", "inf"], "--ewc-lambda needs at least one value"),
    ("dgm.py", ["--val-split", "1"], "--val-split: must be a number in [0, 1), got 1"),
    ("dgm.py", ["--val-split", "nan"], "--val-split: must be a number in [0, 1)"),
    ("dgm.py", ["--val-every", "0"], "--val-every: must be at least 1"),
    ("mergan_ra.py", ["--seed", str(2**64)], "--seed: must be an integer in [0, 2^63)"),
    ("ewc_fewshot.py", ["--seed", "-1"], "--seed: must be an integer in [0, 2^63)"),
    ("mergan_jtr.py", ["--image-size", "1"], "--image-size: must be at least 4"),
    ("dgm.py", ["--dataset", "synth", "--nz", "5"], "--nz must be at least 10 on synth"),
])
def test_numbers_out_of_range_are_user_errors(script, flags, msg):
    """Every script's numeric flags are checked by their argparse types, at parse time
    (before any data is loaded or any folder made); a UserError is one line, exit 2."""
    import importlib
    module = importlib.import_module(script[:-3])
    with pytest.raises(C.UserError) as err:
        module.parse_args(flags)
    assert msg in str(err.value)


def test_a_number_out_of_range_ends_in_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "mergan_ra.py"), "--iters", "0",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--iters: must be at least 1, got 0" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# 28 -> 32 px digits, validation split, evaluator cache by content
# ------------------------------------------------------------------------------------------
def write_fake_mnist(root, n=20, seed=0):
    """MNIST in torchvision's raw layout (<root>/MNIST/raw/*-ubyte), n random digits per
    split, labels 0..9 in turn. Returns the training images (n x 28 x 28 uint8)."""
    raw = pathlib.Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(seed)
    out = None
    for prefix in ("train", "t10k"):
        imgs = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())
        out = imgs if prefix == "train" else out
    return out


def test_digits_are_padded_or_resized_to_32_px(tmp_path):
    """pad (MeRGAN's): the 28x28 digit sits in a 2-pixel zero border. resize (DGM's): the
    authors' pipeline, ToPILImage -> Resize(32) (PIL bilinear) -> ToTensor, to within one
    grey level (PIL rounds in fixed point)."""
    from PIL import Image
    import torchvision.transforms as T
    raw = write_fake_mnist(tmp_path)
    pad, y, _ = C.load_dataset("mnist", str(tmp_path), True, download=False, digits="pad")
    res, y2, _ = C.load_dataset("mnist", str(tmp_path), True, download=False, digits="resize")
    assert pad.shape == res.shape == (20, 1, 32, 32) and torch.equal(y, y2)
    assert torch.equal(pad[:, 0, 2:30, 2:30], torch.from_numpy(raw))
    assert pad[:, :, :2].sum() == 0 and pad[:, :, :, 30:].sum() == 0
    pil = np.stack([np.asarray(T.Resize(32)(T.ToPILImage()(torch.from_numpy(a).float()[None]
                                                             / 255))) for a in raw])
    assert pil.shape == (20, 32, 32)
    assert np.abs(res[:, 0].numpy().astype(int) - pil.astype(int)).max() <= 1
    # and exactly PIL's float ("F" mode) bilinear, before rounding
    f = np.asarray(Image.fromarray(raw[0].astype(np.float32), mode="F").resize((32, 32),
                                                                               Image.BILINEAR))
    assert np.abs(res[0, 0].numpy() - f).max() <= 0.5 + 1e-4


def test_mnist_train_55000_is_tfs_split(tmp_path):
    """--mnist-train 55000: the MeRGAN authors' training set, TF input_data's 55,000 (it
    keeps the first 5,000 training images as its validation set); the test set is
    unchanged. Refused on a subset (MNIST-5k would be left empty) and off MNIST."""
    write_fake_mnist(tmp_path / "full", n=60000)
    full, y, _ = C.load_dataset("mnist", str(tmp_path / "full"), True, download=False)
    tf, ty, _ = C.load_dataset("mnist", str(tmp_path / "full"), True, download=False,
                               mnist_train=55000)
    assert len(tf) == 55000 and torch.equal(tf, full[5000:]) and torch.equal(ty, y[5000:])
    test = C.load_dataset("mnist", str(tmp_path / "full"), False, download=False,
                          mnist_train=55000)[0]
    assert len(test) == 60000  # write_fake_mnist's test split: untouched
    write_fake_mnist(tmp_path / "sub", n=20)
    with pytest.raises(C.UserError, match="60,000 training images; .* holds 20"):
        C.load_dataset("mnist", str(tmp_path / "sub"), True, download=False, mnist_train=55000)
    import mergan_jtr
    with pytest.raises(C.UserError, match="--mnist-train is read with --dataset mnist only"):
        mergan_jtr.main(["--dataset", "synth", "--mnist-train", "55000",
                         "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_evaluator_cache_is_named_by_what_it_was_trained_on(tmp_path, monkeypatch):
    """One file per dataset, image size, preparation (padded or resized digits), image
    count and architecture; a file whose recorded key differs is retrained, not loaded."""
    trained = []

    def fake_train(x, y, n_classes, device, steps, width, log, arch):
        trained.append(len(x))
        return C.make_classifier(arch, x.shape[1], n_classes, width).eval()
    monkeypatch.setattr(C, "train_classifier", fake_train)
    dev, log = torch.device("cpu"), lambda *m: None
    x, y = torch.zeros(20, 1, 32, 32, dtype=torch.uint8), torch.arange(20) % 10
    data = C.TaskData(x, y, dev)
    args = argparse.Namespace(dataset="mnist", data_root=str(tmp_path))
    C.get_evaluator(args, data, data, 10, dev, log=log)
    C.get_evaluator(args, data, data, 10, dev, log=log, prep="-resize")
    C.get_evaluator(args, data, data, 10, dev, log=log)  # cached
    assert trained == [20, 20] and sorted(os.listdir(tmp_path / "evaluators")) == [
        "mnist-32px-n20-v1.pt", "mnist-32px-resize-n20-v1.pt"]
    C.get_evaluator(args, data, C.TaskData(x[:10], y[:10], dev), 10, dev, log=log)
    assert trained == [20, 20, 20]  # another test set: the key differs, retrained


def test_hold_out_takes_the_same_share_of_every_class():
    y = torch.tensor([0] * 20 + [1] * 40 + [2] * 7)
    x = torch.arange(len(y), dtype=torch.uint8).view(-1, 1, 1, 1)
    data = C.TaskData(x, y, torch.device("cpu"))
    train, val = dgm.hold_out(data, 0.15, seed=0)
    assert [int((val.y == c).sum()) for c in range(3)] == [3, 6, 1]   # int(0.15 n)
    assert len(train.y) + len(val.y) == len(y)
    ids = set(train.x.flatten().tolist()) | set(val.x.flatten().tolist())
    assert ids == set(range(len(y))) and not set(train.x.flatten().tolist()) & set(
        val.x.flatten().tolist())
    again, val2 = dgm.hold_out(data, 0.15, seed=0)
    assert torch.equal(val.x, val2.x)                                   # same seed, same split
    assert not torch.equal(dgm.hold_out(data, 0.15, seed=1)[1].x, val.x)
    assert dgm.hold_out(data, 0.0, seed=0) == (data, None)
    with pytest.raises(C.UserError, match="class 2"):
        dgm.hold_out(data, 0.1, seed=0)                       # int(0.7) = 0 of class 2


# ------------------------------------------------------------------------------------------
# User mistakes that once gave a traceback, a misleading line or a silently wrong number
# ------------------------------------------------------------------------------------------
def _image_folder(root, classes, n=3, size=(20, 20)):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            imageio.imwrite(root / c / f"{i}.png", rng.integers(0, 255, (*size, 3), np.uint8))


def test_folder_splits_match_classes_by_name(tmp_path):
    """train/{a,b,c} with test/{b,c} once shifted the test labels (b became 0): now a
    split that lacks a class is one line naming it; with the same classes, a class keeps
    its label in both splits."""
    _image_folder(tmp_path / "bad" / "train", ["a", "b", "c"])
    _image_folder(tmp_path / "bad" / "test", ["b", "c"])
    for train in (True, False):
        with pytest.raises(C.UserError, match="train/ and test/ must hold the same class "
                                              "folders; only in one of them: a"):
            C.load_dataset("folder", str(tmp_path / "bad"), train=train, image_size=16)
    _image_folder(tmp_path / "ok" / "train", ["a", "b"])
    _image_folder(tmp_path / "ok" / "test", ["a", "b"], n=2)
    tx, ty, names = C.load_dataset("folder", str(tmp_path / "ok"), train=False, image_size=16)
    assert names == ["a", "b"] and ty.tolist() == [0, 0, 1, 1]


def test_unreadable_images_are_named(tmp_path):
    """A text file named .png, or a truncated JPEG, in a folder dataset: one line naming
    the file (once a PIL traceback)."""
    _image_folder(tmp_path / "d", ["a", "b"])
    (tmp_path / "d" / "a" / "notes.png").write_text("not an image")
    with pytest.raises(C.UserError, match=r"cannot read image .*notes\.png"):
        C.load_dataset("folder", str(tmp_path / "d"), train=True, image_size=16)
    os.remove(tmp_path / "d" / "a" / "notes.png")
    imageio.imwrite(tmp_path / "d" / "b" / "cut.jpg", np.full((64, 64, 3), 99, np.uint8))
    data = (tmp_path / "d" / "b" / "cut.jpg").read_bytes()
    (tmp_path / "d" / "b" / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(C.UserError, match=r"cannot read image .*cut\.jpg"):
        C.load_dataset("folder", str(tmp_path / "d"), train=True, image_size=16)


def test_one_class_folder_and_data_root_file_are_one_line(tmp_path):
    """A one-class folder once gave the class-incremental scripts a trivial 100% (an
    evaluator of one class); a --data-root that is a file gave torchvision's traceback."""
    _image_folder(tmp_path / "one", ["only"], n=4)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "mergan_jtr.py"), "--dataset",
                        "folder", "--data-root", str(tmp_path / "one"), "--out",
                        str(tmp_path / "run"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "1 class found; the class-incremental scripts need at least 2" in r.stderr
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.UserError, match="--data-root .*file is a file; mnist needs a folder"):
        C.load_dataset("mnist", str(tmp_path / "file"))


def test_checkpoints_missing_corrupt_or_of_another_script(tmp_path):
    """Missing is 'not found' (once 'corrupt ... delete it'); another script's run is
    refused on --resume; a partial write left by a kill (*.tmp) is removed on --resume."""
    with pytest.raises(C.UserError, match=r"checkpoint .*nope\.pt not found"):
        R.load_checkpoint(str(tmp_path / "nope.pt"))
    out, _ = R.prepare_run(_args(tmp_path), "mergan_jtr")
    R.save_checkpoint(out, {"task": 0, "args": vars(_args(tmp_path))})
    assert R.load_checkpoint(os.path.join(out, "checkpoint.pt"))["script"] == "mergan_jtr"
    with pytest.raises(C.UserError, match="is a run of mergan_jtr, not of dgm"):
        R.prepare_run(_args(tmp_path, resume=True), "dgm")
    (pathlib.Path(out) / "checkpoint.pt.tmp").write_bytes(b"half")
    R.prepare_run(_args(tmp_path, resume=True), "mergan_jtr")
    assert not os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))


def test_unwritable_out_is_one_line(tmp_path):
    """--out below a file (the same OSError path as a read-only or full disk)."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(C.UserError, match="cannot write there"):
        R.prepare_run(_args(tmp_path, out=str(tmp_path / "f" / "run")), "test")


def test_interrupt_says_whether_there_is_anything_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first checkpoint once claimed 'the last finished task is
    checkpointed'."""
    def stop(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "RUN_FOLDER", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        R.cli(stop, [])
    assert e.value.code == 130
    assert "interrupted: before the first checkpoint: nothing to resume" in capsys.readouterr().err
    R.save_checkpoint(str(tmp_path), {"task": 0})
    with pytest.raises(SystemExit):
        R.cli(stop, [])
    assert f"checkpointed in {tmp_path}; rerun with --resume" in capsys.readouterr().err


def test_negative_numbers_are_values_and_judged_by_their_type(capsys):
    """argparse read `--classes -1,2` and `--solver-lr -1e-3` as flags ("expected one
    argument"); they are values, refused in one line by what they are (issue 37)."""
    import dgr
    import mergan_ra
    for main, argv, said in (
            (mergan_ra.main, ["--classes", "-1,2"], "--classes '-1,2': classes must be in 0..9"),
            (dgr.main, ["--solver-lr", "-1e-3"],
             "argument --solver-lr: must be a positive number, got -1e-3")):
        with pytest.raises(SystemExit) as e:
            R.cli(main, ["--dataset", "synth", "--device", "cpu", *argv])
        assert e.value.code == 2 and capsys.readouterr().err.strip() == f"error: {said}"


def test_metrics_are_never_ahead_of_the_checkpoint(data_root, tmp_path, monkeypatch):
    """A kill between the two writes of a task's end once left metrics.json a task ahead of
    checkpoint.pt: the checkpoint is now written first."""
    import mergan_jtr
    saves = []

    def killed_at_task_2(out, state):
        if state["task"] == 1:
            raise KeyboardInterrupt
        saves.append(state["task"])
        C.atomic_save(dict(state, rng=R.rng_state()), os.path.join(out, R.CHECKPOINT))
    monkeypatch.setattr(R, "save_checkpoint", killed_at_task_2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        mergan_jtr.main(["--dataset", "synth", "--classes", "0,1", "--iters", "2", "--dim",
                         "8", "--batch-size", "8", "--eval-samples", "10", "--device", "cpu",
                         "--data-root", data_root, "--out", str(out), "--log-every", "10"])
    import json
    assert saves == [0]
    assert json.loads((out / "metrics.json").read_text())["tasks_done"] == 1


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_corrupt_mnist_files_are_not_called_missing(tmp_path, damage):
    """Garbage, empty or truncated idx files once gave torchvision's AssertionError or were
    reported as 'not found': now one line that says they are there but unreadable."""
    write_fake_mnist(tmp_path)
    f = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = f.read_bytes()
    f.write_bytes({"garbage": bytes(range(256)) * 4, "empty": b"",
                   "truncated": data[:len(data) // 2]}[damage])
    with pytest.raises(C.UserError, match="its files are there but cannot be read"):
        C.load_dataset("mnist", str(tmp_path), train=True, download=False)


def test_mnist_image_and_label_counts_must_agree(tmp_path):
    """20 images with 10 labels were once accepted (torchvision does not compare them)."""
    write_fake_mnist(tmp_path)
    f = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    f.write_bytes(np.array([2049, 10], dtype=">i4").tobytes() + bytes(range(10)))
    with pytest.raises(C.UserError, match="20 images but 10 labels in the training files"):
        C.load_dataset("mnist", str(tmp_path), train=True, download=False)


def test_authors_evaluators_have_merganss_layers_and_cache_apart(synth_eval, tmp_path):
    """--evaluator authors: MeRGAN's MNIST MLP (32x32 flattened -> 1024-512-256-128 -> 10)
    for grey images and its SVHN net (3x3 convs 32,32 | 64,64 | 128,128,128, three pools,
    fc 512-128 -> 10) for colour ones; trained like ours and cached in a file of its own,
    so the two never load each other."""
    mlp = C.make_classifier("authors", 1, 10, 16)
    lin = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [
        (1024, 1024), (1024, 512), (512, 256), (256, 128), (128, 10)]
    conv = C.make_classifier("authors", 3, 10, 16)
    assert [m.out_channels for m in conv.modules() if isinstance(m, torch.nn.Conv2d)] == [
        32, 32, 64, 64, 128, 128, 128]
    assert [(m.in_features, m.out_features) for m in conv.modules()
            if isinstance(m, torch.nn.Linear)] == [(2048, 512), (512, 128), (128, 10)]
    x = torch.rand(2, 3, 32, 32)
    assert conv(x).shape == (2, 10) and conv.body(x).shape == (2, 128)
    args, _, ours_acc, train, test = synth_eval
    a = argparse.Namespace(dataset="synth", data_root=args.data_root, evaluator="authors")
    path_authors = os.path.join(args.data_root, "evaluators", "synth-32px-n10000-authors-v1.pt")
    draws = []
    for ns in (args, a, a):  # ours (cached), authors (trained, then cached)
        torch.manual_seed(5)
        model, acc = C.get_evaluator(ns, train, test, 10, torch.device("cpu"),
                                     log=lambda *m: None)
        draws.append(torch.rand(3))
    assert model.body[2].in_features == 1024 and acc > 80 and os.path.exists(path_authors)
    # the judge never changes the run's random stream (so not the generator it judges)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_every_file_a_run_writes_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill in the middle of a write (here: the writer writes half a file, then stops)
    leaves the previous file as it was, and a partial *.tmp that --resume removes. Once, a
    kill left a 0-byte samples_task<k>.png."""
    img = np.zeros((4, 4, 3), np.uint8)
    z = torch.zeros(2, 3)

    def generate(z, y):
        return torch.zeros(len(z), 1, 4, 4)
    writers = {  # file -> a call that (re)writes it
        "samples_task1.png": lambda p: C.class_grid(generate, [0, 1], [0], z, p),
        "shots.png": lambda p: C.write_image(p, img),
        "samples.gif": lambda p: C.save_gif([img, img], p),
        "metrics.json": lambda p: C.save_json(p, {"a": 1}),
        "checkpoint.pt": lambda p: C.atomic_save({"a": 1}, p)}
    for name, write in writers.items():
        path = str(tmp_path / name)
        write(path)
        before = open(path, "rb").read()
        assert len(before) > 0

        def half(*a, **k):  # the target: a file name, or an open file's name
            target = [getattr(v, "name", v) for v in a[:2] if isinstance(
                getattr(v, "name", v), str)][0]
            with open(target, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            for mod, fn in ((C.imageio, "imwrite"), (C.imageio, "mimsave"),
                            (C.json, "dump"), (C.torch, "save")):
                m.setattr(mod, fn, half)
            with pytest.raises(KeyboardInterrupt):
                write(path)
        assert open(path, "rb").read() == before, name


def test_what_once_ended_in_a_traceback_is_one_line(tmp_path, image_folder, capsys):
    """Issue 27's tracebacks and unclear messages, each now one UserError naming the file or
    flag: MNIST labels outside its classes, a data root that is a file (synth too, whose
    evaluator is cached there), a folder with train/ but no test/, an out-of-memory
    error (cli); and a class of fewer than 10 images is said to be judged on its training
    images."""
    write_fake_mnist(tmp_path / "m")
    lab = tmp_path / "m" / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    lab.write_bytes(lab.read_bytes()[:-1] + bytes([12]))
    with pytest.raises(C.UserError, match=r"labels 0..12 in the training files, outside 0..9"):
        C.load_dataset("mnist", str(tmp_path / "m"), True, download=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.UserError, match="is a file; synth needs a folder"):
        C.load_dataset("synth", str(tmp_path / "file"))
    (image_folder / "train").mkdir()
    with pytest.raises(C.UserError, match="has train/ but no test/"):
        C.load_dataset("folder", str(image_folder), False)
    (image_folder / "train").rmdir()
    C.load_dataset("folder", str(image_folder), False, image_size=8)  # 12 images a class
    assert "note:" not in capsys.readouterr().out
    for f in sorted((image_folder / "class1").iterdir())[3:]:
        f.unlink()
    C.load_dataset("folder", str(image_folder), False, image_size=8)
    assert "classes class1 have fewer than 10 images, so their test images are their " \
           "training images" in capsys.readouterr().out

    def oom(argv):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")
    with pytest.raises(SystemExit) as e:
        R.cli(oom, [])
    assert e.value.code == 2
    assert "out of memory (CUDA out of memory. Tried to allocate 9.00 GiB): try a smaller " \
           "--dim (dgm: --ngf, --ndf), --batch-size" in capsys.readouterr().err

    def bug(argv):
        raise RuntimeError("a bug, not the user's")
    with pytest.raises(RuntimeError, match="a bug"):  # other errors stay tracebacks
        R.cli(bug, [])


def test_a_full_disk_is_one_line_and_keeps_the_last_good_file(tmp_path, monkeypatch):
    """torch.save on a full disk raised 'RuntimeError: unexpected pos ...' with no word of
    disk space; now a write that fails says so, removes its partial file and keeps the
    previous one."""
    path = str(tmp_path / "checkpoint.pt")
    C.atomic_save({"task": 0}, path)
    pos = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    for err, free, why in ((pos, 2**20, "a full disk"), (OSError(28, "No space left"), None,
                           "a full disk"), (pos, 2**40, "a file-size limit"),  # (issue 37)
                           (OSError(27, "File too large"), None, "a file-size limit")):
        def full(obj, target, err=err):
            open(target, "wb").write(b"par")
            raise err
        monkeypatch.setattr(C.torch, "save", full)
        if free:  # torch.save's RuntimeError: the room left tells the two apart
            monkeypatch.setattr(C.shutil, "disk_usage", lambda p, free=free: argparse.Namespace(
                free=free))
        with pytest.raises(C.UserError, match=r"cannot write .*checkpoint.pt .* MiB free there "
                                              rf"\({why}\?\): the last good files are kept"):
            C.atomic_save({"task": 1}, path)
        monkeypatch.undo()
        assert torch.load(path) == {"task": 0} and os.listdir(tmp_path) == ["checkpoint.pt"]

    def denied(obj, target):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(C.torch, "save", denied)
    with pytest.raises(C.UserError) as err:  # not every failed write is a full disk
        C.atomic_save({"task": 1}, path)
    assert "Permission denied" in str(err.value) and "full disk" not in str(err.value)


def test_healthy_bounds_reads_the_largest_loss_and_weight(tmp_path, capsys):
    """benchmarks/healthy_bounds.py, the measurement behind LOSS_BOUND and WEIGHT_BOUND."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import healthy_bounds
    (tmp_path / "ra.log").write_text(
        "[task 1/5] it     20/200  d_loss -3.5000  g_loss +12.0000  ra_loss +0.0000  "
        "50.00 it/s  ETA 0:03\n[task 2/5] it     20/200  d_loss +7.2500  g_loss -2.0000  "
        "ra_loss +1237.3044  s +50000.0000   49.00 it/s  ETA 0:02\n")
    G = torch.nn.Linear(2, 2)
    with torch.no_grad():
        G.weight[0, 1] = -1.75
    torch.save({"models": {"G": G.state_dict()}}, tmp_path / "checkpoint.pt")
    healthy_bounds.main([str(tmp_path)])
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.split() and line.split()[0] in ("d_loss", "g_loss", "ra_loss", "s")}
    assert rows == {"d_loss": 7.25, "g_loss": 12.0, "ra_loss": 1237.30}, out
    assert re.search(r"G +parameters +1.75 ", out), out


# -- Issue 37, round three: run records, a read-only data root, a run that stopped early --
def _hashes(folder):
    import hashlib
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(folder).iterdir())}


def _tiny(data_root, out, *more):
    return ["--dataset", "synth", "--classes", "0,1", "--iters", "2", "--dim", "8",
            "--batch-size", "8", "--eval-samples", "10", "--device", "cpu", "--log-every",
            "10", "--data-root", str(data_root), "--out", str(out), *more]


def test_run_records_are_read_as_the_command_line_is(data_root, tmp_path, capsys):
    """--resume trusted args.json: `[]` gave an AttributeError, "iters": "abc" a TypeError
    inside training, a hand-edited lr resumed silently at the new rate, another script's
    record an AttributeError. Each is now one line, with no file of the run changed; the
    restored record resumes."""
    import ewc_fewshot
    import mergan_jtr
    out = tmp_path / "run"
    R.cli(mergan_jtr.main, _tiny(data_root, out, "--max-tasks", "1"))
    good = (out / "args.json").read_text()
    rec = json.loads(good)
    for main, text, said in (
            (mergan_jtr.main, "[]", "is not the record of a mergan_* run (not a dictionary)"),
            (mergan_jtr.main, json.dumps(dict(rec, iters="abc")),
             "argument --iters: must be at least 1, got 'abc'"),
            (mergan_jtr.main, json.dumps(dict(rec, lr="abc")), "argument --lr: must be a "),
            (mergan_jtr.main, json.dumps(dict(rec, lr=2e-3)),
             "args.json differs from the run's own record in its checkpoint (--lr 0.002, "
             "checkpoint 0.0001)"),
            (mergan_jtr.main, json.dumps(dict(rec, script="ewc_fewshot")),
             "is not the record of a mergan_* run (a ewc_fewshot run's)"),
            (ewc_fewshot.main, good, "is not the record of a ewc_fewshot* run (a mergan_jtr "
             "run's)")):
        (out / "args.json").write_text(text)
        before = _hashes(out)
        with pytest.raises(SystemExit) as e:
            R.cli(main, ["--resume", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and said in err, err
        assert _hashes(out) == before
    (out / "args.json").write_text(good)
    R.cli(mergan_jtr.main, ["--resume", "--out", str(out)])
    assert json.loads((out / "metrics.json").read_text())["tasks_done"] == 2


def test_a_read_only_data_root_caches_the_evaluator_in_the_users_cache(tmp_path, monkeypatch,
                                                                      capsys):
    """A data root that cannot take the evaluator's cache (a read-only mount; here its
    `evaluators` path is taken by a file, which root cannot write into either) once ended in
    a traceback after the evaluator had trained. Where the cache goes is now decided before
    training: the user's cache folder (under $TORCH_HOME), read back by the next run."""
    import mergan_jtr
    root = tmp_path / "ro"
    root.mkdir()
    (root / "evaluators").write_text("not a folder")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "cl-gans-evaluators"
    R.cli(mergan_jtr.main, _tiny(root, tmp_path / "a", "--max-tasks", "1"))
    said = capsys.readouterr().out
    assert f"is not writable; cached in {cache}" in said
    assert said.index("not writable") < said.index("evaluator (ours): training")
    assert [p.name for p in cache.iterdir()] == ["synth-32px-n10000-v1.pt"]
    R.cli(mergan_jtr.main, _tiny(root, tmp_path / "b", "--max-tasks", "1"))
    assert f"evaluator: loaded {cache}" in capsys.readouterr().out
    assert (root / "evaluators").read_text() == "not a folder"


def test_a_write_failure_before_the_first_checkpoint_says_rerun(data_root, tmp_path,
                                                                 monkeypatch, capsys):
    """A file-size limit hit by the first checkpoint advised --resume, which then found
    nothing, and the same command was refused because of the run's own sample grid. Now it
    says the limit may be the cause, that there is nothing to resume, and the rerun works."""
    import mergan_jtr
    out = tmp_path / "run"
    save = C.torch.save

    def too_large(obj, f):
        if str(f).endswith("checkpoint.pt.tmp"):
            raise OSError(27, "File too large")
        save(obj, f)
    monkeypatch.setattr(C.torch, "save", too_large)
    with pytest.raises(SystemExit) as e:
        R.cli(mergan_jtr.main, _tiny(data_root, out))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.endswith("(a file-size limit?): the last good files are kept; fix it: before "
                        "the first checkpoint: nothing to resume; rerun the command"), err
    assert sorted(os.listdir(out)) == ["args.json", "samples_task1.png"]
    monkeypatch.undo()
    R.cli(mergan_jtr.main, _tiny(data_root, out))
    assert json.loads((out / "metrics.json").read_text())["tasks_done"] == 2
    (tmp_path / "mine").mkdir()  # a grid beside no run's args.json is the user's: kept
    (tmp_path / "mine" / "samples_task1.png").write_bytes(b"mine")
    with pytest.raises(SystemExit):
        R.cli(mergan_jtr.main, _tiny(data_root, tmp_path / "mine"))
    assert "is not empty (samples_task1.png" in capsys.readouterr().err
