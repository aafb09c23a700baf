"""EWC (ewc_fewshot.py): Fisher information, the penalty, adaptation under large and zero
lambda, the evaluation measures, end-to-end few-shot runs, user errors. (MeRGAN's sequential
EWC baseline is `mergan_jtr.py --mode ewc`, tested in test_mergan.py.)"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import ewc_fewshot as E
import frechet as FD
import local_data as LD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ewc_fewshot.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------------------------------
# Fisher information and the penalty
# ------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """A 'generator' with two parameter tensors whose per-sample gradients are known."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor(0.3))


def test_fisher_is_the_mean_of_squared_per_sample_gradients():
    """log L(x_j) = log sigmoid(w.z_j + b) for 7 fixed z_j, in batches of 3: the Fisher must
    be mean_j (dl_j/dtheta)^2 with dl_j/dw = sigmoid(-(w.z_j + b)) z_j, computed by hand,
    and clearly not the square of the mean gradient."""
    torch.manual_seed(0)
    Z = torch.randn(7, 3) * 2
    G = Tiny()
    drawn = []

    def log_likelihood(G, m):
        z = Z[len(drawn):len(drawn) + m]
        drawn.extend(range(m))
        return F.logsigmoid(z @ G.w + G.b)

    fisher = E.fisher_information(G, log_likelihood, n=7, batch=3)
    with torch.no_grad():
        s = torch.sigmoid(-(Z @ G.w + G.b))           # dl_j/da, a = w.z_j + b
        g_w, g_b = s[:, None] * Z, s                  # per-sample gradients, by hand
    assert torch.allclose(fisher["w"], g_w.square().mean(0), rtol=1e-5)
    assert torch.allclose(fisher["b"], g_b.square().mean(), rtol=1e-5)
    # the square of the averaged gradient is a different quantity
    assert not torch.allclose(fisher["w"], g_w.mean(0).square(), rtol=0.1)
    assert (fisher["w"] > g_w.mean(0).square()).all()   # Jensen: E[g^2] >= E[g]^2


def test_fisher_log_likelihood_is_log_d_of_real_from_the_frozen_discriminator():
    """log L(x | theta) = log D_S(G(z)) = log sigmoid(logit): the discriminator's
    log-probability that the generated image is REAL. Known answers for logits 0, 2, -3:
    log 1/2, -0.126928, -3.048587 (log(1 - D) or a missing sign give other numbers)."""
    class Fixed(nn.Module):  # a "generator" of three constant images, means 0, 2, -3
        nz = 4

        def __init__(self):
            super().__init__()
            self.level = nn.Parameter(torch.tensor([0.0, 2.0, -3.0]))

        def forward(self, z):
            return self.level.view(3, 1, 1, 1).expand(3, 1, 8, 8)

    class MeanLogit(nn.Module):  # logit = the image's mean
        def forward(self, x):
            return x.flatten(1).mean(1)

    ll = E.source_log_likelihood(MeanLogit())(Fixed(), 3)
    want = torch.tensor([math.log(0.5), -0.126928011, -3.048587352])
    assert torch.allclose(ll.detach(), want, atol=1e-6), ll


def test_an_unusable_fisher_is_recomputed_only_while_nothing_was_adapted_with_it(tmp_path):
    """fisher.pt that is corrupt or of other shapes: computed again while no lambda was
    adapted; after one was, the run's own Fisher is never replaced (one-line refusal)."""
    torch.manual_seed(0)
    G, D = E.DCGANGenerator(1, 4, 8, 32), E.DCGANDiscriminator(1, 4, 32)
    D.eval()
    args = argparse.Namespace(fisher_samples=4)
    wrong = {k: torch.ones(3) for k, _ in G.named_parameters()}
    for bad in (b"broken", wrong):
        if isinstance(bad, bytes):
            (tmp_path / "fisher.pt").write_bytes(bad)
        else:
            C.atomic_save({"fisher": bad}, str(tmp_path / "fisher.pt"))
        state = {"done": ["source", "fisher"], "adapted": {"0": {}}, "seconds": {}}
        with pytest.raises(C.UserError, match="lambda 0 were adapted with the original"):
            E.stage_fisher(G, D, args, state, str(tmp_path), "cpu")
        state = {"done": ["source", "fisher"], "adapted": {}, "seconds": {}}
        fisher = E.stage_fisher(G, D, args, state, str(tmp_path), "cpu")
        assert {k: f.shape for k, f in fisher.items()} == {
            k: p.shape for k, p in G.named_parameters()}
        assert state["done"] == ["source", "fisher"]


