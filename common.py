"""What every script stands on, in five sections (docs/core.md): errors and the command
line, datasets, WGAN-GP and CUDA graphs, metrics, run outputs. No paper's algorithm lives
here. Images are float tensors in [-1, 1], NCHW; datasets are held as uint8 tensors on the
compute device and converted per minibatch; labels keep the dataset's own class ids.
"""
import argparse
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import OrderedDict
from datetime import datetime

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -- 1. Errors, command line, device, seeds ------------------------------------------------
class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, corrupt file): one line, exit 2."""


class Diverged(UserError):
    """NaN/Inf in training: stops before the task is evaluated or saved (nothing is lost)."""


RUN_FOLDER = None  # set by prepare_run: where an interrupted run left its checkpoint
RUN_SCRIPT = None  # set by prepare_run: recorded in every checkpoint
RUN_INPUTS = {}  # fingerprints of the data and evaluator the run is made of (run_inputs)


def cli(main, argv=None):
    """Run `main(argv)`; a UserError ends in one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        print(f"error: out of memory ({str(err).splitlines()[0][:120]}): try a smaller "
              "--batch-size or --eval-samples (or another --device)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        saved = RUN_FOLDER and os.path.exists(os.path.join(RUN_FOLDER, CHECKPOINT))
        print("\n" + (f"interrupted: the last finished task or stage is checkpointed in "
                      f"{RUN_FOLDER}; rerun with --resume --out {RUN_FOLDER}" if saved else
                      "interrupted before the first checkpoint: nothing to resume"
                      + (f"; {RUN_FOLDER} holds only this call's first files: delete it or "
                         "pass another --out" if RUN_FOLDER else "")),
              file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are a UserError: one line (`cli`), not the usage block."""

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


# Flags that may be given again on --resume: where and how this call runs, not what the
# experiment is. Every other flag is read from the run's args.json.
RUN_FLAGS = ("out", "device", "data_root", "no_download", "log_every", "max_tasks")
PER_CALL = ("resume", "max_tasks")  # belong to one call: never taken from args.json


def given_flags(parser, argv=None):
    """{dest: value} of the flags given on the command line (defaults left out)."""
    unset = object()  # argparse keeps what a namespace already has: only given flags change
    ns = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return {k: v for k, v in vars(ns).items() if v is not unset}


def parse_run_args(parser, argv=None, run_flags=()):
    """parser.parse_args(argv); with --resume, the experiment's flags come from the run's
    args.json: a flag given again keeps its value unless it is in RUN_FLAGS or `run_flags`."""
    args = parser.parse_args(argv)
    if not getattr(args, "resume", False):
        return args
    if args.out is None:
        raise UserError("--resume needs --out, the run folder to continue")
    path = os.path.join(args.out, "args.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--resume: {args.out} holds no run (no args.json): nothing to resume")
    except (OSError, ValueError) as err:
        raise UserError(f"--resume: {path} cannot be read ({type(err).__name__})")
    given = given_flags(parser, argv)
    may_change = set(RUN_FLAGS) | set(PER_CALL) | set(run_flags)
    changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {given[k]!r}" for k in sorted(old)
               if k in given and k not in may_change and given[k] != old[k]]
    if changed:
        raise UserError(f"--resume: the run in {args.out} was made with other settings "
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
            raise UserError(f"--{k.replace('_', '-')} acts only {when}; this run would ignore "
                            "it: drop it")


def pick_device(name="auto"):
    """`auto` = CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device "
                        "(use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r} (choose auto, cpu or cuda)")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


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
    g.add_argument("--mnist-train", type=int, choices=(60000, 55000), default=60000,
                   help="MNIST training images: 60000 (torchvision's) or 55000 (the MeRGAN "
                        "authors' TF loader, which holds the first 5,000 out for validation)")
    g.add_argument("--out", default=None, help="run folder (default: runs/<script>-<dataset>"
                   "-s<seed>-<time>)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--seed", type=seed, default=0, help="seed for python, numpy and torch")
    g.add_argument("--iters", type=at_least(1), default=iters,
                   help="generator iterations per task")
    g.add_argument("--batch-size", type=at_least(1), default=batch_size, help="minibatch size")
    g.add_argument("--classes", default=None,
                   help="classes in task order, e.g. 0,1,2 (default: all, 0..n-1)")
    g.add_argument("--classes-per-task", type=at_least(1), default=1, help="classes per task")
    g.add_argument("--evaluator", default="ours", choices=["ours", "authors"],
                   help="the classifier behind Acc: ours (3 conv blocks) or the MeRGAN "
                        "authors' (an MLP for grey images, a 7-conv net for RGB; docs/core.md)")
    g.add_argument("--eval-samples", type=at_least(1), default=eval_samples,
                   help="generated samples per class for Acc (paper: 6400 = 100 x 64)")
    g.add_argument("--log-every", type=at_least(1), default=100,
                   help="a progress line every this many iterations")
    g.add_argument("--max-tasks", type=at_least(1), default=None,
                   help="stop after this many tasks in this call (resumable with --resume), "
                        "e.g. to fit a time-limited job")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last finished task, "
                        "with the flags it was started with (args.json)")
    return g


