"""What every script stands on, in five sections (docs/core.md); no paper's algorithm (a run's
folder, checkpoints, task loop: taskrun.py). Images are float NCHW tensors in [-1, 1]; datasets
are held as uint8 on the device, converted per minibatch; labels: the dataset's own class ids."""
import argparse
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import time
from collections import OrderedDict

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -- 1. Errors, command line, device, seeds ------------------------------------------------
class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, corrupt file): one line, exit 2."""


class WriteError(UserError):
    """A file could not be written (atomic_write); `cli` says how to go on."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a one-line UserError (`cli`); -1e-3 is a value, not a flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")  # argparse's misses -1e-3

    def error(self, message):
        raise UserError(message)


def _number(kind, ok, rule):
    """An argparse `type=`: a finite number of `kind` for which ok(value) holds."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def at_least(low):
    """`type=` of a count: an integer >= low."""
    return _number(int, lambda v: v >= low, f"at least {low}")


seed = _number(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)")  # torch's range
positive = _number(float, lambda v: v > 0, "a positive number")        # rates, slopes
non_negative = _number(float, lambda v: v >= 0, "a number >= 0")      # loss weights
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")  # shares


def pick_device(name="auto"):
    """`auto` = CUDA when present, else the CPU."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r} (choose auto, cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device "
                        "(use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def add_common_args(parser, iters, batch_size=64, eval_samples=6400):
    """The flags every sequential script shares (README); defaults are the caller's."""
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-root", default="./data",
                   help="where datasets are read or downloaded (`folder`: the image folder)")
    g.add_argument("--no-download", action="store_true",
                   help="never try the network; fail with a clear message if data is missing")
    g.add_argument("--image-size", type=at_least(4), default=None,
                   help="side of the square images (default: 32; folder and lsun: 64)")
    g.add_argument("--mnist-train", type=int, choices=(60000, 55000), default=60000, help="MNIST"
                   " training images: torchvision's 60000, or the MeRGAN authors' TF 55000")
    g.add_argument("--out", default=None, help="run folder (default: runs/<script>-<dataset>"
                   "-s<seed>-<time>-<random>)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--seed", type=seed, default=0, help="seed for python, numpy and torch")
    g.add_argument("--iters", type=at_least(1), default=iters, help="generator iterations per task")
    g.add_argument("--batch-size", type=at_least(1), default=batch_size, help="minibatch size")
    g.add_argument("--classes", default=None,
                   help="classes in task order, e.g. 0,1,2 (default: all, 0..n-1)")
    g.add_argument("--classes-per-task", type=at_least(1), default=1, help="classes per task")
    g.add_argument("--evaluator", default="ours", choices=["ours", "authors"], help="the "
                   "classifier behind Acc: ours or the MeRGAN authors' (docs/core.md)")
    g.add_argument("--eval-samples", type=at_least(1), default=eval_samples,
                   help="generated samples per class for Acc (paper: 6400 = 100 x 64)")
    g.add_argument("--log-every", type=at_least(1), default=100,
                   help="a progress line every this many iterations")
    g.add_argument("--max-tasks", type=at_least(1), default=None, help="stop after this "
                   "many tasks in this call (resumable with --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out after its "
                   "last finished task, with the flags it was started with (args.json)")
    return g


def task_split(classes_arg, n_classes, per_task):
    """Tasks (lists of class ids) of --classes, --classes-per-task (the papers': [0], [1], ...)."""
    try:
        classes = (list(range(n_classes)) if classes_arg is None else
                   [int(c) for c in str(classes_arg).split(",") if c.strip() != ""])
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, got {classes_arg!r}")
    if not classes or any(not 0 <= c < n_classes for c in classes):
        raise UserError(f"--classes {classes_arg!r}: classes must be in 0..{n_classes - 1}")
    if len(set(classes)) != len(classes):
        raise UserError(f"--classes {classes_arg!r} names a class twice")
    if len(classes) % per_task:
        raise UserError(f"--classes-per-task {per_task} does not divide the "
                        f"{len(classes)} classes into whole tasks")
    return [classes[i:i + per_task] for i in range(0, len(classes), per_task)]


