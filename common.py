"""Shared infrastructure for the continual-learning GAN scripts.

Nothing in here is a paper's algorithm: the algorithms live, readable top to bottom, in
`mergan_jtr.py`, `mergan_ra.py`, `dgm.py` and `ewc_fewshot.py`. This file holds what all of
them stand on, in this order:

  1. errors, device, seeding            (`UserError`, `cli`, `pick_device`, `seed_everything`)
  2. the shared command-line flags      (`add_common_args`, `task_split`)
  3. datasets, offline data, task data  (`load_dataset`, `make_synth`, `TaskData`)
  4. the MeRGAN digit networks, WGAN-GP (`Generator`, `Critic`, `gradient_penalty`)
  5. metrics                            (evaluator, generated-sample accuracy, accuracy
                                         matrix, reverse accuracy, Frechet distance, FID)
  6. run outputs                        (run folder, json, checkpoints, grids, GIF, progress)

Run it on its own to check a dataset and train (or load) its cached evaluator:

    python common.py --dataset synth            # offline, a minute on 2 CPU cores
    python common.py --dataset mnist --data-root ./data

Conventions: images are float tensors in [-1, 1], NCHW; datasets are held as uint8 tensors
on the compute device and converted per minibatch; labels keep the dataset's own class ids.
See docs/core.md for the choices made here and why.
"""
import argparse
import atexit
import glob
import hashlib
import json
import math
import os
import random
import sys
import time
from datetime import datetime

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------
# 1. Errors, device, seeding
# ------------------------------------------------------------------------------------------
class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, corrupt file): printed as one line."""


class Diverged(UserError):
    """Training produced NaN/Inf: the run stops before anything of the task is evaluated or
    saved, so the last checkpoint and metrics.json stay as they were."""


RUN_FOLDER = None  # set by prepare_run: where an interrupted run left its checkpoint
RUN_SCRIPT = None  # set by prepare_run: the script whose checkpoints these are


def check_argv(argv):
    """What argparse would misreport: `--classes -1,2` reads as a missing value (argparse
    takes -1,2 for an option)."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--classes" and value[:1] == "-" and value[1:2].isdigit():
            raise UserError(f"--classes: class indices are 0 or more, got {value}")


def cli(main, argv=None):
    """Run `main(argv)`; a UserError ends in one line on stderr and exit status 2."""
    try:
        check_argv(sys.argv[1:] if argv is None else argv)
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if RUN_FOLDER and os.path.exists(os.path.join(RUN_FOLDER, CHECKPOINT)):
            msg = (f"interrupted: the last finished task or stage is checkpointed in "
                   f"{RUN_FOLDER}; rerun with --resume --out {RUN_FOLDER}")
        else:
            msg = ("interrupted before the first checkpoint: nothing to resume"
                   + (f" ({RUN_FOLDER} holds no checkpoint)" if RUN_FOLDER else ""))
        print("\n" + msg, file=sys.stderr)
        sys.exit(130)


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------
# 2. The command-line flags every sequential script shares
# ------------------------------------------------------------------------------------------
def add_common_args(parser, iters, batch_size=64, eval_samples=6400):
    """Add the shared interface (see README, "Common flags"); defaults are the caller's."""
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-root", default="./data",
                   help="where datasets are read from / downloaded to (for `folder`: the "
                        "image folder itself, one sub-folder per class)")
    g.add_argument("--no-download", action="store_true",
                   help="never try the network; fail with a clear message if data is missing")
    g.add_argument("--image-size", type=int, default=None,
                   help="side of the square images (default: 32 for digits/synth/cifar10, "
                        "64 for folder and lsun)")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/<script>-<dataset>-s<seed>-<time>)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
    g.add_argument("--iters", type=int, default=iters, help="generator iterations per task")
    g.add_argument("--batch-size", type=int, default=batch_size, help="minibatch size")
    g.add_argument("--classes", default=None,
                   help="comma-separated classes in task order, e.g. 0,1,2 (default: all, "
                        "in order 0..n-1)")
    g.add_argument("--classes-per-task", type=int, default=1, help="classes in each task")
    g.add_argument("--evaluator", default="ours", choices=["ours", "authors"],
                   help="the classifier that judges generated images (Acc): ours (3 conv "
                        "blocks) or authors (MeRGAN's architectures: an MLP 1024-512-256-128 "
                        "for grey images, their 7-conv net for RGB; docs/core.md)")
    g.add_argument("--eval-samples", type=int, default=eval_samples,
                   help="generated samples per class for the accuracy metric "
                        "(paper: 6400 = 100 x 64)")
    g.add_argument("--log-every", type=int, default=100,
                   help="print a progress line every this many iterations")
    g.add_argument("--max-tasks", type=int, default=None,
                   help="stop after training this many tasks in this call (the run stays "
                        "resumable with --resume), e.g. to fit a time-limited job")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (default: the newest matching "
                        "run under runs/) from its last finished task")
    return g


# The numeric flags of every script, checked in one place after parsing (check_args):
# name -> the smallest value that makes sense. Flags a script does not have are skipped;
# None (a default resolved later) is skipped.
AT_LEAST = {"iters": 1, "batch_size": 1, "eval_samples": 1, "critic_iters": 1, "dim": 1,
            "ngf": 1, "ndf": 1, "nz": 1, "epochs": 1, "max_tasks": 1, "log_every": 1,
            "classes_per_task": 1, "source_iters": 1, "shots": 1, "replay_size": 1,
            "fisher_samples": 2, "fd_samples": 2, "diversity_samples": 2, "val_every": 1}
POSITIVE = ("lr", "s_max")                                           # > 0 and finite
NOT_NEGATIVE = ("lambda_gp", "lambda_cls", "lambda_ra", "lambda_ru", "ewc_lambda")  # >= 0
FRACTIONS = ("val_split",)                                           # 0 <= v < 1


def check_args(args):
    """One clear line (UserError) for a numeric flag out of range: counts below their
    minimum, a learning rate <= 0, a weight < 0, or NaN/Inf anywhere."""
    for name, low in AT_LEAST.items():
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
    for name in POSITIVE + NOT_NEGATIVE:
        v = getattr(args, name, None)
        if not isinstance(v, (int, float)):  # None, or a list given as text (few-shot)
            continue
        if not math.isfinite(v) or (v <= 0 if name in POSITIVE else v < 0):
            rule = "a positive number" if name in POSITIVE else "a number >= 0"
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {v}")
    for name in FRACTIONS:
        v = getattr(args, name, None)
        if v is not None and not 0 <= v < 1:  # NaN fails too
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    return args


def task_split(classes_arg, n_classes, per_task):
    """Parse --classes / --classes-per-task into a list of tasks, each a list of class ids.

    The papers' protocol is the default: one class per task, in the order 0, 1, ..., 9.
    """
    if classes_arg is None:
        classes = list(range(n_classes))
    else:
        try:
            classes = [int(c) for c in str(classes_arg).split(",") if c.strip() != ""]
        except ValueError:
            raise UserError(f"--classes must be comma-separated integers, got {classes_arg!r}")
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad or not classes:
        raise UserError(f"--classes {classes_arg!r}: classes must be in 0..{n_classes - 1}")
    if len(set(classes)) != len(classes):
        raise UserError(f"--classes {classes_arg!r} names a class twice")
    if per_task < 1 or len(classes) % per_task:
        raise UserError(f"--classes-per-task {per_task} does not divide the "
                        f"{len(classes)} classes into whole tasks")
    return [classes[i:i + per_task] for i in range(0, len(classes), per_task)]


