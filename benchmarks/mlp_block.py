"""Forward+backward of one Llama-3-8B-shaped MLP block (tokens 8192, 4096 -> 14336 -> 4096):
bf16 Inductor vs the halo backend's variants, timed side by side in one process.

    python benchmarks/mlp_block.py [--tokens 8192] [--markdown out.md]

Prints a table (median ms per forward+backward, speed-up vs bf16, peak memory, and the output's
relative error vs bf16). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from _timing import emit, markdown_table, time_fwd_bwd

import halo_compile  # noqa: F401  (the backend is found by entry point; this gives report())


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


VARIANTS = {
    "bf16 inductor": None,
    "halo fp8, no Hadamard": {"format": "fp8_e4m3", "hadamard": "none"},
    "halo fp8, halo1": {"format": "fp8_e4m3", "hadamard": "halo1"},
    "halo fp8, halo2": {"format": "fp8_e4m3", "hadamard": "halo2"},
    "halo fp8, all_inner": {"format": "fp8_e4m3", "hadamard": "all_inner"},
    "halo int8, halo2": {"format": "int8", "hadamard": "halo2"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="';'-separated names from: " + "; ".join(VARIANTS))
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"

    torch.manual_seed(0)
    base = LlamaMLP(args.hidden, args.intermediate).to("cuda", torch.bfloat16)
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    grad = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    reference = base(x).detach().float()
    rows = []
    for name in args.variants.split(";"):
        options = VARIANTS[name]
        torch._dynamo.reset()
        model = LlamaMLP(args.hidden, args.intermediate).to("cuda", torch.bfloat16)
        model.load_state_dict(base.state_dict())
        if options is None:
            compiled = torch.compile(model)
        else:
            compiled = torch.compile(model, backend="halo", options=options)
        out = compiled(x).detach().float()
        rel_err = ((out - reference).norm() / reference.norm()).item()
        torch.cuda.reset_peak_memory_stats()
        ms = time_fwd_bwd(compiled, x, grad, args.reps)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        rows.append((name, ms, peak_gib, rel_err))
        print(f"{name:24s} {ms:8.2f} ms  peak {peak_gib:6.2f} GiB  rel.err vs bf16 {rel_err:.2e}",
              flush=True)

    bf16_ms = next((ms for name, ms, _, _ in rows if name == "bf16 inductor"), None)
    title = (f"MLP block fwd+bwd, tokens {args.tokens}, {args.hidden} -> {args.intermediate} -> "
             f"{args.hidden}, bf16 weights/activations")
    emit(markdown_table(
        title, ["variant", "ms (median)", "x bf16 inductor", "peak GiB", "rel. err vs bf16"],
        [(name, f"{ms:.2f}", f"{bf16_ms / ms:.2f}x" if bf16_ms else "-", f"{peak:.2f}",
          f"{err:.2e}") for name, ms, peak, err in rows]), args.markdown)


if __name__ == "__main__":
    main()
