"""Every script end to end on a CUDA device, and the CUDA-graph loop against the eager loop.

Marked `cuda`; skipped where torch sees no CUDA device (the CPU machines of CI). Run on a
GPU machine with `python -m pytest -m cuda -v`.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device; torch sees none here")]

# Tiny budgets: 6 iterations = 3 eager warm-up iterations, the recording, and replays.
TINY = ["--dataset", "synth", "--classes", "0,1,2", "--iters", "6", "--eval-samples", "20",
        "--device", "cuda", "--log-every", "2"]


def run(script, args, data_root, out):
    cmd = [sys.executable, os.path.join(ROOT, script), *args, "--data-root", data_root,
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("script, extra", [
    ("mergan_jtr.py", ["--mode", "jtr", "--dim", "8"]),
    ("mergan_jtr.py", ["--mode", "sft", "--dim", "8"]),
    ("mergan_jtr.py", ["--mode", "cumulative", "--dim", "8"]),
    ("mergan_ra.py", ["--dim", "8"]),
    ("mergan_jtr.py", ["--mode", "ewc", "--dim", "8", "--fisher-samples", "8"]),
    ("dgm.py", ["--variant", "w"]),
    ("dgm.py", ["--variant", "a"]),
    ("dgr.py", ["--dim", "8"]),
    ("mergan_jtr.py", ["--mode", "jtr", "--dim", "8", "--no-cuda-graphs"]),
    ("dgm.py", ["--variant", "w", "--no-cuda-graphs"]),
])
def test_sequential_scripts_run_end_to_end_on_cuda(script, extra, data_root, tmp_path):
    out = run(script, TINY + extra, data_root, tmp_path / "run")
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["device"] == "cuda" and m["tasks_done"] == 3
    assert "it      6/6" in out
    assert all(0 <= v <= 100 for v in m["avg_acc"])


def test_fewshot_runs_end_to_end_on_cuda(data_root, tmp_path):
    run("ewc_fewshot.py", ["--source", "synth", "--target", "synth-amber", "--dim", "8",
                           "--source-iters", "6", "--iters", "6", "--shots", "4",
                           "--fisher-samples", "8", "--fd-samples", "40",
                           "--diversity-samples", "40", "--ewc-lambda", "0,1e5",
                           "--device", "cuda"], data_root, tmp_path / "run")
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["device"] == "cuda"


@pytest.mark.parametrize("script, extra", [
    ("mergan_jtr.py", ["--mode", "jtr", "--dim", "16"]),
    ("mergan_jtr.py", ["--mode", "jt", "--dim", "16"]),
    ("mergan_jtr.py", ["--mode", "cumulative", "--dim", "16"]),
    ("mergan_ra.py", ["--dim", "16"]),
    ("mergan_jtr.py", ["--mode", "ewc", "--dim", "16", "--fisher-samples", "8"]),
    ("dgm.py", ["--variant", "w"]),
    ("dgm.py", ["--variant", "a"]),
    ("dgr.py", ["--dim", "16"]),
])
def test_cuda_graph_loop_gives_the_eager_loops_numbers(script, extra, data_root, tmp_path):
    """Same seed, same data: 3 tasks of 12 iterations (3 eager warm-up iterations, then 9
    replays of the recorded iteration per task) with and without CUDA graphs. The weights
    must agree to float32 rounding; the graph changes launches, not arithmetic."""
    args = ["--dataset", "synth", "--classes", "0,1,2", "--iters", "12", "--eval-samples",
            "20", "--device", "cuda", *extra]
    ckpts = {}
    for mode in ("--cuda-graphs", "--no-cuda-graphs"):
        run(script, args + [mode], data_root, tmp_path / mode)
        ckpts[mode] = torch.load(tmp_path / mode / "checkpoint.pt", map_location="cpu",
                                 weights_only=False)["models"]
    worst = 0.0
    for net, state in ckpts["--cuda-graphs"].items():
        for k, v in state.items():
            if not torch.is_tensor(v) or not v.is_floating_point():
                continue
            ref = ckpts["--no-cuda-graphs"][net][k]
            rel = ((v - ref).norm() / ref.norm().clamp(min=1e-12)).item()
            worst = max(worst, rel)
    print(f"{script} {extra}: worst relative weight difference graph vs eager {worst:.3g}")
    assert worst < 1e-4, worst


def test_table_command_runs_every_column_at_once_on_cuda(data_root, tmp_path):
    out = tmp_path / "table"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "table1.py"), "--dataset",
           "synth", "--data-root", data_root, "--classes", "0,1", "--iters", "6",
           "--dgm-iters", "6", "--eval-samples", "20", "--device", "cuda",
           "--mergan-args", "--dim 8", "--ewc-args", "--fisher-samples 8", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "8 at a time" in res.stdout  # jt2 (classes 0,1 at once) and the seven others
    table = (out / "table1.md").read_text()
    for label in ("SFT", "EWC", "DGR", "MeRGAN-JTR", "MeRGAN-RA", "DGM-w", "DGM-a", "JT"):
        assert label in table
