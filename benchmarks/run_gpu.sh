#!/usr/bin/env bash
# The GPU check: build the extension, run the correctness table, the per-op table, the decode
# benchmark and the whole steps on CUDA tensors (world size 1, nccl; local vs stock vs dtdispatch).
# Run from the repository root on a machine with a GPU and torch installed:
#     bash benchmarks/run_gpu.sh OUTDIR
set -uo pipefail
OUT=${1:-benchmarks/results/cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
python3 setup.py -q build_ext --inplace 2>&1 | tail -5
python3 -c "import dtdispatch; print('native_status', dtdispatch.native_status())"
timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 1 launch/correctness.py > "$OUT/correctness.txt" 2>&1
echo "correctness rc=$?"
grep -E "FAIL|SUMMARY|telemetry" "$OUT/correctness.txt" | head -40
timeout 400 python3 benchmarks/dispatch_overhead.py --world-sizes 1 --reps 15 --out "$OUT" 2>&1 | grep -v "^\[ws\|^W" | tail -30
timeout 240 python3 benchmarks/decode.py --world-sizes 1 --rounds 5 --tokens 24 --out "$OUT" 2>&1 | tail -6
echo "decode rc=${PIPESTATUS[0]}"
timeout 600 python3 benchmarks/step.py --world-sizes 1 --rounds 7 --out "$OUT" 2>&1 | grep -v "^W" | tail -40
echo "step rc=${PIPESTATUS[0]}"