# ------------------------------------------------------------------------------------------
# 3. Datasets
# ------------------------------------------------------------------------------------------
# name -> (channels, classes, where torchvision looks under --data-root, files expected there)
DATASETS = {
    "mnist": (1, 10, "MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                  "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "fashion": (1, 10, "FashionMNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                           "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "svhn": (3, 10, "", "train_32x32.mat, test_32x32.mat"),
    "cifar10": (3, 10, "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "folder": (3, None, "", "one sub-folder of images per class (or train/ and test/ "
                            "folders that each hold them)"),
    "lsun": (3, 4, "", "bedroom_train_lmdb, kitchen_train_lmdb, church_outdoor_train_lmdb, "
                       "tower_train_lmdb and the four *_val_lmdb (LSUN's download.py)"),
    "synth": (1, 10, None, None),        # generated offline by make_synth
    "synth-color": (3, 10, None, None),  # generated offline by make_synth(color=True)
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
                 digits="pad"):
    """Return (images uint8 N x C x S x S, labels int64 N, class names), on the CPU.

    28x28 digits (mnist, fashion) become 32x32 by `digits`: "pad" (a zero border, as the
    MeRGAN authors do) or "resize" (bilinear, as the DGM authors do). torchvision's loaders
    are used for the real datasets; files already in torchvision's layout are never
    downloaded again.
    """
    _, _, subdir, expected = dataset_info(name)
    if not name.startswith("synth") and os.path.isfile(root):
        raise UserError(f"--data-root {root} is a file; {name} needs a folder ({expected})")
    if name.startswith("synth"):
        # Fixed data seeds, independent of --seed: every run sees the same dataset.
        n = 1000 if train else 200
        color = {"synth": False, "synth-color": True, "synth-amber": "amber"}[name]
        x, y = make_synth(n, seed=1 if train else 2, color=color)
        return resize(x, image_size), y, [str(c) for c in range(10)]
    if name == "folder":
        return load_folder(root, train, image_size or 64)
    if name == "lsun":
        return load_lsun(root, train, image_size or 64)

    import torchvision.datasets as tvd
    cls = {"mnist": tvd.MNIST, "fashion": tvd.FashionMNIST,
           "svhn": tvd.SVHN, "cifar10": tvd.CIFAR10}[name]
    kw = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}

    def open_it(download_now):
        return cls(root, download=download_now, **kw)

    where = os.path.join(root, subdir) if subdir else root
    try:
        ds = open_it(False)
    except Exception as first:
        why = f"{first}".strip().splitlines()[0] if str(first).strip() else type(first).__name__
        missing = isinstance(first, FileNotFoundError) or (
            isinstance(first, RuntimeError) and "not found" in str(first).lower())
        if not missing:  # the files are there, but torchvision cannot parse them
            raise UserError(f"dataset {name!r} in {where}: its files are there but cannot be "
                            f"read ({type(first).__name__}: {why[:100]}); they may be corrupt "
                            "or truncated: delete them to download again")
        if download:
            try:
                ds = open_it(True)
                why = None
            except Exception as err:  # URLError, HTTPError, checksum, ...: all offline cases
                why = f"download failed: {type(err).__name__}: {err}".splitlines()[0]
        else:
            why = "--no-download was given"
        if why is not None:
            raise UserError(f"dataset {name!r} not found in {where} (expected {expected}) "
                            f"and not downloaded ({why})")

    if name in ("mnist", "fashion"):
        if digits == "resize":
            x = resize(ds.data.unsqueeze(1), 32)        # 28 -> 32, bilinear
        else:
            x = F.pad(ds.data, (2, 2, 2, 2)).unsqueeze(1)  # 28 -> 32, zero (= -1) border
        y = ds.targets.long()
    elif name == "svhn":
        x = torch.from_numpy(ds.data)                   # N x 3 x 32 x 32, label 10 -> 0
        y = torch.from_numpy(ds.labels).long()
    else:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(ds.targets).long()
    if len(x) != len(y):  # torchvision does not compare the two files
        raise UserError(f"dataset {name!r} in {where}: {len(x)} images but {len(y)} labels "
                        "in the " + ("training" if train else "test") + " files; they may be "
                        "truncated or from different downloads")
    names = list(getattr(ds, "classes", [])) or [str(c) for c in range(10)]
    return resize(x, image_size), y, names


def resize(x, size):
    """Resize uint8 images to size x size, or return them unchanged. Bilinear with
    antialias=True, torch's form of PIL's bilinear filter (what torchvision's Resize applies
    to PIL images, e.g. in the DGM authors' MNIST loader); rounded back to uint8."""
    if size is None or x.shape[-1] == size:
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_folder(root, train, size):
    """An ImageFolder root (one sub-folder per class) as uint8 tensors.

    With train/ and test/ sub-folders those are the splits; otherwise every 10th image of a
    class is held out for testing (classes with fewer than 10 images use all images in both).
    """
    from torchvision.datasets import ImageFolder
    import torchvision.transforms as T

    split_dir = os.path.join(root, "train" if train else "test")
    has_splits = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(
        os.path.join(root, "test"))
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        ds = ImageFolder(split_dir if has_splits else root, transform=tf,
                         loader=lambda p: _open_rgb(p))
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"dataset 'folder' not found in {root} (expected "
                        f"{DATASETS['folder'][3]}): {str(err).splitlines()[0]}")
    if has_splits:  # classes are matched by NAME: both splits must hold the same ones
        other = sorted(d.name for d in os.scandir(os.path.join(root, "test" if train
                                                                else "train")) if d.is_dir())
        if other != list(ds.classes):
            tr, te = (ds.classes, other) if train else (other, ds.classes)
            diff = sorted(set(tr) ^ set(te))
            raise UserError(f"folder {root}: train/ and test/ must hold the same class "
                            f"folders; only in one of them: {', '.join(diff[:5])}"
                            + (" ..." if len(diff) > 5 else ""))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets).long()
    if not has_splits:
        keep = torch.ones(len(y), dtype=torch.bool)  # classes under 10 images: all in both
        for c in y.unique():
            idx = (y == c).nonzero().flatten()
            if len(idx) >= 10:
                test = torch.zeros(len(idx), dtype=torch.bool)
                test[::10] = True
                keep[idx] = ~test if train else test
        x, y = x[keep], y[keep]
    return x, y, list(ds.classes)


# MeRGAN Table 2: four LSUN scene categories, one per task, in this order; the authors use
# 100,000 training images per category and LSUN's validation images (300 each) for testing.
LSUN_CATEGORIES = ("bedroom", "kitchen", "church_outdoor", "tower")
LSUN_PER_CLASS = 100_000


def load_lsun(root, train, size, per_class=LSUN_PER_CLASS):
    """The LSUN categories of Table 2 from LSUN's own lmdb databases in root
    (<category>_train_lmdb / <category>_val_lmdb, as LSUN's download.py writes them, the
    format torchvision's LSUN class reads). The first `per_class` images of each category
    (all validation images), resized (short side) and centre-cropped to size x size.
    Decoding 400,000 images takes a while, so the result is cached as uint8 tensors in
    <root>/lsun-cache/. Offline, missing databases are a UserError (LSUN has no download
    in torchvision; export categories as image folders and use `folder` as an alternative)."""
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
        raise UserError(f"dataset 'lsun' not found in {root} (missing {', '.join(missing)}; "
                        "expected the lmdb folders of LSUN's download.py, e.g. `python "
                        "download.py -c bedroom` then unzip; or export the categories as "
                        "image folders and use --dataset folder)")
    try:
        import lmdb
    except ImportError:
        raise UserError("dataset 'lsun' reads LSUN's lmdb databases: pip install lmdb")
    import io
    from PIL import Image
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    xs, ys = [], []
    for label, path in enumerate(paths):
        t0, n0 = time.time(), len(xs)
        print(f"lsun: decoding {os.path.basename(path)}"
              + (f" (first {per_class} images)" if train else "") + " ...", flush=True)
        db = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        with db.begin(write=False) as txn:
            for i, (_, value) in enumerate(txn.cursor()):
                if train and i >= per_class:
                    break
                try:
                    with Image.open(io.BytesIO(value)) as im:
                        xs.append(tf(im.convert("RGB")))
                except (OSError, ValueError) as err:
                    raise UserError(f"lsun: image {i} of {path} cannot be decoded ({err})")
                ys.append(label)
        db.close()
        print(f"lsun: {len(xs) - n0} images in {time.time() - t0:.0f}s", flush=True)
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_save({"x": x, "y": y}, cache)
    return x, y, list(LSUN_CATEGORIES)


