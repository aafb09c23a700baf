"""Every script end to end on a CUDA device, and the CUDA-graph loop against the eager loop.

Marked `cuda`; skipped where torch sees no CUDA device (the CPU machines of CI). Run on a
GPU machine with `python -m pytest -m cuda -v`.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device; torch sees none here")]

# Tiny budgets: 6 iterations = 3 eager warm-up iterations, the recording, and replays.
TINY = ["--dataset", "synth", "--classes", "0,1,2", "--iters", "6", "--eval-samples", "20",
        "--device", "cuda", "--log-every", "2"]
RECORDED = "CUDA graph recorded"  # GraphedStep's line, once per task when a graph is made
# Deterministic kernels (cuDNN, cuBLAS, index_put's accumulation), so that two runs of the
# same loop agree bit for bit and a difference means the loops differ.
DETERMINISTIC = ("import runpy, sys, torch; torch.backends.cudnn.benchmark = False; "
                 "torch.backends.cudnn.deterministic = True; "
                 "torch.use_deterministic_algorithms(True, warn_only=True); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run(script, args, data_root, out, deterministic=False):
    cmd = [sys.executable, os.path.join(ROOT, script), *args, "--data-root", data_root,
           "--out", str(out)]
    env = dict(os.environ)
    if deterministic:
        cmd[1:1] = ["-c", DETERMINISTIC]
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout + res.stderr  # stderr: e.g. the warnings of an op without a
    # deterministic implementation, which a failed comparison then shows


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
    graphs = "--no-cuda-graphs" not in extra
    out = run(script, TINY + extra + (["--cuda-graphs"] if graphs else []), data_root,
              tmp_path / "run")
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["device"] == "cuda" and m["tasks_done"] == 3
    assert "it      6/6" in out
    assert all(0 <= v <= 100 for v in m["avg_acc"])
    # a graph was recorded, once per task, where asked for: else this compared eager runs
    assert out.count(RECORDED) == (3 if graphs else 0), out[-3000:]


def test_eager_loop_is_the_default_on_cuda(data_root, tmp_path):
    out = run("mergan_ra.py", TINY + ["--dim", "8"], data_root, tmp_path / "run")
    assert RECORDED not in out


def test_training_the_evaluator_leaves_cudas_random_stream_as_found():
    # torch.manual_seed inside train_classifier reseeds every CUDA generator: the fork
    # around it must restore them, or a run's noise follows the evaluator's seed on a GPU
    x = torch.rand(16, 1, 8, 8, device="cuda") * 2 - 1
    y = torch.arange(16, device="cuda") % 2
    torch.cuda.manual_seed(5)
    want = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(5)
    C.train_classifier(x, y, 2, torch.device("cuda"), steps=2, width=4, batch=8, seed=123)
    assert torch.equal(torch.rand(4, device="cuda"), want)


def test_fewshot_runs_end_to_end_on_cuda(data_root, tmp_path):
    run("ewc_fewshot.py", ["--source", "synth", "--target", "synth-amber", "--dim", "8",
                           "--source-iters", "6", "--iters", "6", "--shots", "4",
                           "--fisher-samples", "8", "--fd-samples", "40",
                           "--diversity-samples", "40", "--ewc-lambda", "0,1e5",
                           "--device", "cuda"], data_root, tmp_path / "run")
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["device"] == "cuda"


def loss_lines(out):
    """The progress lines' losses, per task and iteration (it/s and ETA dropped)."""
    return [re.sub(r"\s+[\d.]+ it/s.*", "", line.strip()) for line in out.splitlines()
            if " it/s" in line]


def weight_difference(a, b):
    """Worst relative difference over the floating-point tensors of two checkpoints'
    models, after checking that they hold the same tensors of the same shapes (a DGM mask
    that flipped would change a layer's size)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for net in a:
        assert a[net].keys() == b[net].keys(), net
        for k, v in a[net].items():
            if torch.is_tensor(v) and v.is_floating_point():
                ref = b[net][k]
                assert v.shape == ref.shape, (net, k, v.shape, ref.shape)
                worst = max(worst, ((v - ref).norm() / ref.norm().clamp(min=1e-12)).item())
    return worst


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
    """Same seed, same data, deterministic kernels: 3 tasks (jt: 1) of 12 iterations (3
    eager warm-up iterations, then 9 replays of the recorded iteration per task), twice
    eagerly (the control: must agree bit for bit) and once graphed. The graphed loop's losses,
    iteration by iteration from the first replay on, and its final weights must be the
    eager loop's: the graph changes launches, not arithmetic."""
    args = ["--dataset", "synth", "--classes", "0,1,2", "--iters", "12", "--eval-samples",
            "20", "--device", "cuda", "--log-every", "1", *extra]
    outs, models = {}, {}
    for name, mode in (("eager", "--no-cuda-graphs"), ("control", "--no-cuda-graphs"),
                       ("graph", "--cuda-graphs")):
        outs[name] = run(script, args + [mode], data_root, tmp_path / name, deterministic=True)
        models[name] = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu",
                                  weights_only=False)["models"]
    warnings = [w for w in outs["control"].splitlines() if "Warning" in w]
    assert loss_lines(outs["eager"]) == loss_lines(outs["control"]), warnings
    assert weight_difference(models["eager"], models["control"]) == 0.0, warnings
    eager, graph = loss_lines(outs["eager"]), loss_lines(outs["graph"])
    assert len(eager) == len(graph) > 0  # 12 lines per task (jt: 1 task, else 3)
    assert outs["graph"].count(RECORDED) == len(eager) // 12  # one recording per task
    for a, b in zip(eager, graph):  # the first replayed iteration is each task's 4th
        va, vb = (re.findall(r"[-+]\d+\.\d+", line) for line in (a, b))
        assert a.split()[:4] == b.split()[:4] and len(va) == len(vb) > 0, (a, b)
        assert all(abs(float(u) - float(v)) <= 1e-4 + 1e-4 * abs(float(u))  # 4 decimals
                   for u, v in zip(va, vb)), f"graph vs eager differ:\n  {a}\n  {b}"
    worst = weight_difference(models["graph"], models["eager"])
    print(f"{script} {extra}: worst relative weight difference graph vs eager {worst:.3g}")
    assert worst < 1e-5, worst


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