def test_fisher_of_the_dcgan_comes_from_the_frozen_discriminator():
    """The Fisher stage gives every generator parameter a value of its shape, leaves both
    networks unchanged, does not depend on whether D's weights require gradients, and is
    exactly 0 under a discriminator that ignores its input (log L then has no gradient)."""
    torch.manual_seed(0)
    G, D = E.DCGANGenerator(1, 4, 8, 32), E.DCGANDiscriminator(1, 4, 32)
    D(torch.zeros(2, 1, 32, 32))  # one training-mode pass: spectral norm's u, v settle
    D.eval()
    g0, d0 = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    fishers = []
    for frozen in (True, False):
        D.requires_grad_(not frozen)
        torch.manual_seed(1)
        fishers.append(E.fisher_information(G, E.source_log_likelihood(D), n=6, batch=4))
    fisher = fishers[0]
    assert set(fisher) == {k for k, _ in G.named_parameters()}
    assert all(f.shape == p.shape for (k, p), f in zip(G.named_parameters(), fisher.values()))
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(torch.equal(fisher[k], fishers[1][k]) for k in fisher)
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in g0.items())
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in d0.items())

    class Blind(nn.Module):  # the same logit, 1.5, whatever the image
        def forward(self, x):
            return 0 * x.flatten(1).sum(1) + 1.5
    blind = E.fisher_information(G, E.source_log_likelihood(Blind()), n=4, batch=2)
    assert all(float(f.abs().sum()) == 0.0 for f in blind.values())


def test_penalty_is_zero_at_the_source_and_grows_as_F_delta_squared():
    torch.manual_seed(0)
    G = E.DCGANGenerator(1, 4, 8, 32)
    anchor = {k: p.detach().clone() for k, p in G.named_parameters()}
    fisher = {k: torch.rand_like(p) for k, p in G.named_parameters()}
    assert E.ewc_penalty(G, fisher, anchor).item() == 0.0
    name = "net.3.weight"
    p = dict(G.named_parameters())[name]
    for delta in (1e-2, 2e-2, 0.5):
        with torch.no_grad():
            p.copy_(anchor[name])
            p[0, 0, 1, 2] += delta
        want = float(fisher[name][0, 0, 1, 2]) * delta ** 2
        assert E.ewc_penalty(G, fisher, anchor).item() == pytest.approx(want, rel=1e-4)
    # the gradient of lambda * penalty is 2 lambda F (theta - theta_S)
    lam = 5e8
    (lam * E.ewc_penalty(G, fisher, anchor)).backward()
    want = 2 * lam * float(fisher[name][0, 0, 1, 2]) * 0.5
    assert float(p.grad[0, 0, 1, 2]) == pytest.approx(want, rel=1e-4)
    assert float(p.grad.abs().sum()) == pytest.approx(abs(want), rel=1e-4)


def test_weight_change_rate_per_layer():
    torch.manual_seed(0)
    G = E.DCGANGenerator(1, 4, 8, 32)
    G2 = copy.deepcopy(G)
    with torch.no_grad():
        G2.net[3].weight.mul_(1.1)
    rate = E.weight_change_rate(G, G2)
    assert list(rate) == ["net.0.weight", "net.3.weight", "net.6.weight", "net.9.weight"]
    assert rate["net.3.weight"] == pytest.approx(10.0, rel=1e-4)
    assert rate["net.0.weight"] == rate["net.6.weight"] == rate["net.9.weight"] == 0.0


def shots_and_source(seed=0):
    """A random-init 32px source G/D (dim 8) and 4 synth-amber target images."""
    torch.manual_seed(seed)
    G, D = E.DCGANGenerator(3, 8, 16, 32), E.DCGANDiscriminator(3, 8, 32)
    E.dcgan_init(G)
    x, _ = LD.make_synth(1, seed=3, color="amber")
    return G, D, x[:4]