def task_split(classes_arg, n_classes, per_task):
    """--classes / --classes-per-task as a list of tasks, each a list of class ids. The
    papers' protocol is the default: one class per task, in the order 0, 1, ..., 9."""
    if classes_arg is None:
        classes = list(range(n_classes))
    else:
        try:
            classes = [int(c) for c in str(classes_arg).split(",") if c.strip() != ""]
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
    "synth": (1, 10, None, None),        # generated offline by make_synth
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
    """(images uint8 N x C x S x S, labels int64 N, class names), on the CPU, read by
    torchvision (never downloaded again). 28x28 digits become 32x32 by `digits`: "pad" (a
    zero border, the MeRGAN authors') or "resize" (bilinear, the DGM authors').
    mnist_train=55000: MNIST's training set as TF's input_data serves it to the MeRGAN
    authors (images 5,000..59,999; the first 5,000 are its validation set)."""
    _, _, subdir, expected = dataset_info(name)
    if root and os.path.isfile(root):
        raise UserError(f"--data-root {root} is a file; {name} needs a folder ("
                        + (expected or "its evaluator is cached there") + ")")
    if name.startswith("synth"):  # fixed data seeds, independent of --seed
        color = {"synth": False, "synth-color": True, "synth-amber": "amber"}[name]
        x, y = make_synth(1000 if train else 200, seed=1 if train else 2, color=color)
        return resize(x, image_size), y, [str(c) for c in range(10)]
    if name == "folder":
        return load_folder(root, train, image_size or 64)
    if name == "lsun":  # MeRGAN's Table 2 scenes, read from LSUN's lmdb files
        from mergan_nets import load_lsun
        return load_lsun(root, train, image_size or 64)

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
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def open_rgb(path):
    """An image file as PIL RGB; an unreadable one is a UserError that names it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad image data
        raise UserError(f"cannot read image {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unreadable'}")


def load_folder(root, train, size):
    """torchvision's ImageFolder (a sub-folder per class) as uint8 tensors; train/ and test/
    are the splits (classes matched by name), else every 10th image of a class is held out."""
    from torchvision.datasets import ImageFolder
    import torchvision.transforms as T
    splits = [os.path.isdir(os.path.join(root, s)) for s in ("train", "test")]
    has_splits = all(splits)
    if any(splits) and not has_splits:
        raise UserError(f"folder {root} has {'train/' if splits[0] else 'test/'} but no "
                        f"{'test/' if splits[0] else 'train/'}: give both (the same class "
                        "sub-folders in each) or neither (every 10th image is held out)")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        ds = ImageFolder(os.path.join(root, "train" if train else "test") if has_splits
                         else root, transform=tf, loader=open_rgb)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"dataset 'folder' not found in {root} (expected "
                        f"{DATASETS['folder'][3]}): {str(err).splitlines()[0]}")
    if has_splits:
        other = os.path.join(root, "test" if train else "train")
        diff = sorted(set(ds.classes) ^ {d.name for d in os.scandir(other) if d.is_dir()})
        if diff:
            raise UserError(f"folder {root}: train/ and test/ must hold the same class "
                            f"folders; only in one of them: {', '.join(diff[:5])}"
                            + (" ..." if len(diff) > 5 else ""))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets).long()
    if not has_splits:
        keep = torch.ones(len(y), dtype=torch.bool)
        for c in y.unique():
            idx = (y == c).nonzero().flatten()
            if len(idx) >= 10:  # every 10th image of the class is a test image
                keep[idx] = (torch.arange(len(idx)) % 10 != 0) == train
        small = [ds.classes[c] for c in y.unique() if (y == c).sum() < 10]
        if small and not train:
            print(f"note: folder {root}: classes {', '.join(small[:5])} have fewer than 10 "
                  "images, so their test images are their training images: the evaluator's "
                  "'real test accuracy' on them is not measured on held-out images", flush=True)
        x, y = x[keep], y[keep]
    return x, y, list(ds.classes)


def make_synth(n_per_class, seed, color=False):
    """Offline digits, deterministic for a seed: each class is its glyph in Pillow's font at
    three stroke widths under a random affine map (rotation +-15 deg, scale 0.75-1.1, shear,
    shift), intensity jitter and noise. color=True: glyph and background in two random
    colours of different brightness (SVHN-like); color="amber": amber on navy, one style
    (ewc_fewshot.py's target). uint8 N x C x 32 x 32, labels interleaved 0..9, 0..9, ..."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=44)
    glyphs = []  # 10 x 3 stroke widths, 64 x 64, values in [0, 1]
    for digit in range(10):
        for stroke in (0, 2, 4):
            im = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(im).text((32, 32), str(digit), fill=255, font=font, anchor="mm",
                                    stroke_width=stroke, stroke_fill=255)
            glyphs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    glyphs = torch.stack(glyphs).view(10, 3, 1, 64, 64)

    g = torch.Generator().manual_seed(seed)
    n = 10 * n_per_class
    y = torch.arange(n) % 10
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    src = glyphs[y, torch.randint(0, 3, (n,), generator=g)]           # N x 1 x 64 x 64
    angle, scale, shear = u(-15, 15) * math.pi / 180, u(0.75, 1.1), u(-0.25, 0.25)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, u(-0.12, 0.12)], 1),
                         torch.stack([sin, cos, u(-0.12, 0.12)], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)
    mask = F.grid_sample(src, grid, align_corners=False, padding_mode="zeros")
    mask = mask * u(0.7, 1.0).view(n, 1, 1, 1)
    if not color:
        img = mask + 0.05 * torch.randn(mask.shape, generator=g)
    elif color == "amber":
        jitter = lambda: 0.06 * torch.randn(n, 3, 1, 1, generator=g)  # noqa: E731
        bg = (torch.tensor([0.08, 0.10, 0.35]).view(1, 3, 1, 1) + jitter()).clamp(0, 1)
        fg = (torch.tensor([1.00, 0.70, 0.15]).view(1, 3, 1, 1) + jitter()).clamp(0, 1)
        img = bg * (1 - mask) + fg * mask + 0.06 * torch.randn(n, 3, 32, 32, generator=g)
    else:
        bg = torch.rand(n, 3, 1, 1, generator=g)
        fg = torch.rand(n, 3, 1, 1, generator=g)
        lum = lambda c: (0.299 * c[:, 0] + 0.587 * c[:, 1]  # noqa: E731
                         + 0.114 * c[:, 2]).view(n, 1, 1, 1)
        too_close = (lum(fg) - lum(bg)).abs() < 0.4
        fg = torch.where(too_close, 1.0 - bg, fg)  # keep the digit readable
        img = bg * (1 - mask) + fg * mask + 0.06 * torch.randn(n, 3, 32, 32, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


class TaskData:
    """A dataset held on the device as uint8; `batch(n, classes)` draws n images of the given
    classes there, with replacement, in [-1, 1]."""

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
def gradient_penalty(critic_fn, real, fake, input_gradient=None):
    """WGAN-GP (Gulrajani et al. 2017; MeRGAN Eq. 5, last term, without lambda):
    E[(||grad_x D(x_hat)||_2 - 1)^2], x_hat = eps*real + (1-eps)*fake, eps ~ U(0,1) per sample.
    Plain: autograd's double backward through `critic_fn(x)` (one score per sample). SPEED
    BRANCH: `input_gradient(x)` gives the same gradient written out (mergan_nets.Critic)."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device)
    x_hat = torch.lerp(fake.detach(), real.detach(), eps)  # eps*real + (1-eps)*fake, 1 op
    if input_gradient is None:  # plain: autograd
        x_hat.requires_grad_(True)
        (grad,) = torch.autograd.grad(critic_fn(x_hat).sum(), x_hat, create_graph=True)
    else:                       # SPEED BRANCH: the same gradient, written out
        grad = input_gradient(x_hat)
    norm = grad.square().sum(tuple(range(1, grad.dim()))).add(1e-12).sqrt()  # per sample
    return (norm - 1).square().mean()


@torch.no_grad()
def generate_class(generate, c, n, nz, device, batch=64):
    """n images of class c from `generate(z, y)` in single-class batches, as the authors'."""
    return torch.cat([generate(torch.randn(m, nz, device=device),
                               torch.full((m,), c, dtype=torch.long, device=device))
                      for m in [min(batch, n - i) for i in range(0, n, batch)]])


# Speed on a GPU: one training iteration recorded in a CUDA graph and replayed
def add_cuda_graph_arg(parser):
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                        help="on CUDA, record one training iteration in a CUDA graph and "
                             "replay it (GraphedStep). Off by default, and always on the CPU: "
                             "the eager loop, until benchmarks/gpu_check.sh has passed on a "
                             "GPU")


