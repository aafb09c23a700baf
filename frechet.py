"""Frechet distances between two sets of features (Heusel et al. 2017's FID, on any
features: the evaluator's, or torchvision's Inception-v3 for an Inception FID), for
Table 2's FID rows (mergan_lsun.py) and the few-shot script's distances between domains.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C


@torch.no_grad()
def features(model, x, batch=1000):
    """The classifier's features (its body's output) of float images x."""
    return torch.cat([model.body(x[i:i + batch]) for i in range(0, len(x), batch)])


def frechet_distance(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples)."""
    f1, f2 = f1.double(), f2.double()
    return frechet_from_stats(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T))


def frechet_from_stats(mu1, s1, mu2, s2):
    """d^2 = ||mu1-mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), where S1 S2 is similar to the
    symmetric PSD M = S1^(1/2) S2 S1^(1/2): tr (S1 S2)^(1/2) = sum sqrt(eig(M)), eigenvalues
    clamped at 0. Stable for rank-deficient covariances; no complex numbers, no scipy."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    d2 = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * ev.sqrt().sum()
    return float(d2.clamp(min=0))


def inception_features(device):
    """f(x): torchvision's Inception-v3 2048-d pool features of images in [-1, 1] (1 or 3
    channels, any size), for Inception FID. The weights are downloaded once (offline: a
    UserError); not the TF-FID Inception: comparable among themselves, not to papers'."""
    from torchvision.models import Inception_V3_Weights, inception_v3
    try:
        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, aux_logits=True)
    except Exception as err:
        raise C.UserError("Inception FID needs torchvision's Inception-v3 weights, which could "
                          f"not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          "use the evaluator-feature Frechet distance offline")
    net.fc = nn.Identity()
    net = net.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def f(x, batch=100):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return torch.cat([net((F.interpolate((x[i:i + batch] + 1) / 2, (299, 299),
                                             mode="bilinear", align_corners=False) - mean) / std)
                          for i in range(0, len(x), batch)])
    return f