def moved(G_source, G):
    """Relative L2 distance of all generator parameters from the source."""
    a = torch.cat([p.detach().flatten() for p in G_source.parameters()])
    b = torch.cat([p.detach().flatten() for p in G.parameters()])
    return float((b - a).norm() / a.norm())


def test_huge_lambda_stays_at_the_source_and_zero_lambda_moves():
    """40 adaptation steps from the same source, Fisher and shots: with lambda = 0 the
    generator moves by several % of its norm; with lambda = 1e12 it stays within a
    small fraction of that (Adam's steps are bounded by lr, so the penalty cannot pin the
    weights exactly: they hover around theta_S)."""
    G, D, shots = shots_and_source()
    D.eval().requires_grad_(False)
    fisher = E.fisher_information(G, E.source_log_likelihood(D), n=64, batch=32)
    D.requires_grad_(True)
    args = E.parse_args(["--source", "synth", "--target", "synth-amber", "--iters", "40",
                         "--batch-size", "16", "--log-every", "1000"])
    z = torch.randn(2, 16)
    out = {}
    for lam in (0.0, 1e12):
        torch.manual_seed(1)
        G_ad, frames, adv = E.adapt(G, D, shots, fisher, lam, args, z)
        assert adv > 0  # the mean L_adv = -log D(G(z)) of the last 4 iterations
        out[lam] = moved(G, G_ad)
        assert len(frames) == 8 and frames[0].shape == (2, 3, 32, 32)
    assert out[0.0] > 0.05, out
    assert out[1e12] < 0.2 * out[0.0], out


# ------------------------------------------------------------------------------------------
# Evaluation measures
# ------------------------------------------------------------------------------------------
def test_intra_cluster_diversity_known_answer():
    """Four shots: (0,0) gets 3 generated points, (10,0) gets 2, (20,0) one (a singleton,
    dropped), (-10,0) none (empty, dropped). Squared distances within the clusters:
    (0,1)-(0,-1) 4, (0,1)-(1,0) 2, (0,-1)-(1,0) 2 -> mean 8/3; (10,2)-(10,4) 4. The
    diversity is the mean over the two clusters that have pairs."""
    shots = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [-10.0, 0.0]])
    gen = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [10.0, 2.0], [10.0, 4.0],
                        [20.0, 1.0]])
    div, sizes, used = E.intra_cluster_diversity(gen, shots)
    assert sizes == [3, 2, 1, 0] and used == 2
    assert div == pytest.approx((8 / 3 + 4.0) / 2)
    # copies of the shots have zero diversity; all singletons: nothing to measure
    assert E.intra_cluster_diversity(shots.repeat(5, 1), shots)[0] == 0.0
    assert E.intra_cluster_diversity(shots, shots) == (None, [1, 1, 1, 1], 0)


def test_intra_cluster_diversity_caps_members_per_cluster_like_cdc():
    """One cluster of 4 points on a line, 0, 1, 3, 7 (squared distances 1, 9, 49, 4, 36,
    16): all pairs give 115/6; with cap 3 the value is the pair mean of one of the four
    3-member subsets (14/3, 74/3, 86/3, 56/3), never the full one; cap 0 or >= 4: all."""
    shots = torch.tensor([[0.0, 0.0]])
    gen = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
    full = 115 / 6
    assert E.intra_cluster_diversity(gen, shots, cap=0)[0] == pytest.approx(full)
    assert E.intra_cluster_diversity(gen, shots, cap=4)[0] == pytest.approx(full)
    subsets = [14 / 3, 74 / 3, 86 / 3, 56 / 3]
    got = [E.intra_cluster_diversity(gen, shots, cap=3, seed=s)[0] for s in range(20)]
    which = {min(range(4), key=lambda i: abs(g - subsets[i])) for g in got}
    assert all(min(abs(g - v) for v in subsets) < 1e-4 for g in got), got
    assert len(which) >= 2, got  # different seeds draw different members
    assert E.intra_cluster_diversity(gen, shots, cap=3)[1] == [4]  # sizes before the cap


