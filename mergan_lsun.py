"""MeRGAN's Table 2 (Wu et al., NeurIPS 2018, Sec. 4.3): four LSUN scenes at 64x64. Only
`mergan_jtr.py`, `mergan_ra.py` and `dgr.py` import it, and only when asked for (--dataset
lsun, --arch resnet or --final-metrics), so the digit runs carry none of it:

  - the authors' 64x64 ResNets (`ResNetGenerator`, `ResNetCritic`, `mergan_networks`);
  - LSUN's lmdb files (`load_lsun`, behind `load_dataset`);
  - Table 2's rows besides Acc: reverse accuracy and Frechet distances (`table2_report`).
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import frechet as FD
import mergan_nets as M
from mergan_nets import CondBatchNorm2d


# The 64x64 networks of the LSUN experiment (Table 2): the authors' gan64_model.py uses
# WGAN-GP's 64x64 ResNet ("GoodGenerator"/"GoodDiscriminator"): 4 residual blocks up in G
# (batch norm), 4 down in D (layer norm, the right norm for a gradient penalty), DIM 64,
# the label one-hot concatenated to z. ResNetGenerator/ResNetCritic keep the interface of
# Generator/Critic: G(z, y) -> images, D(x) -> (scores, logits), G.nz.
class ResBlockUp(nn.Module):
    """BN, ReLU, 2x nearest upsampling, conv 3x3, BN, ReLU, conv 3x3; plus a shortcut
    (upsampling and a 1x1 conv; done in the other order here, which is the same map)."""

    def __init__(self, c_in, c_out, n_classes):
        super().__init__()
        self.bn1 = CondBatchNorm2d(c_in, n_classes, per_class_affine=False)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn2 = CondBatchNorm2d(c_out, n_classes, per_class_affine=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, y, grouping=None):
        h = self.conv1(F.interpolate(F.relu(self.bn1.normalise(x, y, grouping)),
                                     scale_factor=2))
        h = self.conv2(F.relu(self.bn2.normalise(h, y, grouping)))
        return F.interpolate(self.shortcut(x), scale_factor=2) + h


class ResBlockDown(nn.Module):
    """LN, ReLU, conv 3x3, LN, ReLU, conv 3x3, 2x2 mean pooling; plus a shortcut (mean
    pooling, 1x1 conv). LN = the authors' layer norm: statistics over (C, H, W) per image,
    scale and offset per channel, which is GroupNorm with one group."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.ln1 = nn.GroupNorm(1, c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1, bias=False)
        self.ln2 = nn.GroupNorm(1, c_in, eps=1e-5)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.relu(self.ln1(x)))
        h = F.avg_pool2d(self.conv2(F.relu(self.ln2(h))), 2)
        return self.shortcut(F.avg_pool2d(x, 2)) + h


