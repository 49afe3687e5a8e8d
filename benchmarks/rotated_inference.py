"""Rotated FP8 inference (rotate="fused") against bf16 Inductor: a few Llama-3-8B-shaped decoder
layers, forward only, tokens/s side by side in one run.

    python benchmarks/rotated_inference.py                     # GPU: 4 layers, 8192 tokens
    python benchmarks/rotated_inference.py --tiny              # CPU check with tiny shapes
    python benchmarks/rotated_inference.py --markdown out.md

Variants (all torch.compile'd, under torch.no_grad(), weights frozen):
    bf16-inductor        plain Inductor
    halo-fp8-fused       halo FP8 (row scales), rotate="fused", Inductor freezing on (the
                         parameters become constants)
    halo-fp8-fused-nofreeze   the same without freezing. In both, the frozen weights are
                         folded, rotated and quantized once, in halo's frozen-weight cache
    halo-fp8-online      halo FP8 with HALO's online forward Hadamard on every linear (halo1)
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
import transformers
from _timing import kernel_breakdown

import halo_compile
from halo_compile.kernels.weight_cache import WEIGHT_CACHE


def llama_layers(tiny: bool, layers: int, device: str, dtype) -> torch.nn.Module:
    if tiny:
        sizes = dict(hidden_size=128, intermediate_size=448, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
    else:  # Llama-3-8B
        sizes = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
    config = transformers.LlamaConfig(num_hidden_layers=layers, use_cache=False,
                                      attn_implementation="sdpa", **sizes)
    torch.manual_seed(0)
    with torch.device(device):  # initializing 2B parameters on the host CPU takes minutes
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextmanager
def inductor_freezing(enabled: bool):
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = enabled
    try:
        yield
    finally:
        inductor_config.freezing = old


VARIANTS = {
    "bf16-inductor": (None, False),
    "halo-fp8-fused": ({"format": "fp8_e4m3", "rotate": "fused"}, True),
    "halo-fp8-fused-nofreeze": ({"format": "fp8_e4m3", "rotate": "fused"}, False),
    "halo-fp8-online": ({"format": "fp8_e4m3", "hadamard": "halo1"}, False),
}


def time_variant(model, ids, options, freezing: bool, iters: int, device: str,
                 profile: bool = False):
    torch._dynamo.reset()
    with inductor_freezing(freezing), torch.no_grad():
        if options is None:
            compiled = torch.compile(model)
        else:
            compiled = torch.compile(model, backend="halo", options=options)
        out = compiled(input_ids=ids).logits  # compile + warm up
        compiled(input_ids=ids)
        sync(device)
        derived = WEIGHT_CACHE.computations
        start = time.perf_counter()
        for _ in range(iters):
            compiled(input_ids=ids)
        sync(device)
        seconds = (time.perf_counter() - start) / iters
        # Frozen weights are derived once per version: none may be re-derived while timed.
        assert WEIGHT_CACHE.computations == derived, "frozen weights re-derived while timed"
        if profile:
            print(kernel_breakdown(lambda: compiled(input_ids=ids), 3), flush=True)
    return ids.numel() / seconds, out.float()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU check")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=None, help="batch x sequence (default "
                        "8192 on GPU, 256 with --tiny)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--profile", default="", help="variants to profile (comma separated): "
                        "their GPU kernels by total time")
    args = parser.parse_args()
    tokens = args.tokens or (256 if args.tiny else 8192)
    iters = args.iters or (3 if args.tiny else 20)
    layers = 2 if args.tiny and args.layers == 4 else args.layers
    dtype = torch.bfloat16
    model = llama_layers(args.tiny, layers, args.device, dtype)
    seq = min(tokens, 2048)
    ids = torch.randint(0, model.config.vocab_size, (tokens // seq, seq), device=args.device)

    rows, baseline, reference = [], None, None
    for name, (options, freezing) in VARIANTS.items():
        rate, logits = time_variant(model, ids, options, freezing, iters, args.device,
                                    name in args.profile.split(","))
        if reference is None:
            reference, baseline = logits, rate
        err = ((logits - reference).norm() / reference.norm()).item()
        rows.append((name, rate, rate / baseline, err))
        # Each row as soon as it is measured: a run cut by a time limit still reports.
        print(f"{name}: {rate:,.0f} tokens/s, {rate / baseline:.2f}x, logits rel. err {err:.2e}",
              flush=True)
    fused_report = None
    if any(options for options, _ in VARIANTS.values()):
        fused_report = str(halo_compile.report(model)).splitlines()[:2]

    device_name = (torch.cuda.get_device_name() if args.device == "cuda" else "CPU")
    lines = [
        f"Rotated inference forward, {layers} Llama-3-8B-shaped layers" if not args.tiny
        else f"Rotated inference forward, {layers} tiny Llama layers (--tiny)",
        f"device {device_name}, torch {torch.__version__}, {tokens} tokens, bf16 activations",
        "",
        "| variant | tokens/s | vs bf16 inductor | logits rel. err vs bf16 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {r:,.0f} | {x:.2f}x | {e:.4f} |" for n, r, x, e in rows]
    if fused_report:
        lines += ["", *("    " + line for line in fused_report)]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
