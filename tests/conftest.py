"""Shared fixtures: the offline synth data and its evaluator, trained once per session."""
import argparse

import pytest
import torch

import common as C


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
    x, y = C.make_synth(12, seed=5, color=True)
    root = tmp_path / "imgs"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i, img in enumerate(x[y == c]):
            imageio.imwrite(root / f"class{c}" / f"{i}.png", img.permute(1, 2, 0).numpy())
    return root