# -- 2. Datasets ---------------------------------------------------------------------------
# name -> (channels, classes, where torchvision looks under --data-root, files expected there)
DIGIT_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
               "t10k-labels-idx1-ubyte")
DATASETS = {
    "mnist": (1, 10, "MNIST/raw", DIGIT_FILES),
    "fashion": (1, 10, "FashionMNIST/raw", DIGIT_FILES),
    "svhn": (3, 10, "", "train_32x32.mat, test_32x32.mat"),
    "cifar10": (3, 10, "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "folder": (3, None, "", "one sub-folder of images per class, or train/ and test/ of them"),
    "lsun": (3, 4, "", "the <category>_train_lmdb and _val_lmdb folders of LSUN's download.py"),
    "synth": (1, 10, None, None),        # generated offline by local_data.make_synth
    "synth-color": (3, 10, None, None),  # make_synth(color=True)
    "synth-amber": (3, 10, None, None),  # make_synth(color="amber"): one fixed palette
}


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def to_float(x):
    """uint8 images in [0, 255] -> float images in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def load_dataset(name, root="./data", train=True, image_size=None, download=True,
                 digits="pad", mnist_train=60000):
    """(images uint8 N x C x S x S, labels int64 N, class names), on the CPU, read by torchvision
    (never downloaded again). 28x28 digits become 32x32 by `digits`: "pad" (a zero border, the
    MeRGAN authors') or "resize" (bilinear, the DGM authors'). mnist_train=55000: the MeRGAN
    authors' TF split (images 5,000..59,999; the rest is TF's validation set)."""
    _, _, subdir, expected = dataset_info(name)
    if root and os.path.isfile(root):
        raise UserError(f"--data-root {root} is a file; {name} needs a folder ("
                        + (expected or "its evaluator is cached there") + ")")
    if name.startswith("synth") or name == "folder":  # local_data.py makes or reads them
        import local_data as LD
        try:
            if name == "folder":
                return LD.load_folder(root, train, image_size or 64)
            color = {"synth": False, "synth-color": True, "synth-amber": "amber"}[name]
            x, y = LD.make_synth(1000 if train else 200, seed=1 if train else 2, color=color)
            return resize(x, image_size), y, [str(c) for c in range(10)]  # fixed data seeds
        except LD.DataError as err:
            raise UserError(str(err))
    if name == "lsun":  # MeRGAN's Table 2 scenes: mergan_lsun.load_dataset reads LSUN's lmdb
        raise UserError("--dataset lsun (MeRGAN's Table 2) is read by mergan_jtr.py and "
                        "mergan_ra.py only")

    import torchvision.datasets as tvd
    cls = {"mnist": tvd.MNIST, "fashion": tvd.FashionMNIST,
           "svhn": tvd.SVHN, "cifar10": tvd.CIFAR10}[name]
    kw = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    where = os.path.join(root, subdir) if subdir else root
    try:
        ds = cls(root, download=False, **kw)
    except Exception as first:
        why = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
        if not (isinstance(first, FileNotFoundError) or (
                isinstance(first, RuntimeError) and "not found" in str(first).lower())):
            raise UserError(f"dataset {name!r} in {where}: its files are there but cannot be "
                            f"read ({type(first).__name__}: {why[:100]}); they may be corrupt "
                            "or truncated: delete them to download again")
        why = "--no-download was given"
        if download:
            try:
                ds, why = cls(root, download=True, **kw), None
            except Exception as err:  # URLError, HTTPError, checksum, ...: all offline cases
                why = f"download failed: {type(err).__name__}: {err}".splitlines()[0]
        if why is not None:
            raise UserError(f"dataset {name!r} not found in {where} (expected {expected}) "
                            f"and not downloaded ({why})")
    if name in ("mnist", "fashion"):
        x = (resize(ds.data.unsqueeze(1), 32) if digits == "resize"       # 28 -> 32 bilinear
             else F.pad(ds.data, (2, 2, 2, 2)).unsqueeze(1))              # zero (= -1) border
        y = ds.targets.long()
    elif name == "svhn":
        x, y = torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()  # label 10 -> 0
    else:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(ds.targets).long()
    if len(x) != len(y):  # torchvision does not compare the two files
        raise UserError(f"dataset {name!r} in {where}: {len(x)} images but {len(y)} labels "
                        "in the " + ("training" if train else "test") + " files; they may be "
                        "truncated or from different downloads")
    if name == "mnist" and train and mnist_train == 55000:
        if len(x) != 60000:
            raise UserError(f"--mnist-train 55000 is TF's split of MNIST's 60,000 training "
                            f"images; {where} holds {len(x)}")
        x, y = x[5000:], y[5000:]
    names = list(getattr(ds, "classes", [])) or [str(c) for c in range(10)]
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(names):
        raise UserError(f"dataset {name!r} in {where}: labels {int(y.min())}..{int(y.max())} in "
                        f"the {'training' if train else 'test'} files, outside 0..{len(names) - 1}"
                        "; they may be corrupt: delete them to download again")
    return resize(x, image_size), y, names


def resize(x, size):
    """uint8 images resized to size x size (or unchanged): bilinear with antialias, torch's
    form of PIL's bilinear filter (torchvision's Resize on PIL images), rounded to uint8."""
    if size is None or x.shape[-1] == size:
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)


class TaskData:
    """uint8 data on the device; `batch(n, classes)` draws n images of them (with replacement)."""

    def __init__(self, x, y, device):
        self.x, self.y, self.device = x.to(device), y.to(device), device
        self._index = {}  # tuple(classes) -> indices on device

    def indices(self, classes):
        key = tuple(sorted(classes))
        if key not in self._index:
            idx = torch.isin(self.y, torch.tensor(key, device=self.y.device)).nonzero().flatten()
            if len(idx) == 0:
                raise UserError(f"the dataset has no images of classes {list(key)}")
            self._index[key] = idx
        return self._index[key]

    def batch(self, n, classes):
        idx = self.indices(classes)
        pick = idx[torch.randint(len(idx), (n,), device=self.device)]
        return to_float(self.x[pick]), self.y[pick]

    def subset(self, classes):
        """All images (float, [-1, 1]) and labels of the given classes."""
        idx = self.indices(classes)
        return to_float(self.x[idx]), self.y[idx]


# -- 3. WGAN-GP, generation, one training iteration on a GPU -------------------------------
def gradient_penalty(critic_fn, real, fake):
    """WGAN-GP (Gulrajani et al. 2017; MeRGAN Eq. 5, last term, without lambda):
    E[(||grad_x D(x_hat)||_2 - 1)^2], x_hat = eps*real + (1-eps)*fake, eps ~ U(0,1) per
    sample, through autograd's double backward of `critic_fn(x)` (one score per sample)."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device)
    x_hat = torch.lerp(fake.detach(), real.detach(), eps)  # eps*real + (1-eps)*fake, 1 op
    x_hat.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic_fn(x_hat).sum(), x_hat, create_graph=True)
    norm = grad.square().sum(tuple(range(1, grad.dim()))).add(1e-12).sqrt()  # per sample
    return (norm - 1).square().mean()


