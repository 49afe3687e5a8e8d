"""What Inductor generates for one halo linear's forward and backward: the code itself and a
count of what it launches (Triton kernels by name, extern GEMM calls, calls back into Python
ops), so that the fusion claims in docs/ can be checked against the code.

    python benchmarks/output_code.py [--hadamard halo2] [--tokens 8192] [--out DIR]

Writes DIR/output_code_<hadamard>.py (every graph Inductor compiled, forward then backward) and
prints, and with --markdown appends, the launch summary. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

import halo_compile  # noqa: F401  (registers the ops; the backend is an entry point)
from _timing import emit, markdown_table


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hadamard", default="halo2")
    parser.add_argument("--format", default="fp8_e4m3")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shape", default="4096x14336", help="in x out")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--markdown", help="append the summary to this file")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    fan_in, fan_out = map(int, args.shape.split("x"))
    linear = torch.nn.Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(args.tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    options = {"format": args.format, "hadamard": args.hadamard}
    compiled = torch.compile(linear, backend="halo", options=options)

    def step():
        y = compiled(x)
        y.backward(torch.ones_like(y))

    _, codes = run_and_get_code(step)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"output_code_{args.hadamard}.py"
    path.write_text("\n\n# ---- next graph ----\n\n".join(codes))
    rows = [(graph, what, n) for graph, code in zip(("forward", "backward"), codes)
            for what, n in sorted(launches(code).items())]
    title = (f"Inductor output for one linear {args.shape}, tokens {args.tokens}, {options} "
             f"(code: {path.name})")
    emit(markdown_table(title, ("graph", "launch", "call sites"), rows), args.markdown)


if __name__ == "__main__":
    main()
