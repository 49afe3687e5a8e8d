"""Held-out perplexity of a small trained Llama with outlier channels, quantized (INT8, FP8 E4M3,
emulated W4A8 and W4A4) with and without the fused QuaRot rotations (rotate="fused"), on CPU.

    python benchmarks/rotation_perplexity.py [--steps 400] [--markdown out.md]

A random model's perplexity is about its vocabulary size whatever the quantization, so the model
is trained first: fp32 eager, byte-level vocabulary (256), on the docstrings of Python's standard
library (examples/finetune.py's corpus and split: every 10th docstring held out). A model this
small and this briefly trained has none of the outlier channels of real LLMs, which are what the
rotations are for, so they are then injected without changing its function
(halo_compile.testing.inject_outlier_channels; --outlier-factor 1 keeps the model as trained).
Each format is evaluated through torch.compile(backend="halo") twice: unrotated
(rotate="online", hadamard="none") and rotate="fused". Prints held-out perplexity and the logits'
relative error against the fp32 model.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from _timing import emit

from halo_compile.testing import inject_outlier_channels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from finetune import EVAL_EVERY_NTH_DOCSTRING, stdlib_docstrings  # noqa: E402

MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
# "none" first: with it the fused column checks that the rotations alone leave the model unchanged.
FORMATS = {"none": "fp32 (`none`)", "int8": "W8A8 INT8", "fp8_e4m3": "W8A8 FP8 E4M3",
           "w4a8": "W4A8 (`w4a8`, emulated)", "int4": "W4A4 (`int4`, emulated)"}


def byte_stream(docs: list[str]) -> torch.Tensor:
    return torch.tensor(list("\n\n".join(docs).encode("utf-8")), dtype=torch.long)


def train(model, stream: torch.Tensor, args) -> None:
    """AdamW on random windows of the training text; linear warm-up then cosine decay to 10%."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    start, recent = time.perf_counter(), []
    for step in range(args.steps):
        starts = torch.randint(len(stream) - args.seq_len, (args.batch_size,), generator=generator)
        ids = torch.stack([stream[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: train loss {sum(recent) / len(recent):.3f} "
                  f"(ppl {math.exp(sum(recent) / len(recent)):.2f}), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            recent = []
    model.eval()


def evaluate(forward, batches, reference=None) -> tuple[float, list[torch.Tensor], float]:
    """Perplexity over every next-byte prediction, the logits, and their relative error against
    `reference` (NaN without one)."""
    nll, count, logits_all = 0.0, 0, []
    with torch.no_grad():
        for ids in batches:
            logits = forward(input_ids=ids).logits.float()
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                   reduction="sum").item()
            count += ids[:, 1:].numel()
            logits_all.append(logits)
    err = math.nan
    if reference is not None:
        diff = sum((a.double() - b.double()).square().sum()
                   for a, b in zip(logits_all, reference, strict=False))
        norm = sum(b.double().square().sum() for b in reference)
        err = (diff / norm).sqrt().item()
    return math.exp(nll / count), logits_all, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-sequences", type=int, default=128,
                        help="held-out sequences of --seq-len bytes, at most all there are")
    parser.add_argument("--outlier-factor", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    docs = stdlib_docstrings()
    train_docs = [d for i, d in enumerate(docs) if i % EVAL_EVERY_NTH_DOCSTRING]
    train_stream = byte_stream(train_docs)
    eval_stream = byte_stream(docs[::EVAL_EVERY_NTH_DOCSTRING])
    usable = len(eval_stream) // args.seq_len * args.seq_len
    eval_ids = eval_stream[:usable].view(-1, args.seq_len)[: args.eval_sequences]
    batches = eval_ids.split(args.batch_size)
    if len(batches[-1]) != len(batches[0]):
        batches = batches[:-1]  # one shape, so each variant compiles once
    eval_tokens = sum(b.numel() for b in batches)

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(use_cache=False, attn_implementation="sdpa",
                                      tie_word_embeddings=False, **MODEL)
    model = transformers.LlamaForCausalLM(config)
    print(f"Llama {MODEL}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(train_stream):,} training bytes, {eval_tokens:,} held-out bytes; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len}", flush=True)
    train(model, train_stream, args)
    for param in model.parameters():
        param.requires_grad_(False)
    trained_ppl, trained_logits, _ = evaluate(model, batches)
    inject_outlier_channels(model, args.outlier_factor)
    reference_ppl, reference, drift = evaluate(model, batches, trained_logits)
    print(f"held-out perplexity {trained_ppl:.3f} trained, {reference_ppl:.3f} with outliers "
          f"x{args.outlier_factor:g} (logits relative change {drift:.1e})", flush=True)
    if drift > 1e-4:
        raise RuntimeError(f"injecting outliers changed the logits by {drift:.1e}")

    rows = []
    for fmt, label in FORMATS.items():
        cells = []
        for rotate in ("online", "fused"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="halo", options={
                "format": fmt, "hadamard": "none", "rotate": rotate, "compiler": "aot_eager"})
            ppl, _, err = evaluate(compiled, batches, reference)
            print(f"{fmt} rotate={rotate}: perplexity {ppl:.3f}, logits rel. err {err:.3g} "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
            cells.append((ppl, err))
        (ppl_u, err_u), (ppl_f, err_f) = cells
        rows.append(f"| {label} | {ppl_u:.3f} | {ppl_f:.3f} | {err_u:.3g} | {err_f:.3g} |")

    table = "\n".join([
        f"Held-out perplexity (per byte) of a trained tiny Llama (hidden {MODEL['hidden_size']}, "
        f"intermediate {MODEL['intermediate_size']}, {MODEL['num_hidden_layers']} layers, byte "
        f"vocabulary), outlier channels x{args.outlier_factor:g}; fp32 reference perplexity "
        f"{reference_ppl:.3f} "
        f"({eval_tokens:,} held-out bytes, {args.steps} training steps x {args.batch_size} x "
        f"{args.seq_len})",
        "",
        "| format | perplexity unrotated | perplexity `rotate=\"fused\"` "
        "| logits rel. err unrotated | logits rel. err fused |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"CPU, torch {torch.__version__}, {time.perf_counter() - began:.0f} s in all"])
    emit(table, args.markdown)


if __name__ == "__main__":
    main()
