"""The datasets made or read here rather than by torchvision: the offline `synth` digits
(`make_synth`) and a `folder` of your own images (`load_folder`). common.load_dataset
imports this module only when one of them is asked for; a mistake in the data is a
DataError, which common turns into its one-line UserError.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

FOLDER_LAYOUT = "one sub-folder of images per class, or train/ and test/ of them"


class DataError(ValueError):
    """Unreadable or ill-formed data: common.load_dataset reports it as a UserError."""


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


def open_rgb(path):
    """An image file as PIL RGB; an unreadable one is a DataError that names it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad image data
        raise DataError(f"cannot read image {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unreadable'}")


def load_folder(root, train, size):
    """torchvision's ImageFolder (a sub-folder per class) as uint8 tensors; train/ and test/
    are the splits (classes matched by name), else every 10th image of a class is held out."""
    from torchvision.datasets import ImageFolder
    import torchvision.transforms as T
    splits = [os.path.isdir(os.path.join(root, s)) for s in ("train", "test")]
    has_splits = all(splits)
    if any(splits) and not has_splits:
        raise DataError(f"folder {root} has {'train/' if splits[0] else 'test/'} but no "
                        f"{'test/' if splits[0] else 'train/'}: give both (the same class "
                        "sub-folders in each) or neither (every 10th image is held out)")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        ds = ImageFolder(os.path.join(root, "train" if train else "test") if has_splits
                         else root, transform=tf, loader=open_rgb)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"dataset 'folder' not found in {root} (expected "
                        f"{FOLDER_LAYOUT}): {str(err).splitlines()[0]}")
    if has_splits:
        other = os.path.join(root, "test" if train else "train")
        diff = sorted(set(ds.classes) ^ {d.name for d in os.scandir(other) if d.is_dir()})
        if diff:
            raise DataError(f"folder {root}: train/ and test/ must hold the same class "
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
