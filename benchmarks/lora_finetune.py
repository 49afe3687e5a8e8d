"""LoRA fine-tuning throughput: a Llama-3-8B-shaped model of a few decoder layers with rank-16
LoRA adapters on every projection, bf16 Inductor vs halo (frozen base weights quantized once and
cached), timed side by side in one process.

    python benchmarks/lora_finetune.py [--layers 4] [--batch 4] [--seq 2048] [--markdown out.md]

A training step is forward, backward and AdamW on the adapters (on the same batch each step:
throughput only). Prints tokens/s, the speed-up vs bf16 Inductor, peak memory, the memory the
cached quantized base weights take, and how many times the base weights were quantized during
the timed steps (0: once per version, before timing). Needs a CUDA GPU and peft.
"""

from __future__ import annotations

import argparse

import torch
from _timing import emit, markdown_table, median_ms, peak_gib

import halo_compile  # noqa: F401  (the backend is found by entry point; this gives report())
from halo_compile.kernels.weight_cache import WEIGHT_CACHE

VARIANTS = {
    "bf16 inductor": None,
    "halo fp8, halo2": {"format": "fp8_e4m3", "hadamard": "halo2"},
    "halo fp8, no Hadamard": {"format": "fp8_e4m3", "hadamard": "none"},
    "halo int8, halo2": {"format": "int8", "hadamard": "halo2"},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(args) -> torch.nn.Module:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 512, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                           target_modules=TARGETS)
    return peft.get_peft_model(model, lora).train()


def measure(options, ids, args) -> tuple:
    """One variant's (median ms a step, peak GiB, cached weights GiB, base weights quantized
    while timed); its model is freed on return."""
    torch._dynamo.reset()
    WEIGHT_CACHE.forget()
    model = lora_llama(args)
    compiled = (torch.compile(model) if options is None
                else torch.compile(model, backend="halo", options=options))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        compiled(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # compile, and quantize the frozen base weights
    before = WEIGHT_CACHE.computations
    ms = median_ms(step, args.reps)
    requantized = WEIGHT_CACHE.computations - before
    return ms, peak_gib(step), WEIGHT_CACHE.nbytes() / 2**30, requantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="';'-separated names from: " + "; ".join(VARIANTS))
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    tokens = ids.numel()
    rows = []
    for name in args.variants.split(";"):
        ms, peak, cache_gib, requantized = measure(VARIANTS[name], ids, args)
        rows.append((name, ms, tokens / ms * 1e3, peak, cache_gib, requantized))
        print(f"{name:24s} {ms:8.1f} ms/step  {tokens / ms * 1e3:9.0f} tokens/s  peak "
              f"{peak:6.2f} GiB  cache {cache_gib:5.2f} GiB  re-quantized {requantized}",
              flush=True)

    bf16_ms = next((ms for name, ms, *_ in rows if name == "bf16 inductor"), None)
    title = (f"LoRA (r={args.rank}, all projections) fine-tuning step, {args.layers} Llama-3-8B "
             f"layers ({args.hidden} -> {args.intermediate}), vocab {args.vocab}, "
             f"{args.batch} x {args.seq} tokens, bf16 weights")
    emit(markdown_table(
        title, ["variant", "ms/step (median)", "tokens/s", "x bf16 inductor", "peak GiB",
                "cached weights GiB", "re-quantized while timed"],
        [(name, f"{ms:.1f}", f"{tps:,.0f}", f"{bf16_ms / ms:.2f}x" if bf16_ms else "-",
          f"{peak:.2f}", f"{cache:.2f}", requantized)
         for name, ms, tps, peak, cache, requantized in rows]), args.markdown)


if __name__ == "__main__":
    main()