def _open_rgb(path):
    """An image file as PIL RGB; an unreadable one (not an image, truncated) is a UserError
    that names it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad image data
        raise UserError(f"cannot read image {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unreadable'}")


def make_synth(n_per_class, seed, color=False):
    """An offline, class-conditional digits dataset, generated in about a second.

    Each of the 10 classes is the glyph of its digit, rendered with Pillow's built-in
    (FreeType) font at three stroke widths, then put through a random affine transform
    (rotation +-15 deg, scale 0.75-1.1, shear, shift) and intensity jitter and pixel noise, so
    that a GAN has to learn a shape distribution rather than copy one picture. `color=True`
    paints the glyph and the background in two random colours of different brightness (an
    SVHN-like path with 3 channels). `color="amber"` paints every glyph amber on a navy
    background (small per-image jitter): one fixed style, the few-shot target of
    ewc_fewshot.py (same shapes as `synth`, another look). Deterministic for a given seed.
    Returns uint8 images (N x C x 32 x 32) and int64 labels, classes interleaved 0..9, 0..9.
    """
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
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)
    src = glyphs[y, torch.randint(0, 3, (n,), generator=g)]           # N x 1 x 64 x 64
    angle, scale, shear = u(-15, 15) * math.pi / 180, u(0.75, 1.1), u(-0.25, 0.25)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, u(-0.12, 0.12)], 1),
                         torch.stack([sin, cos, u(-0.12, 0.12)], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)
    mask = F.grid_sample(src, grid, align_corners=False, padding_mode="zeros")  # N x 1 x 32 x 32
    mask = mask * u(0.7, 1.0).view(n, 1, 1, 1)
    if not color:
        img = mask + 0.05 * torch.randn(mask.shape, generator=g)
    elif color == "amber":
        jitter = lambda: 0.06 * torch.randn(n, 3, 1, 1, generator=g)
        bg = (torch.tensor([0.08, 0.10, 0.35]).view(1, 3, 1, 1) + jitter()).clamp(0, 1)
        fg = (torch.tensor([1.00, 0.70, 0.15]).view(1, 3, 1, 1) + jitter()).clamp(0, 1)
        img = bg * (1 - mask) + fg * mask + 0.06 * torch.randn(n, 3, 32, 32, generator=g)
    else:
        bg = torch.rand(n, 3, 1, 1, generator=g)
        fg = torch.rand(n, 3, 1, 1, generator=g)
        lum = lambda c: (0.299 * c[:, 0] + 0.587 * c[:, 1] + 0.114 * c[:, 2]).view(n, 1, 1, 1)
        too_close = (lum(fg) - lum(bg)).abs() < 0.4
        fg = torch.where(too_close, 1.0 - bg, fg)  # keep the digit readable
        img = bg * (1 - mask) + fg * mask + 0.06 * torch.randn(n, 3, 32, 32, generator=g)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return x, y


class TaskData:
    """A dataset held on the compute device as uint8; minibatches are sampled there.

    `batch(n, classes)` draws n images (with replacement, as the authors' infinite
    generators effectively do) from the given classes, returned in [-1, 1] with labels.
    """

    def __init__(self, x, y, device):
        self.x = x.to(device)
        self.y = y.to(device)
        self.device = device
        self._index = {}  # tuple(classes) -> indices on device

    def indices(self, classes):
        key = tuple(sorted(classes))
        if key not in self._index:
            mask = torch.zeros_like(self.y, dtype=torch.bool)
            for c in key:
                mask |= self.y == c
            idx = mask.nonzero().flatten()
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


def hold_out(data, fraction, seed):
    """Split a TaskData into (train, validation): int(fraction * n) of the n images of every
    class go to validation, drawn by a generator seeded with `seed` (so that --resume finds
    the same split). fraction 0: (data, None)."""
    if not fraction:
        return data, None
    g = torch.Generator().manual_seed(seed)
    y = data.y.cpu()
    val = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        n_val = int(fraction * len(idx))
        if not 0 < n_val < len(idx):
            raise UserError(f"--val-split {fraction} leaves class {c} ({len(idx)} images) "
                            "without validation or training images; use --val-split 0")
        val.append(idx[torch.randperm(len(idx), generator=g)[:n_val]])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    keep, val = keep.to(data.device), val.to(data.device)
    return (TaskData(data.x[keep], data.y[keep], data.device),
            TaskData(data.x[val], data.y[val], data.device))


# ------------------------------------------------------------------------------------------
# 4. The MeRGAN digit networks (docs/core.md, "Networks") and WGAN-GP
# ------------------------------------------------------------------------------------------
def conv5_s2(x, weight, bias=None):
    """F.conv2d(x, weight, bias, stride=2, padding=2) for a 5x5 kernel, computed as a 3x3
    stride-1 convolution over 2x2 pixel blocks ("space-to-depth"): the kernel is padded to
    6x6 and image and kernel are regrouped into 4x the channels. The same sums (tests
    compare), but about 2.5x faster on the CPU when x has 1-3 channels, where oneDNN's 5x5
    stride-2 kernels are slow. Used for the critic's first layer."""
    w = F.pixel_unshuffle(F.pad(weight, (0, 1, 0, 1)), 2)        # out x 4in x 3 x 3
    return F.conv2d(F.pixel_unshuffle(F.pad(x, (2, 2, 2, 2)), 2), w, bias)


def conv_transpose5_s2(x, weight, bias=None):
    """F.conv_transpose2d(x, weight, bias, stride=2, padding=2, output_padding=1), the
    adjoint of `conv5_s2`, computed the same way (transposed 3x3 conv to 4x the channels,
    then pixel shuffle and crop). Used for the generator's last layer (1-3 output
    channels) and the first layer of the critic's input gradient."""
    w = F.pixel_unshuffle(F.pad(weight, (0, 1, 0, 1)), 2)        # in x 4out x 3 x 3
    h = F.pixel_shuffle(F.conv_transpose2d(x, w), 2)[:, :, 2:-2, 2:-2]
    return h if bias is None else h + bias.view(1, -1, 1, 1)


class CondBatchNorm2d(nn.Module):
    """Batch norm with a per-class scale and offset (conditional BN).

    As in the authors' TF code (tflib `cond_batchnorm`), it ALWAYS normalises with batch
    statistics: in training, in replay and in generation; no running averages exist, so
    `.eval()` changes nothing. The authors give every replay and evaluation batch a single
    class; here the statistics are computed per class within the batch, which is exactly
    that protocol (a mixed batch = one single-class batch per class) in one call.
    With n_classes=None it is plain, unconditional batch norm. per_class_affine=False keeps
    the per-class statistics but one shared scale and offset (the authors' LSUN generator,
    which gets the label through z instead).
    groups, n_groups: which rows share statistics, when not the rows of one class: a tensor
    of group ids in [0, n_groups). The paper's JT (mergan_jtr.py --mode jt) normalises its
    mixed-class batches as one (all zeros, n_groups 1), as the authors' joint.py does.
    """

    def __init__(self, channels, n_classes=None, eps=1e-5, per_class_affine=True):
        super().__init__()
        k = n_classes if n_classes and per_class_affine else 1
        self.n_classes, self.eps = n_classes, eps
        self.scale = nn.Parameter(torch.ones(k, channels))
        self.offset = nn.Parameter(torch.zeros(k, channels))

    def forward(self, x, y=None, groups=None, n_groups=None):
        if groups is None and (y is None or not self.n_classes or self.n_classes == 1):
            return F.batch_norm(x, None, None, self.scale[0], self.offset[0], training=True,
                                eps=self.eps)
        if groups is None:  # the default: statistics per class
            groups, n_groups = y, self.n_classes
        onehot = F.one_hot(groups, n_groups).to(x.dtype)                   # N x K
        count = onehot.sum(0).clamp(min=1).unsqueeze(1)                     # K x 1
        mean = (onehot.T @ x.mean((2, 3)) / count)[groups][:, :, None, None]  # group means
        centred = x - mean
        var = (onehot.T @ centred.square().mean((2, 3)) / count)[groups]   # biased, as BN
        # normalise, scale and shift in one pass: centred * (scale / std) + offset
        rows = y if len(self.scale) > 1 else torch.zeros_like(groups)
        a = self.scale[rows] * torch.rsqrt(var + self.eps)
        return torch.addcmul(self.offset[rows][:, :, None, None], centred, a[:, :, None, None])


