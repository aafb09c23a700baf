"""EWC (ewc_fewshot.py): Fisher information, the penalty, adaptation under large and zero
lambda, the evaluation measures, end-to-end few-shot runs, user errors. (MeRGAN's sequential
EWC baseline is `mergan_jtr.py --mode ewc`, tested in test_mergan.py.)"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import ewc_fewshot as E

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


def test_fisher_of_the_dcgan_uses_the_frozen_discriminator_only():
    """The Fisher stage gives every generator parameter a non-negative value, touches no
    discriminator weight and leaves both networks unchanged."""
    torch.manual_seed(0)
    G, D = E.DCGANGenerator(1, 4, 8, 32), E.DCGANDiscriminator(1, 4, 32)
    D(torch.zeros(2, 1, 32, 32))  # one training-mode pass: spectral norm's u, v settle
    D.eval().requires_grad_(False)
    g0, d0 = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    fisher = E.fisher_information(G, E.source_log_likelihood(D), n=6, batch=4)
    assert set(fisher) == {k for k, _ in G.named_parameters()}
    assert all((f >= 0).all() and f.shape == p.shape for (k, p), f in
               zip(G.named_parameters(), fisher.values()))
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(p.grad is None for p in D.parameters())
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in g0.items())
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in d0.items())


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
    x, _ = C.make_synth(1, seed=3, color="amber")
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
        G_ad, frames = E.adapt(G, D, shots, fisher, lam, args, z)
        out[lam] = moved(G, G_ad)
        assert len(frames) == 8 and frames[0].shape == (2, 3, 32, 32)
    assert out[0.0] > 0.05, out
    assert out[1e12] < 0.2 * out[0.0], out


# ------------------------------------------------------------------------------------------
# Evaluation measures
# ------------------------------------------------------------------------------------------
def test_intra_cluster_diversity_known_answer():
    """Two shots at (0,0) and (10,0); generated points (0,1), (0,-1), (1,0) near the first
    and (10,2), (10,4) near the second, one point at (20,0) alone near the second... The
    mean squared pairwise distance within each cluster, averaged over clusters."""
    shots = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    gen = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [10.0, 2.0], [10.0, 4.0]])
    div, sizes = E.intra_cluster_diversity(gen, shots)
    c1 = (4 + 2 + 2) / 3          # pairs: (0,1)-(0,-1) 4, (0,1)-(1,0) 2, (0,-1)-(1,0) 2
    c2 = 4.0                      # (10,2)-(10,4)
    assert sizes == [3, 2]
    assert div == pytest.approx((c1 + c2) / 2)
    # copies of the shots have zero diversity
    assert E.intra_cluster_diversity(shots.repeat(5, 1), shots)[0] == 0.0


def test_perceptual_features_give_the_lpips_style_distance():
    """||phi(a) - phi(b)||^2 = sum over the 3 conv blocks of mean_hw ||f_a - f_b||^2 with
    channel-normalised activations (after each block's ReLU), computed here directly."""
    torch.manual_seed(0)
    net = C.Evaluator(3, 10, width=8).eval()
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    want, ha, hb = 0.0, a, b
    with torch.no_grad():
        for m in net.body:
            ha, hb = m(ha), m(hb)
            if isinstance(m, nn.ReLU) and ha.dim() == 4:
                na = ha / (ha.square().sum(1, keepdim=True).sqrt() + 1e-10)
                nb = hb / (hb.square().sum(1, keepdim=True).sqrt() + 1e-10)
                want += float((na - nb).square().sum(1).mean())
    fa, fb = E.perceptual_features(net, a), E.perceptual_features(net, b)
    assert float((fa - fb).square().sum()) == pytest.approx(want, rel=1e-5)


def test_domains_convert_channels_and_folders_of_loose_images(tmp_path):
    x, y, _ = E.load_domain("synth", None, False, None, 3, False)
    assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    g, _, _ = E.load_domain("synth-color", None, False, None, 1, False)
    assert g.shape[1:] == (1, 32, 32)
    import imageio.v2 as imageio
    imgs, _ = C.make_synth(1, seed=4, color=True)
    (tmp_path / "mine").mkdir()
    for i, im in enumerate(imgs[:5]):
        imageio.imwrite(tmp_path / "mine" / f"{i}.png", im.permute(1, 2, 0).numpy())
    fx, fy, names = E.load_domain("folder", str(tmp_path / "mine"), True, 32, None, False)
    assert fx.shape == (5, 3, 32, 32) and names == ["mine"] and (fy == 0).all()


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
    for key in ("source", "0", "1e+06"):
        assert m["results"][key]["frechet_distance"] > 0
        assert m["results"][key]["intra_cluster_diversity"] >= 0
    assert len(m["results"]["1e+06"]["weight_change_rate"]) == 4
    assert m["results"]["0"]["ewc_penalty"] > 0  # fine-tuning moved away from theta_S
    assert "synth-amber evaluator" in m["feature_net"]

    r2 = run_script(*flags, "--out", str(out), "--resume")
    assert r2.returncode == 0, r2.stderr
    assert "source: resumed" in r2.stdout and "resumed from the checkpoint" in r2.stdout
    assert "[adapt" not in r2.stdout
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["results"] == m["results"]

    r3 = run_script(*flags, "--out", str(tmp_path / "run2"), "--source-ckpt",
                    str(out / "source.pt"), "--ewc-lambda", "0")
    assert r3.returncode == 0, r3.stderr
    assert "[source]" not in r3.stdout and "source: loaded" in r3.stdout


def test_fewshot_to_a_folder_of_my_own_images(tmp_path, data_root):
    """--target folder --target-root DIR with loose images: one class, so the feature net
    is the fixed random-init evaluator, and the run says so."""
    import imageio.v2 as imageio
    imgs, _ = C.make_synth(1, seed=6, color=True)
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
    assert m["feature_net"].startswith("random-init evaluator")


def test_user_errors_are_one_line(tmp_path):
    cases = [(["--source", "nope"], "unknown dataset 'nope'"),
             (["--ewc-lambda", "a,b"], "--ewc-lambda must be comma-separated numbers"),
             (["--source", "synth", "--target", "synth-amber", "--shots", "0"],
              "--shots must be at least 1")]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cases.append((["--source", "synth", "--target", "synth-amber", "--source-ckpt", str(bad),
                   "--dim", "4", "--out", str(tmp_path / "r")], "is corrupt or unreadable"))
    for flags, msg in cases:
        r = run_script(*flags, "--data-root", str(tmp_path))
        assert r.returncode == 2, (flags, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow  # the slow tier: python -m pytest -m slow
@pytest.mark.parametrize("seed", [0])
def test_ewc_keeps_diversity_that_fine_tuning_loses(tmp_path, data_root, seed):
    """The paper's claim on the offline pair synth -> synth-amber (same digit shapes, amber
    on navy instead of white on black), 10 shots: all three stages, 1,500 source and 300
    adaptation iterations at width 32 (about 4 CPU minutes). Plain fine-tuning collapses
    onto copies of a few shots; EWC (lambda 1e5) keeps the source's variety.
    Measured (intra-cluster diversity FT / EWC; FD FT / EWC), seed 0: 0.18 / 0.70,
    490 / 317; seeds 1 and 2 (an earlier revision, docs/ewc_fewshot.md): 0.06 / 0.56,
    872 / 353 and 0.14 / 0.54, 740 / 698. Asserted:
    EWC's diversity at least 2x fine-tuning's and 0.2 above it, and its Frechet distance
    to the full target set not worse than fine-tuning's."""
    out = tmp_path / "run"
    r = run_script("--source", "synth", "--target", "synth-amber", "--dim", "32",
                   "--source-iters", "1500", "--iters", "300", "--fisher-samples", "300",
                   "--fd-samples", "500", "--diversity-samples", "500", "--log-every", "500",
                   "--ewc-lambda", "0,1e5", "--seed", str(seed), "--data-root", data_root,
                   "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "metrics.json").read_text())["results"]
    ft, ewc = res["0"], res["100000"]
    assert ewc["intra_cluster_diversity"] >= 2 * ft["intra_cluster_diversity"], res
    assert ewc["intra_cluster_diversity"] >= ft["intra_cluster_diversity"] + 0.2, res
    assert ewc["frechet_distance"] <= ft["frechet_distance"], res
    # Section 3.1: fine-tuning moves every layer far more than EWC does
    for k, rate in ft["weight_change_rate"].items():
        assert ewc["weight_change_rate"][k] < rate, (k, res)
