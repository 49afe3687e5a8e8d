"""What the Hadamard+quantize kernels compile to for an H100 (sm_90), on any machine, no GPU:
shared memory per program (which caps the programs, hence warps, an SM can hold), registers per
thread, the SASS instructions of each loop body (one iteration, per thread: what an
instruction-bound variant spends per tile), local-memory (spilled register) loads and stores,
layout conversions, tensor-core instructions, and the width of global loads and stores, for each
layout the three matmuls of a linear need, at the launch configuration the op uses, rounding to
nearest or (--rounding stochastic) stochastically. Registers and SASS come from the nvdisasm
and cuobjdump that Triton ships ("-" where they are missing).

    python benchmarks/kernel_resources.py [--tokens 8192] [--features 14336]
        [--rounding stochastic]

The launch is the op's own (`_hadamard_quantize_impl` with a recording stand-in for the kernels),
so the constexprs and configurations are those a real call uses; integer arguments are
specialised as Triton's launcher does (1 as a constant, multiples of 16 as divisible by 16).
A static view to direct device time, not a measurement: the GPU's Triton version may compile
differently (this machine's is printed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from halo_compile.kernels.hadamard_quantize_launch import LaunchOverrides
from halo_compile.kernels.triton_hadamard_quantize import _JITTED, _hadamard_quantize_impl

SM90 = GPUTarget("cuda", 90, 32)
SHARED_PER_SM = 228 * 1024  # H100
REGISTERS_PER_SM = 64 * 1024
_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float8_e4m3fn: "*fp8e4nv",
                  torch.int8: "*i8", torch.int64: "*i64"}


class _Recorder:
    """Stands in for the op's `launchable`: `recorder(kernel_fn)[grid](*args, **kwargs)` records
    each launch."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel_fn):
        jitted = _JITTED[kernel_fn]

        class _Launch:
            def __getitem__(_, grid):
                return lambda *args, **kwargs: self.launches.append((jitted, grid, args, kwargs))

        return _Launch()


def _compile(kernel, args, kwargs):
    names = list(kernel.arg_names)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages", 3)}
    for name, value in kwargs.items():
        signature[name], constexprs[name] = "constexpr", value
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=SM90, options=options)


def _widths(ptx: str, op: str) -> str:
    """The global loads or stores (`op`: ld / st) by vector width, e.g. "v4.b32 x2"."""
    vectors = Counter(re.findall(rf"{op}\.global[\w.:]*?\.(v\d\.b\d+|b\d+)\b", ptx))
    return ", ".join(f"{k} x{v}" for k, v in sorted(vectors.items())) or "-"


def _tool(name: str):
    """Triton's bundled binary `name` (nvdisasm, cuobjdump), or None."""
    knob = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), name, None)
    bundled = Path(triton.__file__).parent / "backends/nvidia/bin" / name
    path = getattr(knob, "path", None) or bundled
    return str(path) if Path(path).exists() else None


def _sass(cubin: bytes) -> tuple[int, str, str]:
    """(registers per thread or 0, instructions of each loop body, local loads + stores) of a
    compiled kernel. A loop body runs from a label to the branch that jumps back to it."""
    nvdisasm, cuobjdump = _tool("nvdisasm"), _tool("cuobjdump")
    if not nvdisasm or not cuobjdump:
        return 0, "-", "-"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    labels, addresses, loops = {}, [], []
    pending = None
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L\w+):", line)
        instruction = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*)", line)
        if label:
            pending = label.group(1)
        elif instruction:
            address = int(instruction.group(1), 16)
            addresses.append(address)
            if pending:
                labels[pending], pending = address, None
            target = re.search(r"\bBRA\b.*?\.(L\w+)", instruction.group(2))
            if target and labels.get(target.group(1), address + 1) < address:
                start = labels[target.group(1)]
                loops.append(sum(start <= a <= address for a in addresses))
    local_loads, local_stores = (len(re.findall(rf"\b{op}\b", sass)) for op in ("LDL", "STL"))
    spills = f"{local_loads} + {local_stores}"
    return (int(registers.group(1)) if registers else 0,
            " + ".join(str(n) for n in loops) or "no loop", spills)


def report(name: str, x: torch.Tensor, block: int, dim: int, rounding: str,
           **launch) -> list[tuple]:
    recorder = _Recorder()
    _hadamard_quantize_impl(recorder, x, "fp8_e4m3", "row", block, dim, rounding,
                            overrides=LaunchOverrides(split=1), **launch)
    rows = []
    for kernel, _grid, args, kwargs in recorder.launches:
        warps = kwargs["num_warps"]
        compiled = _compile(kernel, args, dict(kwargs))
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        shared = compiled.metadata.shared
        registers, loops, spills = _sass(compiled.asm["cubin"])
        # Registers are allocated per warp in units of 256.
        per_warp = -(-registers * 32 // 256) * 256
        per_sm = min(SHARED_PER_SM // max(shared, 1), 64 // warps,
                     REGISTERS_PER_SM // max(per_warp * warps, 1))
        pass_name = {0: "absmax+quantize", 1: "absmax", 2: "quantize", 3: "quantize"}[
            kwargs["MODE"]]
        # (the unrotated transpose's kernel: BLOCK_K in NT's place; dim 0's: one tile)
        second = kwargs.get("NT", kwargs.get("BLOCK_K", 1))
        rows.append((name, pass_name, f"({kwargs['BLOCK_M']}, {second}, {warps})",
                     f"{shared / 1024:.1f}", per_sm, per_sm * warps, registers or "-", loops,
                     spills, ttgir.count("convert_layout"), ptx.count("mma.sync"),
                     ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                     _widths(ptx, "ld"), _widths(ptx, "st")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=14336)
    parser.add_argument("--only", default="", help="only the variants whose name contains this")
    parser.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"))
    args = parser.parse_args()
    t = torch.empty(args.tokens, args.features, dtype=torch.bfloat16, device="meta")
    variants = [("rows (X, W), block 256", t, 256, 1), ("rows, no rotation", t, 0, 1),
                ("transposed view (dYᵀ, Xᵀ), block 256", t.t(), 256, 1),
                ("transposed view, no rotation", t.t(), 0, 1),
                ("dim 0 (outer dY), block 256", t, 256, 0),
                ("dual (dY and dYᵀ, rotated along the tokens), block 256", t, 256, 0,
                 dict(dual=True))]
    header = ("variant", "launch", "(BLOCK_M, NT, warps)", "shared KiB", "programs/SM",
              "warps/SM", "registers", "SASS per loop iteration", "local ld + st",
              "convert_layout", "mma",
              "cp.async", "global loads", "global stores")
    print(f"Triton {triton.__version__}, target sm_90, bf16 [{args.tokens}, {args.features}] "
          f"-> FP8 row scales, rounding {args.rounding}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for variant in variants:
        if args.only not in variant[0]:
            continue
        for row in report(*variant[:4], args.rounding,
                          **(variant[4] if len(variant) > 4 else {})):
            print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


if __name__ == "__main__":
    main()