def use_cuda_graphs(args, device):
    return device.type == "cuda" and getattr(args, "cuda_graphs", False)


def adam(module, lr, betas, plain=False, graphed=False):
    """torch.optim.Adam. SPEED BRANCH (default): `fused`, one kernel updates every parameter
    (plus one for the step counters, kept on the device) where the plain for-loop form
    (plain=True, --plain-step) runs about 9 per parameter: the same update to float
    rounding (tests compare). graphed: `capturable`, so that a CUDA graph may record it."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=not plain,
                            foreach=False if plain else None, capturable=graphed)


class GraphedStep:
    """One training iteration `step()` (no arguments, losses returned as tensors) run as
    written (enabled=False: the eager loop) or, on CUDA, recorded once into a CUDA graph and
    replayed: the same arithmetic and random numbers, one launch instead of hundreds. The
    first `warmup` calls run eagerly on a side stream; the returned losses are overwritten by
    the next replay. Build a new one whenever the step's Python side changes (a new task)."""

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
                why = (str(cause).strip().splitlines() or [""])[0]
                raise UserError(f"CUDA graph recording of the training iteration failed "
                                f"({type(cause).__name__}: {why}); rerun without "
                                "--cuda-graphs (with --resume to continue after the last "
                                "finished task)") from err
            self.graph, self.out = graph, out
            print("CUDA graph recorded: the training iteration is replayed from here on",
                  flush=True)
        self.graph.replay()
        return self.out


