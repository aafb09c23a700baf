"""Shared fixtures: the offline synth data and its evaluator, trained once per session."""
import argparse

import pytest
import torch

import common as C
import local_data as LD
import mergan_lsun as L


@pytest.fixture(scope="session")
def synth_eval(tmp_path_factory):
    """(args, evaluator, its real test accuracy, train TaskData, test TaskData); the
    evaluator is cached in a temporary data root that the script tests re-use."""
    root = str(tmp_path_factory.mktemp("data"))
    args = argparse.Namespace(dataset="synth", data_root=root)
    dev = torch.device("cpu")
    x, y, _ = C.load_dataset("synth", train=True)
    tx, ty, _ = C.load_dataset("synth", train=False)
    train, test = C.TaskData(x, y, dev), C.TaskData(tx, ty, dev)
    model, acc = C.get_evaluator(args, train, test, 10, dev, log=lambda *a: None)
    return args, model, acc, train, test


@pytest.fixture(scope="session")
def data_root(synth_eval):
    """A data root whose synth evaluator is already cached."""
    return synth_eval[0].data_root


@pytest.fixture
def image_folder(tmp_path):
    """A `folder` dataset: 3 class sub-folders of 12 synth-color PNGs each; returns its path."""
    import imageio.v2 as imageio
    x, y = LD.make_synth(12, seed=5, color=True)
    root = tmp_path / "imgs"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i, img in enumerate(x[y == c]):
            imageio.imwrite(root / f"class{c}" / f"{i}.png", img.permute(1, 2, 0).numpy())
    return root


@pytest.fixture
def lsun_root(tmp_path):
    """LSUN's lmdb layout in miniature: <category>_train_lmdb (6 images each) and
    <category>_val_lmdb (3 each) for the four Table 2 categories, JPEG/PNG-encoded values
    under arbitrary keys, as LSUN's download.py writes them. Each category gets its own
    colour. Returns the root (str)."""
    lmdb = pytest.importorskip("lmdb", reason="the lsun loader reads lmdb databases; "
                               "lmdb is in requirements.txt")
    import io
    from PIL import Image
    x, _ = LD.make_synth(9, seed=7, color=True)
    for c, cat in enumerate(L.LSUN_CATEGORIES):
        for split, n in (("train", 6), ("val", 3)):
            db = lmdb.open(str(tmp_path / f"{cat}_{split}_lmdb"), map_size=1 << 24)
            with db.begin(write=True) as txn:
                for i in range(n):
                    img = x[c * 9 + i].permute(1, 2, 0).numpy().copy()
                    img[..., c % 3] = 255  # a colour cast per category
                    buf = io.BytesIO()
                    Image.fromarray(img).resize((48, 40)).save(buf, "PNG" if i % 2 else "JPEG")
                    txn.put(f"{cat}-{i:04d}".encode(), buf.getvalue())
            db.close()
    return str(tmp_path)
