"""benchmarks/gpu_check.sh kept in step with the code, without a GPU: the script parses,
its three pytest groups select every `cuda` test exactly once, and the flags it passes
exist."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def collect(k=None):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
           "-p", "no:cacheprovider", "tests/test_cuda.py"] + (["-k", k] if k else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    return {line for line in out.splitlines() if line.startswith("tests/test_cuda.py::")}


def test_gpu_check_parses_and_its_groups_cover_every_cuda_test_once():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    text = open(SCRIPT).read()
    groups = [collect(k) for k in re.findall(r'^G\d="(.*)"$', text, re.M)]
    everything = collect()
    assert len(groups) == 3 and len(everything) > 20
    assert sum(len(g) for g in groups) == len(everything)  # none twice ...
    assert set().union(*groups) == everything              # ... and none left out


def test_gpu_check_passes_flags_that_exist():
    text = open(SCRIPT).read()
    speed = subprocess.run([sys.executable, "benchmarks/gpu_speed.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    ra = subprocess.run([sys.executable, "mergan_ra.py", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120).stdout
    for flag in re.findall(r"gpu_speed\.py ([^\n]*)\\\n\s*([^\n]*)", text)[0]:
        for f in re.findall(r"--[a-z-]+", flag):
            assert f in speed, f
    for f in ("--cuda-graphs", "--resume", "--no-download", "--log-every", "--data-root"):
        assert f in text and f in ra, f
