#!/usr/bin/env bash
# One command on an NVIDIA GPU host:
#   bash scripts/gpu_check.sh            # demo model: every precision x every GPU path, tests, bench
#   GPU_7B=1 bash scripts/gpu_check.sh   # also Mistral-7B's real shapes (random init, fp16): engine + bench
# With internet it sets up .venv and installs TensorRT + onnxruntime-gpu into it. On a host without (GPU_ENV=system),
# it runs on the python found in PATH as it is: torch, transformers, onnx, onnxscript, gguf, onnxruntime-gpu and
# this package installed there already (pip install --no-deps ./dist/*.whl). Without TensorRT the engine rows are
# skipped with that reason and the onnxruntime CUDA rows still run. GPU_CALIB=0 leaves out the calibrated
# artifacts (int8-w8a8; int4-w4a16 is then round to nearest).
# Writes build/gpu-check/{gpu_check.md,json}, bench-demo/, bench-speculate/ and bench-7b/ (md, json, png).
# A step that fails is reported and the others still run; the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
FAILED=()
step() {  # step NAME COMMAND...: run, and on failure note it and go on
  local name=$1; shift
  echo "== $name"
  "$@" || { echo "== FAILED: $name (exit $?)"; FAILED+=("$name"); }
}
if [ "${GPU_ENV:-venv}" = system ]; then
  PY=${PY:-python3}
  CLI="$PY -m mistral_trt.main"
else
  PY=.venv/bin/python
  CLI=.venv/bin/mistral-trt
  make setup || exit 1
  # TensorRT and cuda-python as a pair built for the CUDA major this driver runs (r580+: CUDA 13, else 12), and
  # onnxruntime-gpu (CUDA and TensorRT execution providers) in place of the CPU onnxruntime, in .venv only
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
  CU=$([ "$DRIVER" -ge 580 ] && echo cu13 || echo cu12)
  $PY -m pip install -q -e ".[tensorrt-$CU]" || echo "note: TensorRT did not install; its rows will be skipped"
  $PY -m pip uninstall -y -q onnxruntime
  $PY -m pip install -q onnxruntime-gpu || exit 1
fi
TRT_LIBS=$($PY -c "import importlib.util, os; s = importlib.util.find_spec('tensorrt_libs'); print(os.path.dirname(s.origin) if s else '')")
export LD_LIBRARY_PATH="${TRT_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# (the runtime has onnxruntime-gpu preload CUDA and cuDNN from the nvidia-* wheels, torch's too, where needed)
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
HAVE_TRT=$($PY -c "import tensorrt; print(1)" 2>/dev/null || echo 0)
[ "$HAVE_TRT" = 1 ] || echo "note: tensorrt is not installed here: TensorRT engines and their rows are skipped"
# the fused graph needs onnxruntime >= 1.32 (GroupQueryAttention's query_seqlens); older ones get portable rows only
HAVE_FUSED=$($PY -c "import onnxruntime as o; from mistral_trt.runtime.ort import FUSED_MIN_ORT, ort_version as v
print(int(v(o.__version__) >= FUSED_MIN_ORT))")
[ "$HAVE_FUSED" = 1 ] || echo "note: this onnxruntime is older than the fused graph needs: fused rows are skipped"

DEMO=build/smollm2-135m-instruct
test -f $DEMO/config.json || step $DEMO $CLI convert-gguf -o $DEMO
mkdir -p $OUT
test -f $OUT/fp32/manifest.json || step fp32 $CLI export $DEMO -o $OUT/fp32
test -f $OUT/fp16/manifest.json || step fp16 $CLI quantize $OUT/fp32 --precision fp16 -o $OUT/fp16
test -f $OUT/int8-w8a16/manifest.json || step int8-w8a16 $CLI quantize $OUT/fp32 --precision int8-w8a16 -o $OUT/int8-w8a16
if [ "${GPU_CALIB:-1}" = 1 ]; then
  test -f $OUT/calib/manifest.json || step calib $CLI calibrate $OUT/fp32 -o $OUT/calib
  test -f $OUT/int8-w8a8/manifest.json || step int8-w8a8 $CLI quantize $OUT/fp32 --precision int8-w8a8 --calib $OUT/calib -o $OUT/int8-w8a8
  test -f $OUT/int4-w4a16/manifest.json || step int4-w4a16 $CLI export $DEMO -o $OUT/int4-w4a16 --precision int4-w4a16 --calib $OUT/calib \
    --int4-method awq-gptq  # auto would tune the demo end to end: 20 min of CPU
else
  test -f $OUT/int4-w4a16/manifest.json || step int4-w4a16 $CLI export $DEMO -o $OUT/int4-w4a16 --precision int4-w4a16
fi
# the fused graph (onnxruntime GroupQueryAttention, KV cache in place in device memory) on the CUDA provider: fp16,
# and int4 weights with fp16 activations (MatMulNBits; the CUDA provider's GroupQueryAttention takes fp16 only)
FUSED=""
if [ "$HAVE_FUSED" = 1 ]; then
  test -f $OUT/fused-fp16/manifest.json || step fused-fp16 $CLI export $DEMO -o $OUT/fused-fp16 --graph fused --dtype fp16 --provider cuda
  test -f $OUT/fused-int4-fp16/manifest.json || step fused-int4-fp16 $CLI export $DEMO -o $OUT/fused-int4-fp16 --graph fused \
    --dtype fp16 --precision int4
  FUSED="$OUT/fused-fp16 $OUT/fused-int4-fp16"
fi
# the engines are built for the largest batch the bench below runs (`bench` refuses a batch over --max-batch)
BATCH=1,4
MAX_BATCH=$(echo $BATCH | tr , '\n' | sort -n | tail -1)
ENGINES=""
if [ "$HAVE_TRT" = 1 ]; then
  for p in fp32 fp16 int8-w8a16 int8-w8a8 int4-w4a16; do
    test -f $OUT/$p/manifest.json || continue
    step engine-$p $CLI engine $OUT/$p -o $OUT/engine-$p --max-batch $MAX_BATCH --max-step-tokens 512 --max-context 4096 \
      --timing-cache $OUT/timing.cache --force && ENGINES="$ENGINES $OUT/engine-$p"
  done
fi
step gpu_check.py $PY scripts/gpu_check.py $OUT
[ "$HAVE_TRT" = 1 ] && step test_tensorrt $PY -m pytest -q tests/test_tensorrt.py

# data-sheet bandwidth of the card for the roofline (GB/s)
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) BW=4800 ;; *H100*PCIe*) BW=2000 ;; *H100*) BW=3350 ;; *A100*80GB*) BW=2039 ;; *A100*) BW=1555 ;; *L40S*) BW=864 ;; *) BW=0 ;;
esac
BWFLAG=$([ "$BW" != 0 ] && echo "--bandwidth $BW" || true)
TARGET=$([ "$HAVE_FUSED" = 1 ] && echo "--target ours:fused-int4-fp16:cuda/ours:fused-fp16:cuda>=1.0" || true)
step bench-demo $CLI bench $FUSED $ENGINES $OUT/fp16 --provider cuda --baseline hf \
  --prompt-len ${GPU_PROMPTS:-128,512,2048} --gen-len 128 --batch $BATCH --repeat ${GPU_REPEAT:-5} $BWFLAG $TARGET \
  -o $OUT/bench-demo
