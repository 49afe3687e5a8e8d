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
python3 -m pytest -q -p no:cacheprovider "$REPO/tests" -m gpu -rs 2>&1 | tee "$OUT/gpu_tests.log"
python3 "$REPO/benchmarks/mlp_block.py" --markdown "$OUT/mlp_block.md" 2>&1 | tee "$OUT/mlp_block.log"
cd "$REPO/benchmarks"  # the scripts import their shared helpers (_timing, _contenders) from here
python3 hadamard_quantize.py --markdown "$OUT/hadamard_quantize.md" 2>&1 | tee "$OUT/hadamard_quantize.log"
python3 linear.py --markdown "$OUT/linear.md" 2>&1 | tee "$OUT/linear.log"
python3 decoder_step.py --markdown "$OUT/decoder_step.md" 2>&1 | tee "$OUT/decoder_step.log"