class Generator(nn.Module):
    """MeRGAN's digit generator (DCGAN with conditional BN), docs/core.md "Networks".

    z (nz=128) -> Linear -> 4x4 x 4dim -> cBN, ReLU -> [ConvT 5x5 s2, cBN, ReLU] ... ->
    ConvT 5x5 s2 -> tanh. dim=32 at 32x32 gives 128 -> 64 -> 32 -> channels, the authors'
    net. image_size 64 adds one up-sampling block. n_classes=None: unconditional.
    fast=False (--plain-step): the last layer is nn.ConvTranspose2d itself; fast=True
    computes the same sums through `conv_transpose5_s2` (a speed branch, tested equal).
    """

    def __init__(self, channels=1, n_classes=10, dim=32, nz=128, image_size=32, fast=True):
        super().__init__()
        self.fast = fast
        n_up = int(math.log2(image_size // 4))
        if 4 * 2 ** n_up != image_size:
            raise UserError(f"image size {image_size} must be 4 x a power of two (32, 64)")
        widths = [dim * 2 ** i for i in reversed(range(n_up))]   # e.g. [128, 64, 32]
        self.nz, self.top = nz, widths[0]
        self.fc = nn.Linear(nz, 4 * 4 * widths[0])
        self.bns = nn.ModuleList([CondBatchNorm2d(w, n_classes) for w in widths])
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i], widths[i + 1], 5, 2, 2, output_padding=1)
             for i in range(n_up - 1)]
            + [nn.ConvTranspose2d(widths[-1], channels, 5, 2, 2, output_padding=1)])

    def forward(self, z, y=None, groups=None, n_groups=None):
        """Images for noise z and labels y; groups/n_groups: rows that share batch-norm
        statistics (default: the rows of one class; CondBatchNorm2d)."""
        h = self.fc(z).view(len(z), self.top, 4, 4)
        for bn, up in zip(self.bns, self.ups):
            h = F.relu(bn(h, y, groups, n_groups))
            if self.fast and up is self.ups[-1]:  # SPEED BRANCH: the same sums as up(h),
                h = conv_transpose5_s2(h, up.weight, up.bias)  # faster for 1-3 channels
            else:
                h = up(h)                          # plain: ConvTranspose2d 5x5, stride 2
        return torch.tanh(h)


class Critic(nn.Module):
    """MeRGAN's digit critic: 5x5 s2 convs (dim, 2dim, 4dim), LeakyReLU 0.2, no
    normalisation (WGAN-GP), two linear heads on the shared features: the critic D (one
    score) and the auxiliary classifier C (n_classes logits; None: no classifier head).
    forward returns (score N, logits N x n_classes or None). fast=False (--plain-step): the
    first layer is nn.Conv2d itself and the gradient penalty uses autograd; fast=True
    computes the same through `conv5_s2` and `input_gradient` (speed branches, tested equal).
    """

    def __init__(self, channels=1, n_classes=10, dim=32, image_size=32, fast=True):
        super().__init__()
        self.fast = fast
        n_down = int(math.log2(image_size // 4))
        widths = [channels] + [dim * 2 ** i for i in range(n_down)]
        self.convs = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 5, 2, 2)
                                    for i in range(n_down)])
        feat = widths[-1] * 4 * 4
        self.critic = nn.Linear(feat, 1)
        self.classifier = nn.Linear(feat, n_classes) if n_classes else None

    def forward(self, x):
        h = x
        for conv in self.convs:
            if self.fast and conv is self.convs[0]:  # SPEED BRANCH: the same sums as
                h = conv5_s2(h, conv.weight, conv.bias)  # conv(h), faster for 1-3 channels
            else:
                h = conv(h)                           # plain: Conv2d 5x5, stride 2
            h = F.leaky_relu(h, 0.2)
        h = h.flatten(1)
        logits = self.classifier(h) if self.classifier is not None else None
        return self.critic(h).squeeze(1), logits

    def input_gradient(self, x):
        """d score(x) / d x, written out layer by layer, with a graph through the weights
        (what the gradient penalty needs) but not through x.

        The critic is linear maps and LeakyReLUs, so its input gradient is
            grad_x = W_1^T (m_1 * W_2^T (m_2 * ... W_L^T (m_L * w_critic)))
        with m_l = 1 where the pre-activation a_l > 0, else 0.2 (PyTorch's convention at
        a_l = 0), and W_l^T a transposed convolution. The masks are piecewise constant in
        the weights, so their derivative is zero: they are computed without a graph. This is
        the same value and the same weight gradient as autograd's double backward
        (tests/test_common.py checks both), at about two thirds of the cost: autograd also
        back-propagates the (zero) derivative of the masks through every forward conv."""
        masks = []
        with torch.no_grad():
            h = x
            for i, conv in enumerate(self.convs):
                a = conv5_s2(h, conv.weight, conv.bias) if i == 0 else conv(h)
                masks.append(torch.where(a > 0, 1.0, 0.2))
                h = F.leaky_relu(a, 0.2)
        g = self.critic.weight.view(1, *h.shape[1:]).expand(len(x), *h.shape[1:])
        for i in reversed(range(len(self.convs))):  # W_l^T: 5x5, stride 2, padding 2
            w = self.convs[i].weight
            g = (conv_transpose5_s2(g * masks[i], w) if i == 0 else
                 F.conv_transpose2d(g * masks[i], w, stride=2, padding=2, output_padding=1))
        return g


def gradient_penalty(critic_fn, real, fake, input_gradient=None):
    """WGAN-GP (Gulrajani et al. 2017; MeRGAN Eq. 5, last term, without lambda):
    E[(||grad_x D(x_hat)||_2 - 1)^2], x_hat = eps*real + (1-eps)*fake, eps ~ U(0,1) per sample.
    `critic_fn(x)` must return one score per sample; autograd takes its input gradient (a
    double backward, the textbook form, for any critic). `input_gradient(x)`, if given
    (the digit critic's `Critic.input_gradient`, a speed branch), returns the same
    grad_x D(x) with a graph through D's weights, written out."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device)
    x_hat = eps * real.detach() + (1 - eps) * fake.detach()
    if input_gradient is None:  # plain: autograd
        x_hat.requires_grad_(True)
        (grad,) = torch.autograd.grad(critic_fn(x_hat).sum(), x_hat, create_graph=True)
    else:                       # SPEED BRANCH: the same gradient, written out
        grad = input_gradient(x_hat)
    norm = grad.flatten(1).square().sum(1).add(1e-12).sqrt()
    return (norm - 1).square().mean()


# ------------------------------------------------------------------------------------------
# Speed on a GPU: one training iteration recorded in a CUDA graph and replayed
# ------------------------------------------------------------------------------------------
def add_cuda_graph_arg(parser):
    """--cuda-graphs / --no-cuda-graphs, for the scripts whose iteration `GraphedStep` runs."""
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, record one training iteration in a CUDA graph and "
                             "replay it: the same arithmetic and random numbers, a fraction "
                             "of the kernel-launch overhead (docs/core.md). "
                             "--no-cuda-graphs: the plain eager loop. The CPU always runs "
                             "the eager loop")


def use_cuda_graphs(args, device):
    return device.type == "cuda" and getattr(args, "cuda_graphs", False)


def adam(module, lr, betas, device):
    """Adam over module's parameters. On CUDA its step counter lives on the device
    (`capturable`), so that a CUDA graph can replay the update; both loops use it, so that
    the eager and the graphed loop do the same arithmetic."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas,
                            capturable=device.type == "cuda")


