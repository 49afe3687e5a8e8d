#!/usr/bin/env bash
# One device call: install the carried wheels (halo-compile's own wheel among them), run the
# GPU-marked tests and the benchmarks, and leave logs under $OUT.
#   here:   rm -f .whl/halo_compile-*.whl && pip wheel --no-deps -w .whl .
#   device: bash benchmarks/device_run.sh   (carry: .whl)
set -uo pipefail
OUT=${OUT:-/tmp/halo-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd /tmp  # import halo_compile from the installed wheel, not the checkout
REPO=$OLDPWD
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
timeout 240 python3 -m pytest -q -p no:cacheprovider "$REPO/tests" -m gpu -rs 2>&1 | tee "$OUT/gpu_tests.log"
cd "$REPO/benchmarks"  # the scripts import their shared helpers (_timing, _contenders) from here
run() { local name=$1 limit=$2; shift 2; timeout "$limit" python3 "$@" --markdown "$OUT/$name.md" 2>&1 | tee "$OUT/$name.log"; }
run linear 120 linear.py --reps 10 --shapes 4096x14336
run decoder_step 120 decoder_step.py --reps 5
run lora_finetune 100 lora_finetune.py --reps 5
run rotated_inference 100 rotated_inference.py