# -- 4. Metrics ----------------------------------------------------------------------------
def make_classifier(arch, channels, n_classes, width=32):
    """A classifier as body (its features, the penultimate layer) then head (the logits).
    ours: 3 conv blocks and a 8*width-d feature layer, the evaluator of every script;
    authors (--evaluator authors): MeRGAN's own (mergan_nets.authors_classifier_body)."""
    relu, w = nn.ReLU, width
    if arch == "ours":
        body = [nn.Conv2d(channels, w, 3, padding=1), relu(), nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1), relu(), nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 4 * w, 3, padding=1), relu(), nn.AdaptiveAvgPool2d(4),
                nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * w * 16, 8 * w), relu()]
        feat = 8 * w
    else:
        from mergan_nets import authors_classifier_body
        body, feat = authors_classifier_body(channels)
    return nn.Sequential(OrderedDict(body=nn.Sequential(*body),
                                     head=nn.Linear(feat, n_classes)))


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


@torch.no_grad()
def features(model, x, batch=1000):
    """The classifier's features (its body's output) of float images x."""
    return torch.cat([model.body(x[i:i + batch]) for i in range(0, len(x), batch)])


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
    """(evaluator, its real test accuracy %): trained once on the real training set, cached
    in a file named by what it learned from, <data-root>/evaluators/<dataset>-<size>px<prep>
    -n<images>[-authors]-v<version>.pt (`folder`: in <folder>-evaluators/, beside it); prep:
    e.g. "-resize" for resized digits. A cache whose recorded key differs is retrained."""
    name, folder = args.dataset, os.path.join(args.data_root, "evaluators")
    if args.dataset == "folder":
        root = os.path.abspath(args.data_root)
        name, folder = "folder-" + os.path.basename(root), root + "-evaluators"
    arch = getattr(args, "evaluator", "ours")
    width, steps = classifier_budget(args.dataset, len(train.y))
    path = os.path.join(folder, f"{name}-{train.x.shape[-1]}px{prep}-n{len(train.y)}"
                        + ("-authors" if arch == "authors" else "") + f"-v{EVALUATOR_VERSION}.pt")
    key = {"dataset": name, "n_train": len(train.y), "n_test": len(test.y), "prep": prep,
           "n_classes": n_classes, "version": EVALUATOR_VERSION, "width": width,
           "steps": steps, "arch": arch}
    # Ours draws its initial weights from the caller's stream, loaded or trained alike; the
    # authors' net is built on a side stream: the judge never changes what it judges.
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
    os.makedirs(folder, exist_ok=True)
    atomic_save({"key": key, "model": model.state_dict(), "test_acc": acc}, path)
    return model, acc