class GraphedStep:
    """`step()` is one whole training iteration (all its critic and generator updates) that
    takes no arguments: it reads the models, the optimisers and the data resident on the
    device, draws its random numbers there, and returns a dict of loss tensors.

    enabled=False: every call runs `step()` as written (the plain eager loop).
    enabled=True (CUDA only): the first `warmup` calls run `step()` eagerly on a side stream
    (cuDNN/cuBLAS handles and Adam's state get created); the next call records `step()` into
    a CUDA graph -- recording launches nothing -- and replays it; every later call only
    replays it: one launch instead of a few hundred kernels. Either way each call is exactly
    one training iteration. Replays use the same parameters, optimiser state and dataset
    tensors, in place, and CUDA's random generator advances as it would in the eager loop,
    so both loops compute the same numbers (tests/test_cuda.py compares them). If recording
    fails, the run stops with one line that says to rerun with --no-cuda-graphs. The returned
    loss tensors are overwritten by the next replay: read them before the next call (the
    progress line does). Build a new GraphedStep whenever the Python side of the step
    changes (a new task, new optimisers, a new frozen generator)."""

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
            except Exception as err:  # e.g. an operation that waits for the host
                # A failed recording can leave Python state half-way through the iteration
                # (a critic still frozen) and, in older torch, the random generator in
                # capture mode: stop cleanly rather than go on from an unknown state. The
                # task's iterations so far are not saved; --resume restarts the task.
                cause = err.__context__ or err
                why = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                raise UserError(f"CUDA graph recording of the training iteration failed "
                                f"({type(cause).__name__}: {why}); rerun with "
                                "--no-cuda-graphs (with --resume to continue after the last "
                                "finished task)") from err
            self.graph, self.out = graph, out
        self.graph.replay()
        return self.out


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

    def forward(self, x, y):
        h = self.conv1(F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2))
        h = self.conv2(F.relu(self.bn2(h, y)))
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
        raise UserError(f"image size {image_size} must be 4 x a power of two (16, 32, 64)")
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

    def forward(self, z, y=None):
        if self.n_classes:  # the authors' conditioning: the label's one-hot joins z
            z = torch.cat([z, F.one_hot(y, self.n_classes).to(z.dtype)], 1)
        h = self.fc(z).view(len(z), self.top, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h, y))))


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


def mergan_networks(arch, channels, n_classes, dim, image_size, critic_classes, fast=True):
    """MeRGAN's generator and critic: arch 'dcgan' (the digit nets, Table 1) or 'resnet'
    (the LSUN nets, Table 2). critic_classes: size of the classifier head (None: none).
    fast=False (--plain-step): the digit nets without their speed branches."""
    if arch == "resnet":
        return (ResNetGenerator(channels, n_classes, dim, image_size=image_size),
                ResNetCritic(channels, critic_classes, dim, image_size=image_size))
    return (Generator(channels, n_classes, dim, image_size=image_size, fast=fast),
            Critic(channels, critic_classes, dim, image_size=image_size, fast=fast))


@torch.no_grad()
def generate_class(generate, c, n, nz, device, batch=64, z=None):
    """n images of class c from `generate(z, y)`, in single-class batches (the authors'
    protocol: their batch-statistics BN sees one class per batch)."""
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        zi = z[i:i + m] if z is not None else torch.randn(m, nz, device=device)
        out.append(generate(zi, torch.full((m,), c, dtype=torch.long, device=device)))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# 5. Metrics
# ------------------------------------------------------------------------------------------
class BodyHead(nn.Module):
    """A classifier as `body` (features: the penultimate layer) then `head` (logits)."""

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class Evaluator(BodyHead):
    """The classifier that judges generated images (and is the feature net of the
    evaluator Frechet distance): 3 conv blocks + a 256-d feature layer + logits."""

    def __init__(self, channels, n_classes, width=32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * w * 16, 8 * w), nn.ReLU())
        self.head = nn.Linear(8 * w, n_classes)


class AuthorsMLP(BodyHead):
    """MeRGAN's MNIST evaluator (pretrain/mnist_test.py, `Mlp`): the 32x32 image flattened,
    fully connected 1024-512-256-128 with ReLU, then the logits. The adaptive pooling is
    the identity at 32 px (theirs) and lets other sizes through."""

    def __init__(self, channels, n_classes):
        super().__init__()
        widths = [channels * 32 * 32, 1024, 512, 256, 128]
        layers = [nn.AdaptiveAvgPool2d(32), nn.Flatten()]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128, n_classes)


class AuthorsConv(BodyHead):
    """MeRGAN's SVHN evaluator (pretrain/svhn_test.py, `Conv`): 3x3 convs with ReLU,
    32-32 | pool | 64-64 | pool | 128-128-128 | pool, then fully connected 512-128 with
    ReLU and the logits. The adaptive pooling is the identity at 32 px (4x4 after three
    pools, theirs) and lets other sizes through."""

    def __init__(self, channels, n_classes):
        super().__init__()
        layers, c_in = [], channels
        for block in ([32, 32], [64, 64], [128, 128, 128]):
            for c_out in block:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128 * 16, 512), nn.ReLU(),
                   nn.Linear(512, 128), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128, n_classes)


def make_classifier(arch, channels, n_classes, width):
    """`ours` (Evaluator, `width`) or `authors` (AuthorsMLP for grey images, AuthorsConv
    for colour ones, as MeRGAN judges MNIST and SVHN)."""
    if arch == "authors":
        return AuthorsMLP(channels, n_classes) if channels == 1 else AuthorsConv(channels,
                                                                                 n_classes)
    return Evaluator(channels, n_classes, width)


def train_classifier(x, y, n_classes, device, steps=1500, width=32, batch=128, lr=1e-3,
                     seed=0, log=None, arch="ours"):
    """Train an `Evaluator` on float images x in [-1, 1] (on `device`) with labels y.
    Random +-2 pixel shifts as light augmentation. Used for the evaluator and for reverse
    accuracy."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)  # init + dropout: deterministic, no effect on the caller's RNG
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
    model.eval()
    torch.set_rng_state(torch_state)
    return model


@torch.no_grad()
def classify(model, x, batch=1000):
    """Predicted labels for float images x (any device the model is on)."""
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


@torch.no_grad()
def features(model, x, batch=1000):
    return torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(model, x, y):
    return 100.0 * (classify(model, x) == y).float().mean().item()


EVALUATOR_VERSION = 1  # bump when Evaluator or its training changes: old caches retrain


def classifier_budget(dataset, n):
    """(width, steps) of a classifier trained on n images of `dataset`. The offline sets are
    easy: a narrow net and 600 steps reach ~99% in seconds on a CPU. Real data: ~8 epochs,
    1,500 to 6,000 steps (300 for sets of under 2,000 images)."""
    if dataset.startswith("synth"):
        return 16, 600
    return 32, int(min(6000, max(1500 if n >= 2000 else 300, 8 * n / 128)))


def data_fingerprint(data, most=4096):
    """A short hash of a TaskData's content: its shape, every label and up to `most` images
    spread evenly over it. Two preparations of one dataset (MNIST padded or resized to
    32 px) get different fingerprints, so that neither reuses the other's evaluator."""
    h = hashlib.sha1(str(tuple(data.x.shape)).encode())
    step = max(1, len(data.x) // most)
    h.update(data.x[::step].cpu().numpy().tobytes())
    h.update(data.y.cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def evaluator_cache(args, train):
    """(cache file, dataset name, content fingerprint) of the evaluator for this training
    data: under
    <data-root>/evaluators/, or, for `folder`, in <folder>-evaluators/ beside the image
    folder (so that it never becomes a class); named by dataset, image size and content
    (data_fingerprint)."""
    name, cache = args.dataset, os.path.join(args.data_root, "evaluators")
    if args.dataset == "folder":
        folder = os.path.abspath(args.data_root)
        name, cache = "folder-" + os.path.basename(folder), folder + "-evaluators"
    content = data_fingerprint(train)
    arch = "-authors" if getattr(args, "evaluator", "ours") == "authors" else ""
    file = f"{name}-{train.x.shape[-1]}px-{content}{arch}-v{EVALUATOR_VERSION}.pt"
    return os.path.join(cache, file), name, content


def get_evaluator(args, train, test, n_classes, device, log=print):
    """The dataset's evaluator classifier, trained on the real training set and cached
    (evaluator_cache: one file per dataset, image size and content). Returns (model, real
    test accuracy in %)."""
    path, name, content = evaluator_cache(args, train)
    key = {"dataset": name, "n_train": len(train.y), "n_test": len(test.y),
           "n_classes": n_classes, "version": EVALUATOR_VERSION, "data": content}
    width, steps = classifier_budget(args.dataset, len(train.y))
    arch = getattr(args, "evaluator", "ours")
    key = dict(key, width=width, steps=steps, **({"arch": arch} if arch != "ours" else {}))
    # Building our Evaluator draws its initial weights from the caller's random stream; the
    # authors' net is built on a side stream after it, so that a run's generator is the
    # same whichever judge it gets (--evaluator changes Acc, never the training).
    model = Evaluator(train.x.shape[1], n_classes, width).to(device)
    if arch != "ours":
        with torch.random.fork_rng(devices=[]):
            model = make_classifier(arch, train.x.shape[1], n_classes, width).to(device)
    if os.path.exists(path):
        try:
            ck = torch.load(path, map_location=device, weights_only=True)
            if ck["key"] == key:
                model.load_state_dict(ck["model"])
                model.eval()
                log(f"evaluator: loaded {path} (real test accuracy {ck['test_acc']:.2f}%)")
                return model, ck["test_acc"]
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"key": key, "model": model.state_dict(), "test_acc": acc}, path)
    return model, acc


