#!/usr/bin/env bash
# One command on an NVIDIA GPU host (driver + internet for the TensorRT wheels):
#   bash scripts/gpu_check.sh            # demo model: every precision x every GPU path, tests, bench
#   GPU_7B=1 bash scripts/gpu_check.sh   # also Mistral-7B's real shapes (random init, fp16): engine + bench
# Writes build/gpu-check/{gpu_check.md,json}, bench-demo/ and bench-7b/ (md, json, png).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
PY=.venv/bin/python
CLI=.venv/bin/mistral-trt

make setup
# TensorRT (tensorrt + cuda-python) and onnxruntime-gpu (CUDA and TensorRT execution providers) replace
# the CPU onnxruntime in this environment only; see README, TensorRT.
# TensorRT and cuda-python as a pair built for the CUDA major this driver runs (r580+: CUDA 13, else 12)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
CU=$([ "$DRIVER" -ge 580 ] && echo cu13 || echo cu12)
$PY -m pip install -q -e ".[tensorrt-$CU]"
$PY -m pip uninstall -y -q onnxruntime
$PY -m pip install -q onnxruntime-gpu
TRT_LIBS=$($PY -c "import importlib.util, os; s = importlib.util.find_spec('tensorrt_libs'); print(os.path.dirname(s.origin) if s else '')")
export LD_LIBRARY_PATH="${TRT_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import tensorrt, onnxruntime as o; print('tensorrt', tensorrt.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"

DEMO=build/smollm2-135m-instruct
test -f $DEMO/config.json || $CLI convert-gguf -o $DEMO
mkdir -p $OUT
test -f $OUT/fp32/manifest.json || $CLI export $DEMO -o $OUT/fp32
test -f $OUT/fp16/manifest.json || $CLI quantize $OUT/fp32 --precision fp16 -o $OUT/fp16
test -f $OUT/int8-w8a16/manifest.json || $CLI quantize $OUT/fp32 --precision int8-w8a16 -o $OUT/int8-w8a16
test -f $OUT/calib/manifest.json || $CLI calibrate $OUT/fp32 -o $OUT/calib
test -f $OUT/int8-w8a8/manifest.json || $CLI quantize $OUT/fp32 --precision int8-w8a8 --calib $OUT/calib -o $OUT/int8-w8a8
test -f $OUT/int4-w4a16/manifest.json || $CLI export $DEMO -o $OUT/int4-w4a16 --precision int4-w4a16 --calib $OUT/calib
# the engines are built for the largest batch the bench below runs (`bench` refuses a batch over --max-batch)
BATCH=1,4
MAX_BATCH=$(echo $BATCH | tr , '\n' | sort -n | tail -1)
for p in fp32 fp16 int8-w8a16 int8-w8a8 int4-w4a16; do
  $CLI engine $OUT/$p -o $OUT/engine-$p --max-batch $MAX_BATCH --max-seq 512 --max-total 4096 \
    --timing-cache $OUT/timing.cache --force
done
$PY scripts/gpu_check.py $OUT
$PY -m pytest -q tests/test_engine.py

# data-sheet bandwidth of the card for the roofline (GB/s)
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) BW=4800 ;; *H100*PCIe*) BW=2000 ;; *H100*) BW=3350 ;; *A100*80GB*) BW=2039 ;; *A100*) BW=1555 ;; *L40S*) BW=864 ;; *) BW=0 ;;
esac
BWFLAG=$([ "$BW" != 0 ] && echo "--bandwidth $BW" || true)
# the fused graph (onnxruntime GroupQueryAttention, KV cache in place in device memory) on the CUDA provider
test -f $OUT/fused-fp16/manifest.json || $CLI export $DEMO -o $OUT/fused-fp16 --graph fused --dtype fp16 --provider cuda
$CLI bench $OUT/engine-fp16 $OUT/engine-int8-w8a16 $OUT/engine-int4-w4a16 $OUT/fp16 $OUT/fused-fp16 --provider cuda --prompt-len 128,512,2048 \
  --gen-len 128 --batch $BATCH --repeat 5 $BWFLAG -o $OUT/bench-demo

if [ "${GPU_7B:-0}" = 1 ]; then
  # Mistral-7B's shapes, random init: latency does not depend on weight values (issue 5, GPU readiness)
  test -f $OUT/ckpt-7b/config.json || $PY scripts/measure_export.py --make $OUT/ckpt-7b --layers 32 --dtype fp16
  test -f $OUT/7b-fp16/manifest.json || $CLI export $OUT/ckpt-7b -o $OUT/7b-fp16 --dtype fp16 --no-verify
  $CLI engine $OUT/7b-fp16 -o $OUT/engine-7b-fp16 --max-seq 512 --max-total 4096 --timing-cache $OUT/timing-7b.cache --force
  test -f $OUT/7b-fused-fp16/manifest.json || $CLI export $OUT/ckpt-7b -o $OUT/7b-fused-fp16 --graph fused --dtype fp16 --no-verify
  $CLI bench $OUT/engine-7b-fp16 $OUT/7b-fp16 $OUT/7b-fused-fp16 --provider cuda --prompt-len 128,512,2048 --gen-len 128 \
    --batch 1 --repeat 3 $BWFLAG -o $OUT/bench-7b
fi
echo "gpu check done: $OUT/gpu_check.md $OUT/bench-demo/bench.md"