ACC_CHUNK = 64000  # generated images held at once (a multiple of 64 and of classify's 1000)


@torch.no_grad()
def generated_accuracy(generate, evaluator, classes, n, nz, device, batch=64):
    """MeRGAN's Acc: for each class, the evaluator's accuracy (%) on n images generated
    with that label (single-class batches). Returns {class: accuracy}."""
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
        raise UserError("Inception FID needs torchvision's Inception-v3 weights, which could "
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


# -- 5. Run outputs: folder, checkpoints, grids, progress, the task loop's bookkeeping -----
CHECKPOINT = "checkpoint.pt"


def prepare_run(args, script):
    """The run folder: with --resume the one in --out (its checkpoint returned; nothing is
    written), else a new one, never written over: the default name is created atomically
    (suffixed when taken); an --out holding more than a stopped run's args.json is refused.
    A new run's args.json is written here."""
    global RUN_FOLDER, RUN_SCRIPT
    ckpt = None
    if args.out is None:  # a new folder of its own, even for runs started in one second
        base = os.path.join("runs", f"{script}-{args.dataset}-s{args.seed}-"
                            + datetime.now().strftime("%Y%m%d-%H%M%S"))
        try:
            os.makedirs("runs", exist_ok=True)
            for n in range(1, 1000):
                args.out = base if n == 1 else f"{base}-{n}"
                try:
                    os.mkdir(args.out)  # atomic: exactly one run gets each name
                    break
                except FileExistsError:
                    continue
        except OSError as err:  # e.g. a read-only working directory
            raise UserError(f"cannot create a run folder under ./runs ({type(err).__name__}: "
                            f"{err.strerror or err}); pass --out to a writable place")
    path = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    if args.resume:
        if not os.path.exists(path):
            raise UserError(f"--resume: {path} does not exist (nothing to resume)")
        ckpt = load_checkpoint(path)
        if ckpt.get("script", script) != script:
            raise UserError(f"--resume: {args.out} is a run of {ckpt['script']}, not of "
                            f"{script}")
        for f in sorted(os.listdir(args.out)):  # left by a kill during a save: stale
            if f.endswith(".tmp"):
                os.remove(os.path.join(args.out, f))
                print(f"resume: removed {f}, a partial write of the interrupted run")
    elif os.path.exists(path):
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it or "
                        "choose another --out")
    elif os.path.isdir(args.out) and set(os.listdir(args.out)) - {"args.json"}:
        files = sorted(set(os.listdir(args.out)) - {"args.json"})
        raise UserError(f"--out {args.out} is not empty ({len(files)} entries, e.g. "
                        f"{files[0]}); nothing is overwritten: choose another --out")
    RUN_FOLDER, RUN_SCRIPT = args.out, script
    RUN_INPUTS.clear()
    if args.resume:  # args.json defines the run (parse_run_args): never rewritten
        return args.out, ckpt
    try:
        os.makedirs(args.out, exist_ok=True)
        save_json(os.path.join(args.out, "args.json"), vars(args))
    except OSError as err:  # read-only or full file system, a path through a file, ...
        raise UserError(f"--out {args.out}: cannot write there ({type(err).__name__}: "
                        f"{err.strerror or err})")
    return args.out, ckpt


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
            raise UserError(f"--resume: {k} fingerprint {v} is not the run's ({recorded[k]} "
                            f"in {out}); a run never mixes two: pass the data root it was "
                            "made with (its args.json) or start a new run")
    RUN_INPUTS.update(fps)


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
        try:
            os.remove(tmp)
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
            free = f"; {free:.0f} MiB free there"
        except OSError:
            free = ""
        full = isinstance(err, RuntimeError) or err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise UserError(f"cannot write {path} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:80]}){free}" + (" (a full disk?)" if full
                                                                     else "")
                        + ": the last good files are kept; fix it, then --resume")


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