@torch.no_grad()
def generated_accuracy(generate, evaluator, classes, n, nz, device, batch=64):
    """MeRGAN's Acc: for each class, the evaluator's accuracy (%) on n images generated
    with that label (single-class batches). Returns {class: accuracy}."""
    out = {}
    for c in classes:
        x = generate_class(generate, c, n, nz, device, batch)
        # an image with NaN/Inf pixels is never a digit (argmax of NaN logits would say 0)
        pred = classify(evaluator, x).masked_fill(~torch.isfinite(x).flatten(1).all(1), -1)
        out[c] = 100.0 * (pred == c).float().mean().item()
    return out


def acc_summary(R):
    """Summaries of an accuracy matrix R[t][i] (%, None where task i is not yet seen):
    avg_acc[t] = mean_{i<=t} R[t][i]; forgetting_i = max_{t'<T} R[t'][i] - R[T][i]
    (i < T, T = last task); BWT = mean_{i<T} (R[T][i] - R[i][i]). docs/core.md, "Metrics"."""
    T = len(R) - 1
    avg = [float(np.mean(row[:t + 1])) for t, row in enumerate(R)]
    forgetting = [max(R[t][i] for t in range(i, T)) - R[T][i] for i in range(T)]
    bwt = float(np.mean([R[T][i] - R[i][i] for i in range(T)])) if T > 0 else 0.0
    return {"avg_acc": avg, "forgetting": forgetting,
            "avg_forgetting": float(np.mean(forgetting)) if forgetting else 0.0, "bwt": bwt}


def reverse_accuracy(generate, classes, n, nz, test, n_classes, device, steps=1500, width=32,
                     seed=0, x=None):
    """Rev acc (MeRGAN Table 2): train a fresh classifier on n generated images per class
    (labels = the conditioning classes), test it on the real test images of those classes.
    x: those images (n per class, in the order of `classes`) if already generated."""
    if x is None:
        x = torch.cat([generate_class(generate, c, n, nz, device) for c in classes])
    y = torch.cat([torch.full((n,), c, dtype=torch.long, device=device) for c in classes])
    model = train_classifier(x, y, n_classes, device, steps=steps, width=width, seed=seed)
    tx, ty = test.subset(classes)
    return accuracy(model, tx, ty)


def frechet_distance(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples).
    float64, torch only; see frechet_from_stats."""
    f1, f2 = f1.double(), f2.double()
    return frechet_from_stats(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T))


def frechet_from_stats(mu1, s1, mu2, s2):
    """d^2 = ||mu1-mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2).

    S1 S2 is similar to M = S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so
    tr (S1 S2)^(1/2) = sum sqrt(eig(M)). S1^(1/2) comes from `eigh` with eigenvalues clamped
    at 0, M is symmetrised and its eigenvalues clamped at 0: stable for rank-deficient
    covariances (fewer samples than feature dimensions), no complex numbers, no scipy."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    d2 = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * ev.sqrt().sum()
    return float(d2.clamp(min=0))