def test_perceptual_distance_known_answer():
    """A hand-set evaluator (width 1: 1, 2, 4 channels): block 1 passes the pixel, block 2
    gives (pixel, 1), block 3 a constant (1, 1, 1, 1). For a constant +1 image a and a
    constant -1 image b the channel-normalised activations are: block 1 (1) vs (0): 1 per
    position; block 2 (1,1)/sqrt2 vs (0,1): 2 - sqrt2; block 3 equal: 0. The distance is
    the sum over blocks of the MEAN over positions: 3 - sqrt2, whatever the image size
    (the mean over positions, not the sum)."""
    net = C.make_classifier("ours", 1, 2, width=1).eval()
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for c in convs:
            c.weight.zero_(), c.bias.zero_()
        convs[0].weight[0, 0, 1, 1] = 1.0
        convs[1].weight[0, 0, 1, 1] = 1.0
        convs[1].bias[1] = 1.0
        convs[2].bias.fill_(1.0)
    a, b = torch.ones(1, 1, 32, 32), -torch.ones(1, 1, 32, 32)
    d = lambda u, v: float((E.perceptual_features(net, u)
                            - E.perceptual_features(net, v)).square().sum())
    assert d(a, b) == pytest.approx(3 - math.sqrt(2), rel=1e-6)
    # 3a: block 2 is (3, 1)/sqrt10 vs (0, 1): 9/10 + (1 - 1/sqrt10)^2
    assert d(3 * a, b) == pytest.approx(1 + 0.9 + (1 - 10 ** -0.5) ** 2, rel=1e-6)
    assert d(a[..., :16, :16], b[..., :16, :16]) == pytest.approx(3 - math.sqrt(2), rel=1e-6)
    assert d(a, a) == 0.0


def test_target_share_is_the_softmax_mass_of_the_target_classes():
    """2 source + 2 target classes. Logits (0,0,0,0): target mass exactly 1/2, not above
    it -> source; (0,0,1,0): (e+1)/(e+3) = 0.686 -> target; (5,0,0,0) -> source;
    (0,0,0,3) -> target. Share 1/2."""
    logits = torch.tensor([[0.0, 0, 0, 0], [0, 0, 1, 0], [5, 0, 0, 0], [0, 0, 0, 3]])

    class Table(nn.Module):
        def forward(self, x):
            return logits[x.flatten(1)[:, 0].long()]
    x = torch.arange(4.0).view(4, 1, 1, 1)
    assert E.target_share(Table(), x, 2, per_image=True).tolist() == [False, True, False,
                                                                       True]
    assert E.target_share(Table(), x, 2, batch=3) == 0.5


@pytest.mark.slow  # trains the joint evaluator (about 25 s): the slow tier
def test_joint_evaluator_sees_the_targets_look(data_root):
    """The evaluator of every few-shot metric, trained on synth + synth-amber (the same
    digits; white on black vs amber on navy): held-out images of each domain are assigned
    to their own domain, and on its features the source's own images are far from the
    target set while the target's held-out images are close. (A target-only digit
    classifier put the grey source as close to the amber target as a good adaptation.)"""
    args = E.parse_args(["--source", "synth", "--target", "synth-amber", "--data-root",
                         data_root])
    dom = {}
    for name in ("synth", "synth-amber"):
        x, y, names = E.load_domain(name, None, True, 32, 3, False)
        tx, ty, _ = E.load_domain(name, None, False, 32, 3, False)
        dom[name] = (x, y, names, tx, ty)
    net, n_src, desc = E.joint_evaluator(args, dom["synth"], dom["synth-amber"],
                                         torch.device("cpu"))
    assert n_src == 10 and desc["class_accuracy"] > 90 and desc["domain_accuracy"] > 99
    src_test = C.to_float(dom["synth"][3][:1000])
    tgt_test = C.to_float(dom["synth-amber"][3][:1000])
    assert E.target_share(net, tgt_test, n_src) > 0.99
    assert E.target_share(net, src_test, n_src) < 0.01
    tgt_feat = FD.features(net, C.to_float(dom["synth-amber"][0][:2000]))
    fd_tgt = FD.frechet_distance(FD.features(net, tgt_test), tgt_feat)
    fd_src = FD.frechet_distance(FD.features(net, src_test), tgt_feat)
    assert fd_src > 10 * fd_tgt, (fd_src, fd_tgt)


