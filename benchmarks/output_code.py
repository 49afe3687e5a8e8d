"""What Inductor generates for one halo linear's forward and backward: the code itself and a
count of what it launches (Triton kernels by name, extern GEMM calls, calls back into Python
ops), so that the fusion claims in docs/ can be checked against the code.

    python benchmarks/output_code.py [--hadamard halo2] [--tokens 8192] [--out DIR]
                                     [--decoder-layer]

Writes DIR/output_code_<hadamard>.py (every graph Inductor compiled, forward then backward) and
prints, and with --markdown appends, the launch summary. --decoder-layer compiles one
Llama-3-8B-shaped decoder layer (transformers' LlamaDecoderLayer, SDPA) at --tokens tokens
instead of one linear; --hadamard bf16 compiles it with plain Inductor, for comparison.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import torch
from _timing import emit, markdown_table
from torch._inductor.utils import run_and_get_code

import halo_compile  # noqa: F401  (registers the ops; the backend is an entry point)


def launches(code: str) -> Counter:
    """Launches in Inductor's Python wrapper code: `<triton kernel>.run(`, extern kernels,
    and op calls (torch.ops.<namespace>.<op>), each counted once per call site."""
    counts = Counter()
    for name in re.findall(r"^\s+(\w+)\.run\(", code, flags=re.MULTILINE):
        counts[f"triton: {name}"] += 1
    for name in re.findall(r"extern_kernels\.(\w+)\(", code):
        counts[f"extern: {name}"] += 1
    for name in re.findall(r"torch\.ops\.(\w+\.\w+)(?:\.\w+)?\(", code):
        if not name.startswith("inductor."):  # allocation helpers, not work
            counts[f"op: {name}"] += 1
    return counts


def decoder_layer(tokens: int):
    """(a Llama-3-8B-shaped decoder layer, its keyword inputs for `tokens` tokens, a label)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=1, rope_theta=500000.0,
                         attn_implementation="sdpa", use_cache=False)
    layer = LlamaDecoderLayer(config, 0).to("cuda", torch.bfloat16)
    x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rotary = LlamaRotaryEmbedding(config).to("cuda")
    position_embeddings = rotary(x, torch.arange(tokens, device="cuda")[None])
    return layer, {"hidden_states": x, "position_embeddings": position_embeddings,
                   "attention_mask": None}, "a Llama-3-8B decoder layer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hadamard", default="halo2")
    parser.add_argument("--format", default="fp8_e4m3")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shape", default="4096x14336", help="in x out")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--markdown", help="append the summary to this file")
    parser.add_argument("--decoder-layer", action="store_true",
                        help="a Llama-3-8B decoder layer instead of one linear")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    options = {"format": args.format, "hadamard": args.hadamard}
    if args.decoder_layer:
        module, inputs, what = decoder_layer(args.tokens)
    else:
        fan_in, fan_out = map(int, args.shape.split("x"))
        module = torch.nn.Linear(fan_in, fan_out, bias=False, device="cuda",
                                 dtype=torch.bfloat16)
        inputs = {"input": torch.randn(args.tokens, fan_in, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True)}
        what = f"one linear {args.shape}"
    compiled = (torch.compile(module) if args.hadamard == "bf16"
                else torch.compile(module, backend="halo", options=options))

    def step():
        y = compiled(**inputs)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))

    _, codes = run_and_get_code(step)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"output_code_{'layer_' if args.decoder_layer else ''}{args.hadamard}.py"
    path.write_text("\n\n# ---- next graph ----\n\n".join(codes))
    rows = [(graph, what, n) for graph, code in zip(("forward", "backward"), codes, strict=False)
            for what, n in sorted(launches(code).items())]
    title = (f"Inductor output for {what}, tokens {args.tokens}, "
             f"{'bf16' if args.hadamard == 'bf16' else options} (code: {path.name})")
    emit(markdown_table(title, ("graph", "launch", "call sites"), rows), args.markdown)


if __name__ == "__main__":
    main()
