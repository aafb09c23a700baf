#!/usr/bin/env bash
# The GPU evidence in ONE call of at most 9 minutes, on any machine with a CUDA device:
#   mkdir -p data/mnist5k && cp <your MNIST *-ubyte.gz files, or a subset> data/mnist5k/
#   OUT=gpu-check bash benchmarks/gpu_check.sh        # results and logs in $OUT
# It uses the python3 on the PATH (a CUDA build of torch; requirements.txt names the tested
# builds; Adam is torch's own, capturable on CUDA) and no package registry.
# data/ is git-ignored: a runner that copies the working tree must be told to take
# data/mnist5k along (else ra10 is skipped, and says so). Parts, most valuable first, each
# with its own time limit and log in $OUT, written as it goes, so a part cut short keeps
# what it did:
#   env        GPU, driver, torch, cuDNN; stops here if CUDA is unusable
#   pytest     tests/test_cuda.py: every script end to end on CUDA (a graph recorded where
#              asked for), graph vs eager under deterministic kernels beside an eager-vs-
#              eager control, the evaluator leaving CUDA's random stream as found
#   gpu_speed  ms per iteration, eager and graphed, JTR, RA, EWC, DGM-w, DGM-a at tasks 1
#              and 10, once the two loops' losses agree
#   ra10       MeRGAN-RA on data/mnist5k at the authors' schedule (10 tasks x 4001
#              iterations, 6,400 samples per class) with --cuda-graphs, as many tasks as
#              the time left allows (each finished task is in ra10_metrics.json); if
#              recording fails, the same run goes on eagerly (--resume keeps finished tasks)
# The last lines summarise every part (docs/results.md, "GPU check", says what to record).
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
O=${OUT:-gpu-check}; T=$(mktemp -d); mkdir -p "$O"; S=$O/summary.txt; : >"$S"
START=$SECONDS
part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to $O/NAME.log
  local n=$1 l=$2 t0=$SECONDS; shift 2
  timeout -k 5 "$l" "$@" >"$O/$n.log" 2>&1
  echo "$n rc=$? limit ${l}s took $((SECONDS - t0))s" | tee -a "$S"
}
left() { echo $((530 - (SECONDS - START))); }  # seconds left of the 9 minutes

# env: stop at once if CUDA is unusable (the cuda tests would only be skipped)
{ git log -1 --format="commit %h %cd" 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import torch as t, torchvision as v; print('torch', t.__version__, 'cuda',
t.version.cuda, 'cudnn', t.backends.cudnn.version(), 'torchvision', v.__version__,
'available', t.cuda.is_available(), t.cuda.get_device_name(0) if t.cuda.is_available() else '')"
} >"$O/env.txt" 2>&1
cat "$O/env.txt"
grep -q "available True" "$O/env.txt" || { echo "CUDA unusable: see $O/env.txt"; exit 3; }

# pytest: three groups at once (a GPU runs several tiny runs side by side), -v logs
G1="end_to_end or default or evaluator or fewshot or table"
G2="graph_loop and mergan_jtr"
G3="graph_loop and not mergan_jtr"
t0=$SECONDS; i=0
for k in "$G1" "$G2" "$G3"; do i=$((i + 1))
  timeout -k 5 240 python3 -m pytest -m cuda tests/test_cuda.py -k "$k" -v -rA \
    -p no:cacheprovider --durations=5 >"$O/pytest$i.log" 2>&1 &
done; wait
for i in 1 2 3; do
  echo "pytest$i: $(grep -E "[0-9]+ (passed|failed|error|skipped)" "$O/pytest$i.log" | tail -1)"
done | tee -a "$S"; echo "pytest took $((SECONDS - t0))s (limit 240s)" | tee -a "$S"
cat "$O"/pytest[123].log >"$O/pytest.log"

# gpu_speed
L=$(left); [ "$L" -gt 110 ] && L=110
[ "$L" -gt 30 ] && part gpu_speed "$L" python3 benchmarks/gpu_speed.py --iters 150 \
  --warm-iters 20

# ra10: the MNIST files from data/mnist5k, unpacked where torchvision looks for them
R=$T/mnist/MNIST/raw; mkdir -p "$R"
for f in data/mnist5k/*.gz; do [ -f "$f" ] && zcat "$f" >"$R/$(basename "$f" .gz)"; done
cat >"$T/ra.sh" <<SH
A="--dataset mnist --data-root $T/mnist --no-download --device cuda --log-every 1000"
python3 mergan_ra.py \$A --out $T/ra10 --cuda-graphs && exit 0
echo "== graphed RA failed: the same run goes on eagerly"
python3 mergan_ra.py \$A --out $T/ra10 --resume
SH
L=$(left)
if ls "$R"/*ubyte >/dev/null 2>&1 && [ "$L" -gt 40 ]; then part ra10 "$L" bash "$T/ra.sh"
else echo "ra10 skipped: no data/mnist5k/*.gz or no time left" | tee -a "$S"; fi
cp "$T/ra10/metrics.json" "$O/ra10_metrics.json" 2>/dev/null

echo "==== summary ($((SECONDS - START)) s)"; cat "$S"
grep -E "^(FAILED|ERROR)" "$O/pytest.log" | head -12
grep -E "worst relative weight difference" "$O/pytest.log" | head -8
tail -13 "$O/gpu_speed.log" 2>/dev/null
grep -E "CUDA graph recorded|^\[task [0-9]+/10\] (Acc|it +4000/)|forgetting|failed" \
  "$O/ra10.log" 2>/dev/null | tail -8