@torch.no_grad()
def generate_class(generate, c, n, nz, device, batch=64):
    """n images of class c from `generate(z, y)` in single-class batches, as the authors'."""
    return torch.cat([generate(torch.randn(m, nz, device=device),
                               torch.full((m,), c, dtype=torch.long, device=device))
                      for m in [min(batch, n - i) for i in range(0, n, batch)]])


def add_cuda_graph_arg(parser):
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                        help="on CUDA, record one training iteration in a CUDA graph and replay "
                        "it (GraphedStep). Off by default, and always on the CPU: the eager "
                        "loop, until benchmarks/gpu_check.sh has passed on a GPU")


def use_cuda_graphs(args, device):
    return device.type == "cuda" and getattr(args, "cuda_graphs", False)


def adam(module, lr, betas):
    """torch.optim.Adam as it comes, `capturable` on CUDA (its step count on the device): a
    CUDA graph may record it, and the eager loop does the same arithmetic."""
    params = list(module.parameters())
    return torch.optim.Adam(params, lr=lr, betas=betas, capturable=params[0].is_cuda)


class GraphedStep:
    """One training iteration `step()` (returning loss tensors) run eagerly (enabled False) or, on
    CUDA, recorded once into a CUDA graph and replayed: the same arithmetic and random numbers, one
    launch instead of hundreds. The first `warmup` calls run eagerly on a side stream; a replay
    overwrites the losses returned before. A new one per task (the step's Python side changes)."""

    def __init__(self, step, enabled, warmup=3):
        self.step, self.enabled, self.warmup = step, enabled, warmup
        self.calls, self.graph, self.out = 0, None, None

    def __call__(self):
        if not self.enabled:
            return self.step()
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = self.step()
            except Exception as err:  # e.g. an op that waits for the host: stop cleanly
                cause = err.__context__ or err
                raise UserError(f"CUDA graph recording of the training iteration failed "
                                f"({type(cause).__name__}: "
                                f"{(str(cause).strip().splitlines() or [''])[0]}); rerun without "
                                "--cuda-graphs (with --resume to continue after the last "
                                "finished task)") from err
            self.graph, self.out = graph, out
            print("CUDA graph recorded: the training iteration is replayed from here on",
                  flush=True)
        self.graph.replay()
        return self.out