# prompt lookup on the GPU: a verify step of k + 1 tokens costs about one token's step there
[ "$HAVE_FUSED" = 1 ] && step bench-speculate $CLI bench-speculate $FUSED --provider cuda -o $OUT/bench-speculate

if [ "${GPU_7B:-0}" = 1 ]; then
  # Mistral-7B's shapes, random init: latency does not depend on weight values (issue 5, GPU readiness)
  test -f $OUT/ckpt-7b/config.json || step ckpt-7b $PY scripts/measure_export.py --make $OUT/ckpt-7b --layers 32 --dtype fp16
  SEVEN=""
  if [ "$HAVE_FUSED" = 1 ]; then
    test -f $OUT/7b-fused-fp16/manifest.json || step 7b-fused-fp16 $CLI export $OUT/ckpt-7b -o $OUT/7b-fused-fp16 \
      --graph fused --dtype fp16 --no-verify
    test -f $OUT/7b-fused-int4-fp16/manifest.json || step 7b-fused-int4-fp16 $CLI export $OUT/ckpt-7b \
      -o $OUT/7b-fused-int4-fp16 --graph fused --dtype fp16 --precision int4
    SEVEN="$OUT/7b-fused-fp16 $OUT/7b-fused-int4-fp16"
  fi
  # the portable fp16 runs on onnxruntime's CUDA provider with or without TensorRT (its cache in device memory)
  test -f $OUT/7b-fp16/manifest.json || step 7b-fp16 $CLI export $OUT/ckpt-7b -o $OUT/7b-fp16 --dtype fp16 --no-verify
  test -f $OUT/7b-fp16/manifest.json && SEVEN="$SEVEN $OUT/7b-fp16"
  if [ "$HAVE_TRT" = 1 ]; then
    step engine-7b-fp16 $CLI engine $OUT/7b-fp16 -o $OUT/engine-7b-fp16 --max-step-tokens 512 --max-context 4096 \
      --timing-cache $OUT/timing-7b.cache --force && SEVEN="$SEVEN $OUT/engine-7b-fp16"
  fi
  [ -n "$SEVEN" ] && step bench-7b $CLI bench $SEVEN --provider cuda --prompt-len ${GPU_PROMPTS:-128,512,2048} \
    --gen-len 128 --batch 1 --repeat 3 $BWFLAG -o $OUT/bench-7b
fi
echo "gpu check done: $OUT/gpu_check.md, $OUT/bench-demo/bench.md$([ "$HAVE_FUSED" = 1 ] && echo ", $OUT/bench-speculate/bench-speculate.md")"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed steps: ${FAILED[*]}"
  exit 1
fi
