"""Forward+backward of one nn.Linear at Llama-3-8B shapes (tokens 8192): bf16 Inductor, the
halo backend (fp8, no Hadamard, halo1, halo2, all_inner) and torchao float8 training (rowwise,
tensorwise), each also with CUDA graphs (the contenders named "... cudagraphs"), timed side by
side in one process.

    python benchmarks/linear.py [--tokens 8192] [--markdown out.md] [--contenders a,b]

The contenders are compiled first, then timed in rounds that take each in turn, twice: each
call synchronized (host time inside a call counts: the GPU idles while the host launches a
call's first kernels), and calls queued back to back (the GPU's throughput when the host keeps
ahead of it). Prints a table: median ms of forward+backward (grad-input and grad-weight) both
ways, TFLOP/s over the 6 * tokens * in * out flops of the three matmuls (synchronized),
speed-ups vs bf16 Inductor, and the output's relative error vs the bf16 result. Needs a CUDA
GPU.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
from _contenders import NAMES, compile_fn, parse_names
from _timing import (
    emit,
    host_ms,
    interleaved_median_ms,
    kernel_breakdown,
    markdown_table,
    python_profile,
    queued_gaps,
    speedup,
)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)


def _forward_backward(fn, x, grad, params):
    def step():
        # A new step for CUDA graph contenders: their graphs' previous outputs may be reused,
        # so no gradient is kept to accumulate into (as zero_grad(set_to_none=True) does).
        torch.compiler.cudagraph_mark_step_begin()
        fn(x).backward(grad)
        for p in params:
            p.grad = None
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=4, help="calls per contender and round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of timing, each taking every contender in turn")
    parser.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES),
                        help="in x out, comma separated")
    parser.add_argument("--contenders", default=",".join(NAMES))
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    parser.add_argument("--profile", default="",
                        help="contenders to profile (comma separated): per-kernel GPU times")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    names = parse_names(args.contenders)
    rows = []
    for shape in args.shapes.split(","):
        d_in, d_out = map(int, shape.split("x"))
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        grad = torch.randn(args.tokens, d_out, device="cuda", dtype=torch.bfloat16)
        reference = base(x).detach().float()
        flops = 6 * args.tokens * d_in * d_out
        steps, errors = {}, {}
        for name in names:
            fn, skipped = compile_fn(name, copy.deepcopy(base))
            if skipped:
                print(f"{shape} {name}: skipped ({skipped})", flush=True)
                rows.append((shape, name, "skipped", "-", "-", "-", "-", "-", skipped))
                continue
            out = fn(x).detach().float()
            errors[name] = ((out - reference).norm() / reference.norm()).item()
            steps[name] = _forward_backward(fn, x, grad, [x, *fn.parameters()])
            if name in args.profile.split(","):
                print(f"--- {shape} {name}: GPU kernels over 5 forward+backward ---")
                print(kernel_breakdown(steps[name], 5), flush=True)
                print(queued_gaps(steps[name], 16), flush=True)
                print(f"--- {shape} {name}: host Python over 20 queued calls ---")
                print(python_profile(steps[name], 20), flush=True)
        synced = interleaved_median_ms(steps, args.rounds, args.reps)
        # More calls per queue, so the first call's start (from an idle GPU) weighs little.
        queued = interleaved_median_ms(steps, args.rounds, 4 * args.reps, queued=True)
        host = host_ms(steps, args.rounds, 4 * args.reps)
        for name, ms in synced.items():
            rows.append((shape, name, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}",
                         speedup(synced, name), f"{queued[name]:.3f}", speedup(queued, name),
                         f"{host[name]:.3f}", f"{errors[name]:.2e}"))
            print(rows[-1], flush=True)
    emit(markdown_table(
        f"nn.Linear forward+backward, tokens {args.tokens}, bf16 (in x out)",
        ["in x out", "contender", "ms (synchronized calls)", "TFLOP/s", "x bf16 inductor",
         "ms (queued calls)", "x bf16 inductor (queued)", "host ms a call", "rel. err vs bf16"],
        rows),
        args.markdown)


if __name__ == "__main__":
    main()