def inception_net(device):
    """torchvision's ImageNet Inception-v3 as a 2048-d feature net (pool3).

    Its weights are downloaded once into torch's cache; offline this is a UserError. NOTE:
    these are torchvision's weights, not the TF-FID Inception: numbers are comparable among
    themselves, not to papers' TF FID values."""
    from torchvision.models import Inception_V3_Weights, inception_v3
    try:
        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, aux_logits=True)
    except Exception as err:
        raise UserError("Inception FID needs torchvision's Inception-v3 weights, which could "
                        f"not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "use the evaluator-feature Frechet distance offline")
    net.fc = nn.Identity()
    return net.eval().to(device)


@torch.no_grad()
def inception_features(net, x, batch=100):
    """Features of images in [-1, 1] (1 or 3 channels, any size) for Inception FID."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(x), batch):
        xb = (x[i:i + batch] + 1) / 2
        xb = xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb
        xb = F.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net((xb - mean) / std))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# 6. Run outputs: folder, json, checkpoints, grids, GIF, progress
# ------------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint.pt"


# Flags that may change between a run and its --resume: where and how it runs, what it
# prints, the end-of-run report. Every other flag defines the experiment and must match.
RESUME_MAY_CHANGE = {"resume", "out", "device", "log_every", "max_tasks", "cuda_graphs",
                     "data_root", "no_download", "source_root", "target_root", "source_ckpt",
                     "final_metrics", "inception_fid", "status_every"}


LOCK = ".lock"  # in a run folder while a run writes there: the pid of that run


def lock_run_folder(out):
    """Take the run folder's lock file (created atomically, holding our pid; removed when
    this process exits). A lock of a live other process is one clear UserError; a lock
    whose process is gone (a killed run) is taken over."""
    path = os.path.join(out, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return  # ours already (a second prepare_run in this process)
            if pid == 0 or _process_alive(pid):
                raise UserError(f"--out {out} is in use by another run"
                                + (f" (pid {pid})" if pid else "") + "; wait for it or "
                                f"choose another --out (delete {path} if no run uses it)")
            os.remove(path)  # its run was killed: the lock is stale
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        atexit.register(_unlock, path)
        return


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive: someone else's process
    return True


def _unlock(path):
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.remove(path)
    except OSError:
        pass


def prepare_run(args, script):
    """Create (or, with --resume, find) the run folder; write args.json.

    Returns (run folder, checkpoint dict or None). Never overwrites: a folder that holds
    anything but the args.json of a run that stopped before its first checkpoint is
    refused (pass --resume, or choose another --out); the default folder name is unique
    (created atomically, a suffix added when two runs start in the same second). --resume
    refuses a changed experiment flag (anything not in RESUME_MAY_CHANGE), naming it.
    """
    if args.resume and args.out is None:
        pattern = os.path.join("runs", f"{script}-{args.dataset}-s{args.seed}-*", CHECKPOINT)
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not found:
            raise UserError(f"--resume: no interrupted run matches {pattern}; pass --out")
        args.out = os.path.dirname(found[-1])
    if args.out is None:  # a new folder of its own, even for runs started in one second
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = os.path.join("runs", f"{script}-{args.dataset}-s{args.seed}-{stamp}")
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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    global RUN_FOLDER, RUN_SCRIPT
    RUN_FOLDER, RUN_SCRIPT = args.out, script
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise UserError(f"--resume: {ckpt_path} does not exist (nothing to resume)")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("script", script) != script:
            raise UserError(f"--resume: {args.out} is a run of {ckpt['script']}, not of "
                            f"{script}")
        for f in sorted(os.listdir(args.out)):  # left by a kill during a save: stale
            if f.endswith(".tmp"):
                os.remove(os.path.join(args.out, f))
                print(f"resume: removed {f}, a partial write of the interrupted run",
                      flush=True)
        old = ckpt.get("args", {})
        changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {getattr(args, k)!r}"
                   for k in old if k not in RESUME_MAY_CHANGE and hasattr(args, k)
                   and getattr(args, k) is not None and old[k] != getattr(args, k)]
        if changed:
            raise UserError(f"--resume: the run in {args.out} was made with other settings "
                            f"({'; '.join(changed)}); resume it with its own, or choose "
                            "another --out")
    elif os.path.exists(ckpt_path):
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it or "
                        "choose another --out")
    elif os.path.isdir(args.out) and set(os.listdir(args.out)) - {"args.json", LOCK}:
        files = sorted(set(os.listdir(args.out)) - {"args.json", LOCK})
        raise UserError(f"--out {args.out} is not empty ({len(files)} entries, e.g. "
                        f"{files[0]}); nothing is overwritten: choose another --out")
    try:
        os.makedirs(args.out, exist_ok=True)
        lock_run_folder(args.out)  # two runs never write into one folder at once
        save_json(os.path.join(args.out, "args.json"), vars(args))
    except OSError as err:  # read-only or full file system, a path through a file, ...
        raise UserError(f"--out {args.out}: cannot write there ({type(err).__name__}: "
                        f"{err.strerror or err})")
    return args.out, ckpt


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_metrics(out, method, args, tasks, R, evaluator_acc, device, seconds, **extra):
    """metrics.json with the field names every script shares (README, "What a run leaves
    behind"); R[t][i] in %, None for tasks not yet seen. Returns the dictionary."""
    metrics = {"method": method, "dataset": args.dataset,
               "classes": [c for task in tasks for c in task], "tasks": tasks,
               "acc_matrix": R, **acc_summary(R), "evaluator_test_acc": evaluator_acc,
               "device": str(device), "seconds": seconds, "args": vars(args), **extra}
    save_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(out, state):
    """state: models, optimisers, the task just finished, metrics so far, args, RNG; the
    script that wrote it is recorded (prepare_run refuses to resume another's)."""
    atomic_save(dict(state, rng=rng_state(), script=RUN_SCRIPT), os.path.join(out, CHECKPOINT))


def load_checkpoint(path, device="cpu"):
    """A checkpoint dictionary; a missing or unreadable file is one clear UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(ckpt, dict):
            raise ValueError("not a checkpoint dictionary")
        return ckpt
    except Exception as err:
        raise UserError(f"checkpoint {path} is corrupt or unreadable "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})")


def image_grid(x, nrow):
    """Float images in [-1, 1] (N x C x H x W) -> uint8 H x W x 3 array, nrow per row."""
    import torchvision.utils as vutils
    g = vutils.make_grid((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow,
                         padding=2, pad_value=1.0)
    return (g.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def class_grid(generate, all_classes, seen, z, path):
    """Sample grid with one row per class of the run, generated from the fixed noise z
    (one single-class batch per row); rows of classes not yet seen stay blank, so that
    every task's grid has the same size and they animate into a GIF. Returns the array."""
    rows = []
    for c in all_classes:
        if c in seen:
            y = torch.full((len(z),), c, dtype=torch.long, device=z.device)
            rows.append(generate(z, y).cpu())
        else:
            rows.append(None)
    shape = next(r for r in rows if r is not None).shape
    x = torch.cat([r if r is not None else torch.ones(shape) for r in rows])
    img = image_grid(x, nrow=len(z))
    imageio.imwrite(path, img)
    return img


def save_gif(frames, path, seconds_per_frame=0.8):
    """An animated GIF (looping) of equally sized uint8 frames, e.g. grids across tasks."""
    imageio.mimsave(path, frames, duration=1000 * seconds_per_frame, loop=0)


class Progress:
    """A progress line every `every` iterations: iteration, losses, it/s and ETA.

    `update(it, losses)` takes tensors and only reads them (one host sync) when a line is
    printed, so the inner loop stays free of `.item()` calls."""

    def __init__(self, total, every, prefix=""):
        self.total, self.every, self.prefix = total, max(1, every), prefix
        self.t0 = time.time()

    def update(self, it, losses):
        done = it + 1
        if done % self.every and done != self.total:
            return
        dt = time.time() - self.t0
        rate = done / max(dt, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        values = {k: float(v) for k, v in losses.items()}  # the one host sync
        parts = "  ".join(f"{k} {v:+.4f}" for k, v in values.items())
        print(f"{self.prefix}it {done:>6}/{self.total}  {parts}  {rate:6.2f} it/s  "
              f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}", flush=True)
        bad = [f"{k} = {v}" for k, v in values.items() if not math.isfinite(v)]
        if bad:  # checked where the values are read anyway: no extra sync in the loop
            raise Diverged(f"{self.prefix}training diverged by iteration {done}: "
                           f"{', '.join(bad)} (try a smaller --lr); nothing of this stage "
                           "was evaluated or saved, earlier checkpoints are unchanged")


def check_finite(module, where):
    """Diverged if any floating-point tensor of `module`'s state (parameters and buffers:
    BN statistics, EWC's Fisher) is NaN/Inf (one host sync; call it once per task, before
    evaluating or saving)."""
    ts = [v for v in module.state_dict().values()
          if torch.is_tensor(v) and v.is_floating_point()]
    if ts and not bool(torch.stack([torch.isfinite(v).all() for v in ts]).all()):
        raise Diverged(f"{where}: the weights hold NaN/Inf (try a smaller --lr); nothing of "
                       "it was evaluated or saved, earlier checkpoints are unchanged")


def setup(args, script, digits="pad"):
    """Everything a sequential script needs before its first task: device, seed, data on
    the device, tasks, run folder (or the checkpoint to resume) and the evaluator.
    `digits`: how 28x28 digits become 32x32 (load_dataset)."""
    device = pick_device(args.device)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.type == "cuda" else ""), flush=True)
    seed_everything(args.seed)
    size, download = args.image_size, not args.no_download
    x, y, names = load_dataset(args.dataset, args.data_root, True, size, download, digits)
    tx, ty, _ = load_dataset(args.dataset, args.data_root, False, size, download, digits)
    if len(names) < 2:  # an evaluator of one class would score 100% whatever G draws
        raise UserError(f"{args.dataset} in {args.data_root}: {len(names)} class found; the "
                        "class-incremental scripts need at least 2 (one sub-folder per class)")
    tasks = task_split(args.classes, len(names), args.classes_per_task)
    out, ckpt = prepare_run(args, script)
    print(f"{args.dataset}: {len(y)} train / {len(ty)} test images {tuple(x.shape[1:])}; "
          f"tasks {tasks}; run folder {out}", flush=True)
    train, test = TaskData(x, y, device), TaskData(tx, ty, device)
    evaluator, evaluator_acc = get_evaluator(args, train, test, len(names), device)
    return argparse.Namespace(device=device, train=train, test=test, tasks=tasks, out=out,
                              ckpt=ckpt, evaluator=evaluator, evaluator_acc=evaluator_acc,
                              n_classes=len(names), channels=x.shape[1],
                              image_size=x.shape[-1])


def generated_set_metrics(args, env, generate, classes, nz):
    """Metrics of a whole generated set, over every class in `classes`, with --eval-samples
    generated images per class (MeRGAN's Table 2 rows besides Acc):
    - rev_acc: a fresh classifier trained on the generated images (labels = the
      conditioning classes), tested on the real test images of those classes (%);
    - fd_evaluator: Frechet distance between evaluator features of generated and real test
      images (offline; the evaluator's feature layer stands in for Inception);
    - fid_inception (args.inception_fid): the same on torchvision's Inception-v3 features."""
    dev, n = env.device, args.eval_samples
    gen = torch.cat([generate_class(generate, c, n, nz, dev) for c in classes])
    width, steps = classifier_budget(args.dataset, len(gen))
    tx, _ = env.test.subset(classes)
    res = {"rev_acc": reverse_accuracy(generate, classes, n, nz, env.test, env.n_classes, dev,
                                       steps=steps, width=width, x=gen),
           "rev_acc_steps": steps,
           "fd_evaluator": frechet_distance(features(env.evaluator, gen),
                                            features(env.evaluator, tx))}
    if getattr(args, "inception_fid", False):
        net = inception_net(dev)
        res["fid_inception"] = frechet_distance(inception_features(net, gen),
                                                inception_features(net, tx))
    return res


