"""A fine-tuning run as users make it, on the GPU: the Hugging Face Trainer on a Llama built from
config, dynamic padding (every batch padded to its longest sequence: a new shape nearly every
step), bf16 mixed precision (`bf16=True`: fp32 weights, bf16 autocast), evaluation during
training, with and without gradient checkpointing; plain Inductor (the model compiled in place)
against halo (`HaloCallback`, default options). For each: tokens/s in the steady state (after
the compiles; padding tokens counted, as the GPU computes them), peak memory, the number of
graphs Dynamo compiled, and compile time (the first steps' wall time beyond the steady state's).
`--fixed-length` also times each contender with every batch padded to --max-len (one shape),
the figure the dynamic run is compared with.

    python benchmarks/trainer_run.py --layers 8 --markdown out.md
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _timing import emit, markdown_table
from torch._dynamo.utils import counters

WIDTHS = {  # hidden, intermediate, attention heads, key/value heads, vocabulary
    "tiny": (128, 256, 4, 2, 512),  # a check of the script on a CPU (--device cpu)
    "1b": (2048, 8192, 32, 8, 128256),
    "8b": (4096, 14336, 32, 8, 128256),
}


def _model(args):
    import transformers

    hidden, intermediate, heads, kv_heads, vocab = WIDTHS[args.widths]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=args.widths == "1b", use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(args.device)


def _dataset(args, count, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (count,), generator=generator)
    vocab = WIDTHS[args.widths][4]
    return [{"input_ids": torch.randint(0, vocab, (int(n),), generator=generator)}
            for n in lengths]


def _collate(pad_to):
    """Dynamic padding (to the batch's longest, as DataCollatorWithPadding does), or to a fixed
    length; labels -100 on the padding."""
    def collate(examples):
        longest = pad_to or max(len(e["input_ids"]) for e in examples)
        ids = torch.zeros((len(examples), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = example["input_ids"]
            mask[row, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


class _StepClock:
    """Wall time of each optimizer step (synchronized)."""

    def __init__(self, device):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _synchronize(device)
                clock.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _synchronize(device)
                clock.steps.append(time.perf_counter() - clock.start)

        self.callback = Callback()
        self.steps: list[float] = []
        self.start = 0.0


def run(args, contender: str, checkpointing: bool, fixed: bool) -> list:
    from transformers import Trainer, TrainingArguments

    from halo_compile.integrations import HaloCallback

    torch._dynamo.reset()
    counters.clear()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = _model(args)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    callbacks = [HaloCallback()] if contender == "halo" else []
    if contender == "bf16":
        model.compile()  # plain Inductor, in place (as HaloCallback compiles halo)
    clock = _StepClock(args.device)
    training = TrainingArguments(
        output_dir="/tmp/halo-trainer-run", max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
        bf16=True, eval_strategy="steps", eval_steps=args.eval_every, learning_rate=1e-5,
        optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch",
        report_to="none", save_strategy="no", logging_steps=10**6,
        dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True,
        use_cpu=args.device == "cpu")
    trainer = Trainer(model=model, args=training, callbacks=[*callbacks, clock.callback],
                      train_dataset=_dataset(args, args.steps * args.batch * args.accumulation, 0),
                      eval_dataset=_dataset(args, 2 * args.batch, 1),
                      data_collator=_collate(args.max_len if fixed else None))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steady = sorted(clock.steps[args.warmup:])[len(clock.steps[args.warmup:]) // 2]
    first = sum(clock.steps[:args.warmup]) - args.warmup * steady
    tokens = args.batch * args.accumulation * (args.max_len if fixed else
                                               (args.min_len + args.max_len) / 2)
    graphs = counters["stats"]["unique_graphs"]
    quantized = ""
    if contender == "halo":
        import halo_compile

        report = halo_compile.report(model)
        quantized = f"{len(report.quantized)}/{len(report.layers)}"
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    del trainer, model
    return [contender, "on" if checkpointing else "off", "fixed" if fixed else "dynamic",
            f"{tokens / steady:,.0f}", f"{steady * 1e3:.1f}", f"{peak:.2f}", str(graphs),
            f"{first:.1f}", f"{wall:.1f}", quantized]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--widths", choices=sorted(WIDTHS), default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6,
                        help="steps counted as compile (static graph, dynamic graph, eval)")
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--contenders", default="bf16,halo")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--fixed-length", action="store_true")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    rows = []
    for checkpointing in args.checkpointing.split(","):
        for contender in args.contenders.split(","):
            for fixed in ([False, True] if args.fixed_length else [False]):
                rows.append(run(args, contender, checkpointing == "on", fixed))
                print(rows[-1], flush=True)
    title = (f"HF Trainer, Llama {args.widths} widths x {args.layers} layers, batch {args.batch} "
             f"x {args.min_len}-{args.max_len} tokens (dynamic padding), bf16=True, eval every "
             f"{args.eval_every} steps, {args.steps} steps")
    emit(markdown_table(title, ["contender", "checkpointing", "shapes", "tokens/s", "step ms",
                                "peak GiB", "graphs", "compile s", "wall s", "quantized"],
                        rows), args.markdown)


if __name__ == "__main__":
    main()