def save_checkpoint(out, state):
    """checkpoint.pt: `state` with every RNG state, the script that wrote it, run_inputs."""
    atomic_save(dict(state, rng=rng_state(), script=RUN_SCRIPT, inputs=dict(RUN_INPUTS)),
                os.path.join(out, CHECKPOINT))


def load_checkpoint(path):
    """A checkpoint dictionary; a missing or unreadable file is one clear UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict):
            raise ValueError("not a checkpoint dictionary")
        return ckpt
    except Exception as err:
        why = str(err).splitlines()[0][:80] if str(err) else ""
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: "
                        f"{why})")


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


# Divergence that stays finite: beyond bounds no healthy run reaches (largest measured:
# |loss| 1,237, |parameter| 1.53; benchmarks/healthy_bounds.py), divergent ones do (1e13).
LOSS_BOUND, WEIGHT_BOUND = 1e6, 1e4
BLAME = "--lr"  # the flag most likely at fault when training diverges (suspect)


def suspect(args, usual, flags):
    """Set BLAME: of `flags` (learning rates, loss weights), the one set furthest above
    its usual value (`usual`: the script's parsed defaults), else --lr."""
    global BLAME
    ratio = {f: getattr(args, f) / getattr(usual, f) for f in flags
             if getattr(usual, f, None) and getattr(args, f, None)}
    worst = max(ratio, key=ratio.get, default=None)
    BLAME = (f"--{worst.replace('_', '-')} (now {getattr(args, worst):g}, default "
             f"{getattr(usual, worst):g})" if worst and ratio[worst] > 1 else "--lr")


class Progress:
    """A progress line every `every` iterations: losses, it/s and ETA. `update(it, losses)`
    reads the loss tensors (one host sync) only when it prints: no `.item()` in the loop.
    A value that is NaN/Inf, or a loss (tensor) beyond LOSS_BOUND, stops the run (Diverged);
    not bounded: penalties (their size is their lambda's, e.g. EWC's 1e9) and e.g. DGM's s."""

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
    """Diverged if a floating-point tensor of `module`'s state (parameters, buffers) is NaN
    or Inf, or a parameter beyond WEIGHT_BOUND: one host sync, once per task, before
    evaluating or saving."""
    ts = [v for v in module.state_dict().values()
          if torch.is_tensor(v) and v.is_floating_point()]
    big = [p.detach().abs().max() > WEIGHT_BOUND for p in module.parameters() if p.numel()]
    if ts and not bool(torch.stack([torch.isfinite(v).all() for v in ts]
                                   + [~b for b in big]).all()):
        raise Diverged(f"{where}: the weights hold NaN/Inf or values beyond {WEIGHT_BOUND:g} "
                       f"(those of healthy runs stay below 2; try a smaller {BLAME}); nothing "
                       "of it was evaluated or saved, earlier checkpoints are unchanged")


def setup(args, script, digits="pad"):
    """A sequential script's device, seed, data on the device, tasks, run folder (or the
    checkpoint to resume) and evaluator. `digits`: 28 -> 32 px (load_dataset)."""
    device = pick_device(args.device)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.type == "cuda" else ""), flush=True)
    seed_everything(args.seed)
    size, download = args.image_size, not args.no_download
    if args.mnist_train != 60000 and args.dataset != "mnist":
        raise UserError(f"--mnist-train is read with --dataset mnist only, not {args.dataset}")
    x, y, names = load_dataset(args.dataset, args.data_root, True, size, download, digits,
                               args.mnist_train)
    tx, ty, _ = load_dataset(args.dataset, args.data_root, False, size, download, digits)
    if len(names) < 2:  # an evaluator of one class would score 100% whatever G draws
        raise UserError(f"{args.dataset} in {args.data_root}: {len(names)} class found; the "
                        "class-incremental scripts need at least 2 (one sub-folder per class)")
    tasks = task_split(args.classes, len(names), args.classes_per_task)
    out, ckpt = prepare_run(args, script)
    run_inputs(ckpt, out, data=fingerprint(x, y, tx, ty))
    print(f"{args.dataset}: {len(y)} train / {len(ty)} test images {tuple(x.shape[1:])}; "
          f"tasks {tasks}; run folder {out}", flush=True)
    train, test = TaskData(x, y, device), TaskData(tx, ty, device)
    prep = f"-{digits}" if args.dataset in ("mnist", "fashion") and digits != "pad" else ""
    evaluator, evaluator_acc = get_evaluator(args, train, test, len(names), device, prep=prep)
    run_inputs(ckpt, out, evaluator=fingerprint(*evaluator.state_dict().values()))
    return argparse.Namespace(device=device, train=train, test=test, tasks=tasks, out=out,
                              ckpt=ckpt, evaluator=evaluator, evaluator_acc=evaluator_acc,
                              n_classes=len(names), channels=x.shape[1],
                              image_size=x.shape[-1])