class TaskRun:
    """The bookkeeping around a sequential script's task loop; the loop itself, and what is
    trained in it, stays in the script:

        run = C.TaskRun(args, env, "mergan-ra", {"G": G, "D": D}, generate=G)
        for t in run.remaining_tasks():  # 0..T-1, or after the last checkpoint (--resume)
            train_task(t, ...)           # the method
            run.end_task(t)              # Acc of every class seen so far, grid, checkpoint
        metrics = run.finish(paper)      # GIF, metrics.json, the table (None: --max-tasks)

    `models`: a dict of nn.Modules, saved in every checkpoint with every RNG state and
    restored here on --resume. `extra`: a dict of plain data the method fills in (e.g. its
    own metrics); it is checkpointed, restored on --resume and written into metrics.json."""

    def __init__(self, args, env, method, models, generate, nz=128, extra=None):
        self.args, self.env, self.method, self.models = args, env, method, models
        self.generate, self.nz = generate, nz
        self.extra = {} if extra is None else extra
        self.R, self.class_acc, self.seconds, self.start = [], {}, 0.0, 0
        self.metrics, self.fields = None, {}  # metrics.json, and fields added to it
        if env.ckpt is not None:
            for name, module in models.items():
                module.load_state_dict(env.ckpt["models"][name])
            self.extra.update(env.ckpt.get("extra", {}))
            self.R, self.class_acc = env.ckpt["R"], env.ckpt["class_acc"]
            self.seconds, self.start = env.ckpt["seconds"], env.ckpt["task"] + 1
            set_rng_state(env.ckpt["rng"])
            print(f"resuming after task {self.start}/{len(env.tasks)} from {env.out}",
                  flush=True)
        self.all_classes = [c for task in env.tasks for c in task]
        self.z_grid = torch.randn(10, nz, generator=torch.Generator().manual_seed(1234))
        self.z_grid = self.z_grid.to(env.device)
        T = len(env.tasks)
        self.stop = T if args.max_tasks is None else min(T, self.start + args.max_tasks)

    def remaining_tasks(self):
        """The tasks this call trains: from the first unfinished one to the last (or
        --max-tasks of them)."""
        for t in range(self.start, self.stop):
            self.t0 = time.time()
            yield t

    def end_task(self, t):
        """After task t: refuse NaN/Inf weights; the generated-sample accuracy of every class
        seen so far (row t of the accuracy matrix R); the sample grid; metrics.json; the
        checkpoint."""
        tasks, dev, args = self.env.tasks, self.env.device, self.args
        for name, module in self.models.items():  # never evaluate or save diverged weights
            check_finite(module, f"[task {t + 1}/{len(tasks)}] {name}")
        seen = [c for task in tasks[:t + 1] for c in task]
        acc = generated_accuracy(self.generate, self.env.evaluator, seen, args.eval_samples,
                                 self.nz, dev)
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
        """(Re)write metrics.json; `seconds` is added to the run's time, `fields` (e.g.
        end-of-run metrics) to the file. Returns the dictionary."""
        self.seconds += seconds
        self.fields.update(fields)
        self.metrics = write_metrics(self.env.out, self.method, self.args, self.env.tasks,
                                     self.R, self.env.evaluator_acc, self.env.device,
                                     self.seconds, class_acc=self.class_acc,
                                     **self.extra, **self.fields)
        return self.metrics

    def finish(self, paper=None):
        """After the loop: the GIF across tasks and the accuracy table (with the paper's
        average accuracy beside ours where `paper` = {task count: value} is given).
        Returns metrics.json's dictionary, or None if --max-tasks stopped the run early."""
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
        header = ["after task"] + [",".join(map(str, task)) for task in tasks] + ["avg"]
        rows = [[t + 1] + self.R[t] + [self.metrics["avg_acc"][t]] for t in range(len(tasks))]
        if paper:
            header.append("paper avg")
            for t, row in enumerate(rows):
                row.append(paper.get(t + 1))
        print(f"\n{self.method} on {args.dataset}: generated-sample accuracy (%) by the "
              f"evaluator (real test accuracy {self.env.evaluator_acc:.2f}%), "
              f"{args.eval_samples} samples/class")
        print(fmt_table(header, rows))
        m = self.metrics
        print(f"forgetting (avg) {m['avg_forgetting']:.2f}  BWT {m['bwt']:.2f}  "
              f"training+eval time {self.seconds:.0f}s  -> {out}/metrics.json", flush=True)
        return m

    def generated_set_report(self, paper=None):
        """After the last task: `generated_set_metrics` over every class (MeRGAN's Table 2
        rows: Rev acc, Frechet distances), added to metrics.json and printed beside `paper`
        = {"acc", "rev_acc", "fid"} if given. Returns metrics.json's dictionary."""
        t0, env = time.time(), self.env
        final = generated_set_metrics(self.args, env, self.generate, self.all_classes, self.nz)
        metrics = self.write_metrics(seconds=time.time() - t0, **final)
        paper = paper or {}
        rows = [["Acc (%)", metrics["avg_acc"][-1], paper.get("acc")],
                ["Rev acc (%)", final["rev_acc"], paper.get("rev_acc")],
                ["FD, evaluator features", final["fd_evaluator"], None]]
        if "fid_inception" in final:
            rows.append(["FID, Inception (torchvision)", final["fid_inception"], None])
        rows.append(["FID (paper, TF Inception)", None, paper.get("fid")])
        print(f"\nafter task {len(env.tasks)}, all {len(self.all_classes)} classes "
              f"({self.args.eval_samples} generated images per class):")
        print(fmt_table(["metric", "ours", "paper"], rows))
        return metrics


def fmt_table(header, rows):
    """A plain text table: header is a list of str, rows lists of str/float/None."""
    cells = [[("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
              for v in row] for row in [header] + rows]
    width = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, width)) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


# ------------------------------------------------------------------------------------------
# Stand-alone use: check a dataset and its evaluator
# ------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="Check a dataset: load (or generate) it, write a "
                                "grid of real images, train or load its cached evaluator "
                                "and print the evaluator's real test accuracy.")
    p.add_argument("--dataset", default="synth", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default="./data", help="where datasets are read/downloaded")
    p.add_argument("--no-download", action="store_true", help="never try the network")
    p.add_argument("--image-size", type=int, default=None, help="image side (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs", help="folder for the grid of real images")
    p.add_argument("--evaluator", default="ours", choices=["ours", "authors"],
                   help="ours, or MeRGAN's architecture (MLP for grey, 7-conv net for RGB)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    print(f"device: {device}")
    seed_everything(0)
    t0 = time.time()
    x, y, names = load_dataset(args.dataset, args.data_root, True, args.image_size,
                               not args.no_download)
    tx, ty, _ = load_dataset(args.dataset, args.data_root, False, args.image_size,
                             not args.no_download)
    n_classes = len(names)
    print(f"{args.dataset}: {len(y)} train / {len(ty)} test images of shape "
          f"{tuple(x.shape[1:])}, {n_classes} classes ({time.time() - t0:.1f}s)")
    train, test = TaskData(x, y, device), TaskData(tx, ty, device)
    os.makedirs(args.out, exist_ok=True)
    grid = torch.cat([to_float(x[y == c][:10]) for c in range(n_classes)])
    path = os.path.join(args.out, f"data-{args.dataset}.png")
    imageio.imwrite(path, image_grid(grid, nrow=10))
    print(f"wrote {path}")
    _, acc = get_evaluator(args, train, test, n_classes, device)
    print(f"evaluator real test accuracy: {acc:.2f}%")


if __name__ == "__main__":
    cli(main)