def test_domains_convert_channels_and_folders_of_loose_images(tmp_path):
    x, y, _ = E.load_domain("synth", None, False, None, 3, False)
    assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    g, _, _ = E.load_domain("synth-color", None, False, None, 1, False)
    assert g.shape[1:] == (1, 32, 32)
    import imageio.v2 as imageio
    imgs, _ = LD.make_synth(1, seed=4, color=True)
    (tmp_path / "mine").mkdir()
    for i, im in enumerate(imgs[:5]):
        imageio.imwrite(tmp_path / "mine" / f"{i}.png", im.permute(1, 2, 0).numpy())
    fx, fy, names = E.load_domain("folder", str(tmp_path / "mine"), True, 32, None, False)
    assert fx.shape == (5, 3, 32, 32) and names == ["mine"] and (fy == 0).all()
    (tmp_path / "one").mkdir()  # issue 37: once a linalg.eigh error after 40 s of training
    imageio.imwrite(tmp_path / "one" / "0.png", imgs[0].permute(1, 2, 0).numpy())
    with pytest.raises(C.UserError, match="1 image.* the measures need at least 2"):
        E.load_domain("folder", str(tmp_path / "one"), True, 32, None, False)


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------
@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_fewshot_end_to_end_and_resume(tmp_path, data_root):
    """All three stages on the offline pair with tiny budgets, every output written; a
    second call with --resume finds every stage done and reproduces the same results; a
    new run from --source-ckpt skips the source stage."""
    out = tmp_path / "run"
    flags = ["--source", "synth", "--target", "synth-amber", "--source-iters", "30",
             "--iters", "16", "--dim", "8", "--fisher-samples", "20", "--fd-samples", "100",
             "--diversity-samples", "100", "--shots", "5", "--log-every", "10",
             "--ewc-lambda", "0,1e6", "--data-root", data_root, "--device", "cpu"]
    r = run_script(*flags, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "[adapt lambda=1e+06] it     10/16" in r.stdout and "ewc_penalty" in r.stdout
    for f in ("shots.png", "source_samples.png", "comparison.png", "adaptation.gif",
              "samples_lambda0.png", "samples_lambda1e+06.png", "source.pt", "fisher.pt",
              "metrics.json", "checkpoint.pt", "args.json"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "ewc-fewshot" and m["shots"] == 5 and m["lambdas"] == [0.0, 1e6]
    assert m["evaluator"]["name"].startswith("joint synth+synth-amber evaluator (20 classes")
    for key in ("source", "0", "1e+06"):
        r = m["results"][key]
        assert r["fd_to_target"] > 0 and r["fd_to_source"] > 0, r
        share = 100 * r["target_share"]  # a share of 100 images
        assert 0 <= share <= 100 and abs(share - round(share)) < 1e-4, r
        assert sum(r["cluster_sizes"]) == 100 and len(r["cluster_sizes"]) == 5, r
        assert r["clusters_used"] == sum(n > 1 for n in r["cluster_sizes"]), r
        assert set(r) - {"fd_samples", "cluster_sizes", "seconds", "lambda_times_penalty"} \
            <= set(m["metric_definitions"]), r  # every number is defined beside it
    r = m["results"]["1e+06"]
    assert len(r["weight_change_rate"]) == 4
    assert r["penalty_over_adv"] == pytest.approx(1e6 * r["ewc_penalty"] / r["g_adv_final"])
    assert m["results"]["0"]["ewc_penalty"] > 0  # fine-tuning moved away from theta_S
    assert list(m["fisher"]["per_layer_mean"]) == list(r["weight_change_rate"])

    # A run's own inputs are never replaced: not by another source, not by a new Fisher
    # once a lambda was adapted with the original one (docs/core.md, "Nothing lost")
    files = {f: (out / f).read_bytes() for f in os.listdir(out)}
    fisher = files["fisher.pt"]
    (out / "fisher.pt").write_bytes(b"broken")
    other = tmp_path / "other.pt"
    other.write_bytes(files["source.pt"])
    for extra, msg in (([], "lambda 0, 1e+06 were adapted with the original"),
                       (["--source-ckpt", str(other)], "--source-ckpt None -> ")):
        r2 = run_script(*flags, "--out", str(out), "--resume", *extra)
        assert r2.returncode == 2 and msg in r2.stderr, r2.stderr
        assert len(r2.stderr.strip().splitlines()) == 1, r2.stderr
        assert {f: (out / f).read_bytes() for f in os.listdir(out)} == dict(
            files, **{"fisher.pt": b"broken"})  # nothing written
    (out / "fisher.pt").write_bytes(fisher)
    r2 = run_script(*flags, "--out", str(out), "--resume")
    assert r2.returncode == 0, r2.stderr
    assert "source: resumed" in r2.stdout and "resumed from the checkpoint" in r2.stdout
    assert "[adapt" not in r2.stdout
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["results"] == m["results"]
    # killed during the first adaptation: the last checkpoint is the one after the Fisher
    # stage (no row measured yet); resumed, every row is the uninterrupted run's
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    ck.update(results={}, adapted={}, frames={})
    torch.save(ck, out / "checkpoint.pt")
    r2 = run_script(*flags, "--out", str(out), "--resume")
    assert r2.returncode == 0, r2.stderr
    m3 = json.loads((out / "metrics.json").read_text())
    assert {k: {n: v for n, v in row.items() if n != "seconds"}
            for k, row in m3["results"].items()} == {
        k: {n: v for n, v in row.items() if n != "seconds"} for k, row in m["results"].items()}

    # Section 3.1's setting: a new run from the source checkpoint, adapted to the whole
    # target training set; no diversity (there are no few shots to cluster around)
    # (without the flags such a run would not read: --source-iters, --diversity-samples)
    unread = {"--source-iters", "--diversity-samples"}
    kept = [w for i, w in enumerate(flags) if w not in unread and flags[i - 1] not in unread]
    r3 = run_script(*kept, "--out", str(tmp_path / "run2"), "--source-ckpt",
                    str(out / "source.pt"), "--ewc-lambda", "0", "--shots", "all")
    assert r3.returncode == 0, r3.stderr
    assert "[source]" not in r3.stdout and "source: loaded" in r3.stdout
    assert "10000 shots" in r3.stdout
    m3 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert m3["shots"] == "all" and m3["shot_indices"] == "all"
    assert "intra_cluster_lpips_uncalibrated" not in m3["results"]["0"]
    assert m3["results"]["0"]["fd_to_target"] > 0


def test_fewshot_to_a_folder_of_my_own_images(tmp_path, data_root):
    """--target folder --target-root DIR with loose images: one target class, so the
    joint evaluator has the source's 10 classes and this one."""
    import imageio.v2 as imageio
    imgs, _ = LD.make_synth(1, seed=6, color=True)
    d = tmp_path / "portraits"
    d.mkdir()
    for i, im in enumerate(imgs[:6]):
        imageio.imwrite(d / f"p{i}.png", im.permute(1, 2, 0).numpy())
    r = run_script("--source", "synth", "--target", "folder", "--target-root", str(d),
                   "--image-size", "32", "--source-iters", "10", "--iters", "8", "--dim", "4",
                   "--fisher-samples", "4", "--fd-samples", "20", "--diversity-samples",
                   "20", "--shots", "6", "--ewc-lambda", "0,1e8", "--data-root", data_root,
                   "--out", str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["evaluator"]["name"].startswith("joint synth+folder evaluator (11 classes: 10 "
                                             "source + 1 target)")
    assert not os.path.exists(d / "evaluators")  # the cache is beside the folder, not in it
    assert os.path.isdir(tmp_path / "evaluators")


def test_user_errors_are_one_line(tmp_path):
    cases = [(["--source", "nope"], "unknown dataset 'nope'"),
             (["--ewc-lambda", "a,b"], "--ewc-lambda must be comma-separated numbers"),
             (["--source", "synth", "--target", "synth-amber", "--shots", "0"],
              "--shots: must be at least 1"),
             (["--source", "synth", "--target", "synth-amber", "--diversity-cap", "1"],
              "--diversity-cap must be 0 (every member) or at least 2")]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cases.append((["--source", "synth", "--target", "synth-amber", "--source-ckpt", str(bad),
                   "--dim", "4", "--out", str(tmp_path / "r")], "is corrupt or unreadable"))
    cases.append((["--source", "synth", "--target", "synth-amber", "--source-ckpt",
                   str(tmp_path / "missing.pt"), "--dim", "4", "--out", str(tmp_path / "r2")],
                  "missing.pt not found"))  # once: "corrupt ... delete it"
    other = tmp_path / "mergan.pt"  # another script's checkpoint (once blamed on the dim)
    torch.save({"models": {}, "R": []}, other)
    cases.append((["--source", "synth", "--target", "synth-amber", "--source-ckpt",
                   str(other), "--dim", "4", "--out", str(tmp_path / "r3")],
                  "is not a few-shot source (the source.pt of an ewc_fewshot.py run folder)"))
    cases.append((["--target", "folder", "--target-root", str(bad)],
                  f"--target-root {bad} is a file"))  # once reported as --data-root
    one = tmp_path / "one"  # issue 37: a target of one image, before any training
    one.mkdir()
    imageio.imwrite(one / "0.png", np.zeros((8, 8, 3), np.uint8))
    cases.append((["--target", "folder", "--target-root", str(one), "--out",
                   str(tmp_path / "r4")], "1 image(s) in"))
    for flags, msg in cases:
        r = run_script(*flags, "--data-root", str(tmp_path))
        assert r.returncode == 2, (flags, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
def test_ewc_adapts_with_more_diversity_than_fine_tuning(tmp_path, data_root):
    """The paper's claim on the offline pair synth -> synth-amber (same digit shapes, white
    on black vs amber on navy), 10 shots, judged by the joint evaluator (it sees the
    target's look): all three stages, 1,500 source and 300 adaptation iterations at width
    32 (about 3 CPU minutes), seed 1. lambda 1e3 was chosen on seed 0 (lowest FD to the
    target in the sweep of docs/ewc_fewshot.md). The margins below are set from seeds 1, 2, 3
    as measured at ad4b0bd on a 2-core CPU with one thread (fine-tuning / EWC):
      FD to target       352 / 282    228 / 117    266 / 163   (EWC/FT at most 0.80)
      intra-cluster div 0.27 / 0.40  0.27 / 0.41  0.24 / 0.32  (EWC/FT at least 1.34,
                                                                EWC - FT at least 0.08)
    and seed 1 with two threads (CI): diversity 0.262 / 0.387. The floats differ from
    machine to machine and with the thread count (an earlier machine measured 0.15 / 0.39
    for seed 1), so each bound keeps about 10% of slack below the worst seed; the target
    share was 1.00 for every adapted run and at most 0.004 for the source."""
    out = tmp_path / "run"
    r = run_script("--source", "synth", "--target", "synth-amber", "--dim", "32",
                   "--source-iters", "1500", "--iters", "300", "--fisher-samples", "300",
                   "--fd-samples", "500", "--diversity-samples", "500", "--log-every", "500",
                   "--ewc-lambda", "0,1e3", "--seed", "1", "--data-root", data_root,
                   "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "metrics.json").read_text())["results"]
    src, ft, ewc = res["source"], res["0"], res["1000"]
    div = "intra_cluster_lpips_uncalibrated"
    # both adapted: the evaluator calls their images target, the source's not
    assert src["target_share"] <= 0.05 and ft["target_share"] >= 0.95, res
    assert ewc["target_share"] >= 0.95, res
    # EWC is closer to the full target set and keeps more diversity than fine-tuning
    assert ewc["fd_to_target"] <= 0.9 * ft["fd_to_target"], res
    assert ewc["fd_to_target"] <= 0.5 * src["fd_to_target"], res
    assert ewc[div] >= ft[div] + 0.05 and ewc[div] >= 1.25 * ft[div], res
    # Section 3.1: fine-tuning moves every layer more than EWC does
    for k, rate in ft["weight_change_rate"].items():
        assert ewc["weight_change_rate"][k] < rate, (k, res)