def resnet_widths(image_size, dim):
    """Channels from 4x4 up to image_size: 64x64 -> [8, 8, 4, 2, 1] x dim (the authors')."""
    n = int(math.log2(image_size // 4))
    if 4 * 2 ** n != image_size or n < 1:
        raise C.UserError(f"image size {image_size} must be 4 x a power of two (16, 32, 64)")
    return [8 * dim] + [min(8, 2 ** (n - 1 - i)) * dim for i in range(n)]


class ResNetGenerator(nn.Module):
    """[z, one_hot(y)] -> Linear -> 4x4 x 8dim -> ResBlockUp x 4 (8, 8, 4, 2, 1 x dim at
    64x64) -> BN, ReLU, conv 3x3 -> tanh. The batch norms use batch statistics per class,
    as the Generator's (the authors' single-class batches), with one shared scale/offset."""

    def __init__(self, channels=3, n_classes=10, dim=64, nz=128, image_size=64):
        super().__init__()
        w = resnet_widths(image_size, dim)
        self.nz, self.n_classes, self.top = nz, n_classes, w[0]
        self.fc = nn.Linear(nz + (n_classes or 0), 4 * 4 * w[0])
        self.blocks = nn.ModuleList([ResBlockUp(w[i], w[i + 1], n_classes)
                                     for i in range(len(w) - 1)])
        self.bn = CondBatchNorm2d(w[-1], n_classes, per_class_affine=False)
        self.out = nn.Conv2d(w[-1], channels, 3, padding=1)

    def forward(self, z, y=None, groups=None, n_groups=None):
        """Images for noise z and labels y; groups/n_groups as in Generator.forward."""
        grouping = self.bn.grouping(y, groups, n_groups, z.dtype)  # once, for every layer
        if self.n_classes:  # the authors' conditioning: the label's one-hot joins z
            z = torch.cat([z, F.one_hot(y, self.n_classes).to(z.dtype)], 1)
        h = self.fc(z).view(len(z), self.top, 4, 4)
        for block in self.blocks:
            h = block(h, y, grouping)
        return torch.tanh(self.out(F.relu(self.bn.normalise(h, y, grouping))))


class ResNetCritic(nn.Module):
    """conv 3x3 (channels -> dim) -> ResBlockDown x 4 (1, 2, 4, 8, 8 x dim at 64x64) ->
    flatten 4x4 x 8dim -> the critic head (1 score) and the classifier head (n_classes
    logits; None: none). No normalisation across the batch, as WGAN-GP requires."""

    def __init__(self, channels=3, n_classes=10, dim=64, image_size=64):
        super().__init__()
        w = list(reversed(resnet_widths(image_size, dim)))
        w[0] = dim
        self.input = nn.Conv2d(channels, dim, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlockDown(w[i], w[i + 1]) for i in range(len(w) - 1)])
        self.critic = nn.Linear(w[-1] * 4 * 4, 1)
        self.classifier = nn.Linear(w[-1] * 4 * 4, n_classes) if n_classes else None

    def forward(self, x):
        h = self.input(x)
        for block in self.blocks:
            h = block(h)
        h = h.flatten(1)
        logits = self.classifier(h) if self.classifier is not None else None
        return self.critic(h).squeeze(1), logits


def mergan_networks(arch, channels, n_classes, dim, image_size, critic_classes):
    """mergan_nets.mergan_networks, and arch 'resnet': the LSUN nets (Table 2)."""
    if arch != "resnet":
        return M.mergan_networks(arch, channels, n_classes, dim, image_size, critic_classes)
    return (ResNetGenerator(channels, n_classes, dim, image_size=image_size),
            ResNetCritic(channels, critic_classes, dim, image_size=image_size))


# MeRGAN Table 2: four LSUN scene categories, one per task, in this order; the authors use
# 100,000 training images per category and LSUN's validation images (300 each) for testing.
LSUN_CATEGORIES = ("bedroom", "kitchen", "church_outdoor", "tower")
LSUN_PER_CLASS = 100_000


def load_lsun(root, train, size, per_class=LSUN_PER_CLASS):
    """common.load_dataset's `lsun`: Table 2's categories from LSUN's lmdb files in root
    (<category>_train_lmdb / _val_lmdb, as LSUN's download.py writes them): the first
    `per_class` images of each category (every validation image), resized and centre-
    cropped, cached as uint8 tensors in <root>/lsun-cache/. Not torchvision's LSUN class: it
    writes a key cache into the working directory, named by the letters of the root only."""
    split = "train" if train else "val"
    cache = os.path.join(root, "lsun-cache", f"{split}-{size}px-{per_class}.pt")
    if os.path.exists(cache):
        try:
            d = torch.load(cache, map_location="cpu")
            return d["x"], d["y"], list(LSUN_CATEGORIES)
        except Exception:
            pass  # a broken cache is rebuilt below
    paths = [os.path.join(root, f"{c}_{split}_lmdb") for c in LSUN_CATEGORIES]
    missing = [os.path.basename(p) for p in paths if not os.path.isdir(p)]
    if missing:
        raise C.UserError(f"dataset 'lsun' not found in {root} (missing {', '.join(missing)}; "
                          "expected the lmdb folders of LSUN's download.py, e.g. `python "
                          "download.py -c bedroom` then unzip; or export the categories as "
                          "image folders and use --dataset folder)")
    try:
        import lmdb
    except ImportError:
        raise C.UserError("dataset 'lsun' reads LSUN's lmdb databases: pip install lmdb")
    import io
    from PIL import Image
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    xs, ys = [], []
    for label, path in enumerate(paths):
        print(f"lsun: decoding {os.path.basename(path)} ...", flush=True)
        try:
            db = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as err:  # e.g. an empty folder: no data.mdb
            raise C.UserError(f"lsun: {path} is not an lmdb database ({err}); unzip LSUN's "
                              "download there")
        n = len(ys)
        with db.begin(write=False) as txn:
            for i, (_, value) in enumerate(txn.cursor()):
                if train and i >= per_class:
                    break
                try:
                    with Image.open(io.BytesIO(value)) as im:
                        xs.append(tf(im.convert("RGB")))
                except (OSError, ValueError) as err:
                    raise C.UserError(f"lsun: image {i} of {path} cannot be decoded ({err})")
                ys.append(label)
        db.close()
        if len(ys) == n:
            raise C.UserError(f"lsun: {path} holds no images")
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    C.atomic_save({"x": x, "y": y}, cache)
    return x, y, list(LSUN_CATEGORIES)


def load_dataset(name, root="./data", train=True, image_size=None, *args, **kw):
    """common.load_dataset, and `lsun` from LSUN's lmdb files (load_lsun)."""
    if name == "lsun":
        if os.path.isfile(root):
            raise C.UserError(f"--data-root {root} is a file; lsun needs a folder ("
                              f"{C.DATASETS['lsun'][3]})")
        return load_lsun(root, train, image_size or 64)
    return C.load_dataset(name, root, train, image_size, *args, **kw)


# ------------------------------------------------------------------------------------------
# Table 2's measures besides Acc
# ------------------------------------------------------------------------------------------
def reverse_accuracy(generate, classes, n, nz, test, n_classes, device, steps=1500, width=32,
                     seed=0, x=None):
    """Rev acc (MeRGAN Table 2): train a fresh classifier on n generated images per class
    (labels = the conditioning classes), test it on the real test images of those classes.
    x: those images (n per class, in the order of `classes`) if already generated."""
    if x is None:
        x = torch.cat([C.generate_class(generate, c, n, nz, device) for c in classes])
    y = torch.cat([torch.full((n,), c, dtype=torch.long, device=device) for c in classes])
    model = C.train_classifier(x, y, n_classes, device, steps=steps, width=width, seed=seed)
    tx, ty = test.subset(classes)
    return C.accuracy(model, tx, ty)


def generated_set_metrics(args, env, generate, classes, nz):
    """Metrics of a whole generated set, over every class in `classes`, with --eval-samples
    generated images per class (MeRGAN's Table 2 rows besides Acc):
    - rev_acc: a fresh classifier trained on the generated images (labels = the
      conditioning classes), tested on the real test images of those classes (%);
    - fd_evaluator: Frechet distance between evaluator features of generated and real test
      images (offline; the evaluator's feature layer stands in for Inception);
    - fid_inception (args.inception_fid): the same on torchvision's Inception-v3 features."""
    dev, n = env.device, args.eval_samples
    gen = torch.cat([C.generate_class(generate, c, n, nz, dev) for c in classes])
    width, steps = C.classifier_budget(args.dataset, len(gen))
    tx, _ = env.test.subset(classes)
    res = {"rev_acc": reverse_accuracy(generate, classes, n, nz, env.test, env.n_classes, dev,
                                       steps=steps, width=width, x=gen),
           "rev_acc_steps": steps,
           "fd_evaluator": FD.frechet_distance(FD.features(env.evaluator, gen),
                                               FD.features(env.evaluator, tx))}
    if getattr(args, "inception_fid", False):
        inception = FD.inception_features(dev)
        res["fid_inception"] = FD.frechet_distance(inception(gen), inception(tx))
    return res


def table2_report(run, paper=None, final=None):
    """After the last task of `run` (a taskrun.TaskRun): `generated_set_metrics` over every
    class (Table 2's rows: Rev acc, Frechet distances; `final`: those rows measured another
    way, dgr.py's), added to metrics.json and printed beside `paper` = {"acc", "rev_acc",
    "fid"} if given. Returns metrics.json's dict."""
    t0, env = time.time(), run.env
    final = final or generated_set_metrics(run.args, env, run.generate, run.all_classes,
                                           run.nz)
    metrics = run.write_metrics(seconds=time.time() - t0, **final)
    paper = paper or {}
    rows = [["Acc (%)", metrics["avg_acc"][-1], paper.get("acc")],
            ["Rev acc (%)", final["rev_acc"], paper.get("rev_acc")],
            ["FD, evaluator features", final["fd_evaluator"], None]]
    if "fid_inception" in final:
        rows.append(["FID, Inception (torchvision)", final["fid_inception"], None])
    rows.append(["FID (paper, TF Inception)", None, paper.get("fid")])
    print(f"\nafter task {len(env.tasks)}, all {len(run.all_classes)} classes "
          f"({run.args.eval_samples} generated images per class):")
    print(C.fmt_table(["metric", "ours", "paper"], rows))
    return metrics