# -- 4. Metrics ----------------------------------------------------------------------------
def make_classifier(arch, channels, n_classes, width=32):
    """A classifier: body (the penultimate features), then head (the logits). ours: 3 conv blocks
    and a 8*width-d feature layer, every script's evaluator; authors: MeRGAN's own, an MLP for grey
    images, a 7-conv net for colour ones (pooling, the identity at 32 px, lets other sizes in)."""
    relu, w = nn.ReLU, width
    if arch == "ours":
        body = [nn.Conv2d(channels, w, 3, padding=1), relu(), nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1), relu(), nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 4 * w, 3, padding=1), relu(), nn.AdaptiveAvgPool2d(4),
                nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * w * 16, 8 * w), relu()]
        feat = 8 * w
    elif channels == 1:  # MeRGAN's MNIST MLP (pretrain/mnist_test.py) on the flat image
        widths, body, feat = [32 * 32, 1024, 512, 256, 128], [nn.AdaptiveAvgPool2d(32)], 128
        body += [nn.Flatten()] + [m for a, b in zip(widths, widths[1:])
                                  for m in (nn.Linear(a, b), relu())]
    else:  # MeRGAN's SVHN net (pretrain/svhn_test.py): 3x3 convs, 32-32|64-64|128-128-128
        body, c_in, feat = [], channels, 128
        for block in ([32, 32], [64, 64], [128, 128, 128]):
            for c_out in block:
                body += [nn.Conv2d(c_in, c_out, 3, padding=1), relu()]
                c_in = c_out
            body.append(nn.MaxPool2d(2))
        body += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128 * 16, 512), relu(),
                 nn.Linear(512, 128), relu()]
    return nn.Sequential(OrderedDict(body=nn.Sequential(*body), head=nn.Linear(feat, n_classes)))