class TaskRun:
    """The bookkeeping around a sequential script's task loop (the loop stays in the script):

        run = C.TaskRun(args, env, "mergan-ra", {"G": G, "D": D}, generate=G)
        for t in run.remaining_tasks():  # 0..T-1, or after the last checkpoint (--resume)
            train_task(t, ...)           # the method
            run.end_task(t)              # Acc of every class seen so far, grid, checkpoint
        metrics = run.finish(paper)      # GIF, metrics.json, the table (None: --max-tasks)

    `models` (nn.Modules) and `extra` (plain data the method fills in, e.g. its own metrics)
    are checkpointed with every RNG state, restored on --resume; `extra` joins metrics.json.
    `measure(seen)` -> {class: Acc %} replaces `generated_accuracy` (dgr.py: no classes in G)."""

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
                raise UserError(f"--resume: the checkpoint in {env.out} does not fit these "
                                f"networks or lacks a part ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:80]})")
            print(f"resuming after task {self.start}/{len(env.tasks)} from {env.out}",
                  flush=True)
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
        tasks, dev, args = self.env.tasks, self.env.device, self.args
        for name, module in self.models.items():  # never evaluate or save diverged weights
            check_finite(module, f"[task {t + 1}/{len(tasks)}] {name}")
        seen = [c for task in tasks[:t + 1] for c in task]
        acc = (self.measure(seen) if self.measure else generated_accuracy(
            self.generate, self.env.evaluator, seen, args.eval_samples, self.nz, dev))
        for c in seen:  # per-class history, None before the class is seen
            self.class_acc.setdefault(str(c), [None] * t).append(acc[c])
        self.R.append([float(np.mean([acc[c] for c in task])) for task in tasks[:t + 1]]
                      + [None] * (len(tasks) - t - 1))
        class_grid(self.generate, self.all_classes, seen, self.z_grid,
                   os.path.join(self.env.out, f"samples_task{t + 1}.png"))
        self.seconds += time.time() - self.t0
        print(f"[task {t + 1}/{len(tasks)}] Acc per task: "
              + " ".join(f"{v:.1f}" for v in self.R[t][:t + 1])
              + f"  avg {np.mean(self.R[t][:t + 1]):.2f}%  ({time.time() - self.t0:.0f}s)",
              flush=True)
        # the checkpoint first: metrics.json is never a task ahead of it
        save_checkpoint(self.env.out, {
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
                        "acc_matrix": self.R, **acc_summary(self.R),
                        "evaluator_test_acc": env.evaluator_acc, "device": str(env.device),
                        "seconds": self.seconds, "args": vars(self.args),
                        "class_acc": self.class_acc, **self.extra, **self.fields}
        save_json(os.path.join(env.out, "metrics.json"), self.metrics)
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
        frames = [imageio.imread(os.path.join(out, f"samples_task{t + 1}.png"))
                  for t in range(len(tasks))]
        save_gif(frames, os.path.join(out, "samples.gif"))
        header = (["after task"] + [",".join(map(str, task)) for task in tasks] + ["avg"]
                  + (["paper avg"] if paper else []))
        rows = [[t + 1] + self.R[t] + [self.metrics["avg_acc"][t]]
                + ([paper.get(t + 1)] if paper else []) for t in range(len(tasks))]
        print(f"\n{self.method} on {args.dataset}: generated-sample accuracy (%) by the "
              f"evaluator (real test accuracy {self.env.evaluator_acc:.2f}%), "
              f"{args.eval_samples} samples/class")
        print(fmt_table(header, rows))
        m = self.metrics
        print(f"forgetting (avg) {m['avg_forgetting']:.2f}  BWT {m['bwt']:.2f}  "
              f"training+eval time {self.seconds:.0f}s  -> {out}/metrics.json", flush=True)
        return m


def fmt_table(header, rows):
    """A plain text table: header is a list of str, rows lists of str/float/None."""
    cells = [[("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
              for v in row] for row in [header] + rows]
    width = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, width)) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])