def train_classifier(x, y, n_classes, device, steps=1500, width=32, batch=128, lr=1e-3,
                     seed=0, log=None, arch="ours"):
    """make_classifier trained on float images x in [-1, 1], labels y, +-2 pixel shifts as
    augmentation; seeded by `seed`, leaving the caller's generators (CPU, CUDA) as found."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cuda = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # init + dropout
        model = make_classifier(arch, x.shape[1], n_classes, width).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        model.train()
        for step in range(steps):
            idx = torch.randint(len(x), (batch,), generator=gen).to(device)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log and (step + 1) % 500 == 0:
                log(f"  classifier step {step + 1}/{steps}  loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def classify(model, x, batch=1000):
    """Predicted labels for float images x (any device the model is on)."""
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def accuracy(model, x, y):
    return 100.0 * (classify(model, x) == y).float().mean().item()


EVALUATOR_VERSION = 1  # bump when make_classifier or train_classifier changes: old caches retrain


def classifier_budget(dataset, n):
    """(width, steps) for n images: offline sets are easy (width 16, 600 steps: ~99% in
    seconds); real data ~8 epochs, 1,500 to 6,000 steps (300 under 2,000 images)."""
    if dataset.startswith("synth"):
        return 16, 600
    return 32, int(min(6000, max(1500 if n >= 2000 else 300, 8 * n / 128)))


def get_evaluator(args, train, test, n_classes, device, log=print, prep=""):
    """(evaluator, its real test accuracy %): trained once on the real training set, cached as
    <data-root>/evaluators/<dataset>-<size>px<prep>-n<images>[-authors]-v<version>.pt (`folder`:
    <folder>-evaluators/; a read-only root: the user's cache); one of another key is retrained."""
    name, folder = args.dataset, os.path.join(args.data_root, "evaluators")
    if args.dataset == "folder":
        root = os.path.abspath(args.data_root)
        name, folder = "folder-" + os.path.basename(root), root + "-evaluators"
    arch = getattr(args, "evaluator", "ours")
    width, steps = classifier_budget(args.dataset, len(train.y))
    path = os.path.join(folder, f"{name}-{train.x.shape[-1]}px{prep}-n{len(train.y)}"
                        + ("-authors" if arch == "authors" else "") + f"-v{EVALUATOR_VERSION}.pt")
    if not os.path.exists(path):  # decided before training: a data root that cannot take
        with contextlib.suppress(OSError):  # a new cache (read-only) -> the user's cache
            os.makedirs(folder, exist_ok=True)
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            cache = os.path.join(os.path.dirname(torch.hub.get_dir()), "cl-gans-evaluators")
            log(f"evaluator: {folder} is not writable; cached in {cache} (under $TORCH_HOME)")
            folder, path = cache, os.path.join(cache, os.path.basename(path))
            with contextlib.suppress(OSError):  # else atomic_save's one line, later
                os.makedirs(folder, exist_ok=True)
    key = {"dataset": name, "n_train": len(train.y), "n_test": len(test.y), "prep": prep,
           "n_classes": n_classes, "version": EVALUATOR_VERSION, "width": width,
           "steps": steps, "arch": arch}
    # same RNG draws whatever the cache or --evaluator: the judge never changes what it judges
    model = make_classifier("ours", train.x.shape[1], n_classes, width).to(device)
    if arch != "ours":
        with torch.random.fork_rng(devices=[]):
            model = make_classifier(arch, train.x.shape[1], n_classes, width).to(device)
    if os.path.exists(path):
        try:
            ck = torch.load(path, map_location=device, weights_only=True)
            if ck["key"] == key:
                model.load_state_dict(ck["model"])
                log(f"evaluator: loaded {path} (real test accuracy {ck['test_acc']:.2f}%)")
                return model.eval(), ck["test_acc"]
            log(f"evaluator: {path} was trained on other data; retraining")
        except Exception as err:  # corrupt cache: retrain rather than fail
            log(f"evaluator: cache {path} unreadable ({type(err).__name__}); retraining")
    kind = "MeRGAN's architecture" if arch == "authors" else "ours"
    log(f"evaluator ({kind}): training on {len(train.y)} real {args.dataset} images ...")
    t0 = time.time()
    model = train_classifier(to_float(train.x), train.y, n_classes, device, steps=steps,
                             width=width, log=log, arch=arch)
    acc = accuracy(model, to_float(test.x), test.y)
    log(f"evaluator: real test accuracy {acc:.2f}% ({steps} steps, {time.time() - t0:.0f}s)")
    atomic_save({"key": key, "model": model.state_dict(), "test_acc": acc}, path)
    return model, acc


ACC_CHUNK = 64000  # generated images held at once (a multiple of 64 and of classify's 1000)


@torch.no_grad()
def generated_accuracy(generate, evaluator, classes, n, nz, device, batch=64):
    """MeRGAN's Acc, {class: the evaluator's accuracy (%) on n generated images of that class}."""
    out = {}
    for c in classes:
        hits = []
        for i in range(0, n, ACC_CHUNK):  # memory bounded whatever n
            x = generate_class(generate, c, min(ACC_CHUNK, n - i), nz, device, batch)
            # an image with NaN/Inf pixels is never a digit (argmax of NaN logits: 0)
            pred = classify(evaluator, x).masked_fill(~torch.isfinite(x).flatten(1).all(1), -1)
            hits.append(pred == c)
        out[c] = 100.0 * torch.cat(hits).float().mean().item()
    return out


def acc_summary(R):
    """Of R[t][i] (%, None before task i): avg_acc[t] = mean_{i<=t} R[t][i]; forgetting_i =
    max_{t'<T} R[t'][i] - R[T][i] (i < T, the last task); BWT = mean_{i<T} R[T][i] - R[i][i]."""
    T = len(R) - 1
    avg = [float(np.mean(row[:t + 1])) for t, row in enumerate(R)]
    forgetting = [max(R[t][i] for t in range(i, T)) - R[T][i] for i in range(T)]
    bwt = float(np.mean([R[T][i] - R[i][i] for i in range(T)])) if T > 0 else 0.0
    return {"avg_acc": avg, "forgetting": forgetting,
            "avg_forgetting": float(np.mean(forgetting)) if forgetting else 0.0, "bwt": bwt}


# -- 5. Files: written whole or not at all; sample grids and GIFs -------------------------
def atomic_write(path, write):
    """write(tmp) to a temporary file, then rename it onto path: a kill never leaves half a
    file. Every file a run writes goes through here (checkpoints, JSON, PNG, GIF)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save on a full disk: "unexpected pos"
        if isinstance(err, RuntimeError) and not re.search("write|unexpected pos", str(err)):
            raise
        mib = math.inf
        with contextlib.suppress(OSError):
            os.remove(tmp)
            mib = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
        code = getattr(err, "errno", None)  # torch.save's RuntimeError: guess from the room
        full = code in (errno.ENOSPC, errno.EDQUOT) or code is None and mib < 1024
        limit = code == errno.EFBIG or code is None and not full  # ulimit -f
        why = str(err).splitlines()[0][:80]
        raise WriteError(f"cannot write {path} ({type(err).__name__}: {why})"
                         + (f"; {mib:.0f} MiB free there" if mib < math.inf else "")
                         + (" (a full disk?)" if full else " (a file-size limit?)" if limit
                            else "") + ": the last good files are kept")


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename (atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_image(path, img):
    """A uint8 H x W x C array as an image file (format from the name's ending), atomically."""
    atomic_write(path, lambda tmp: imageio.imwrite(tmp, img, format=path.rsplit(".", 1)[-1]))


def image_grid(x, nrow):
    """Float images in [-1, 1] (N x C x H x W) -> uint8 H x W x 3 array, nrow per row."""
    import torchvision.utils as vutils
    g = vutils.make_grid((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow,
                         padding=2, pad_value=1.0)
    return (g.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def class_grid(generate, all_classes, seen, z, path):
    """A grid, one row per class of the run from the fixed noise z (one single-class batch
    each); rows of classes not yet seen stay blank, so every task's grid animates in a GIF."""
    rows = {c: generate(z, torch.full((len(z),), c, dtype=torch.long, device=z.device)).cpu()
            for c in all_classes if c in seen}
    shape = next(iter(rows.values())).shape
    x = torch.cat([rows.get(c, torch.ones(shape)) for c in all_classes])
    img = image_grid(x, nrow=len(z))
    write_image(path, img)
    return img


def save_gif(frames, path, seconds_per_frame=0.8):
    """An animated GIF (looping) of equally sized uint8 frames, e.g. grids across tasks."""
    atomic_write(path, lambda tmp: imageio.mimsave(tmp, frames, format="gif", loop=0,
                                                   duration=1000 * seconds_per_frame))


def fmt_table(header, rows):
    """A plain text table: header is a list of str, rows lists of str/float/None."""
    cells = [[("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
              for v in row] for row in [header] + rows]
    width = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, width)) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])
