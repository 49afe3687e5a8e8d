"""One training step (forward, backward, AdamW) of Llama-3-8B-shaped decoder layers (hidden
4096, intermediate 14336, 32 heads, 8 KV heads; transformers' LlamaModel built from a config,
bf16, SDPA attention) at sequence 4096, batch 1: tokens/s and peak memory for bf16 Inductor, the
halo backend's variants and torchao float8 training, side by side in one process.

    python benchmarks/decoder_step.py [--layers 2] [--seq 4096] [--batch 1] [--compile layers]
                                      [--accumulate 1] [--markdown out.md]
                                      [--profile "halo fp8 halo2,..."]

--accumulate N runs N micro-batches (forward and backward, gradients accumulated) per optimizer
step, as gradient accumulation does; a "step" in the table is then all N and the optimizer's
update, and tokens/s counts the N micro-batches' tokens.

With --compile layers (default), each decoder layer is compiled on its own (regional
compilation: the layers share one compiled graph); the tiny embedding (vocab 256) and the final
norm stay eager, and so does transformers' mask creation, which synchronizes with the GPU once a
step (it reads a tensor's value to detect packed sequences). With --compile model the whole
model is one compiled graph, and the mask creation is traced (no synchronization; but the
traced mask is a tensor, which SDPA then applies instead of its causal kernels: attention takes
about 3x longer). --no-packed-check leaves out that synchronization in the regional mode:
transformers' packed-sequence detection (masking_utils.find_packed_sequence_indices, which
reads a tensor on the host) is replaced by its answer for these inputs, one sequence per batch
row (None); so the step never waits for the GPU, as in a training loop whose model does not.

Every contender is built first (peak memory counts its own allocations), then the steps are timed
in rounds that take each contender in turn, twice: each step synchronized, and steps queued back
to back (as a training loop that does not wait for each step runs them). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
from _contenders import NAMES, compile_fn, parse_names
from _timing import (
    emit,
    host_ms,
    interleaved_median_ms,
    kernel_breakdown,
    markdown_table,
    peak_gib,
    speedup,
)

from halo_compile import _flags


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=layers, vocab_size=256,
                         max_position_embeddings=8192, rope_theta=500000.0,
                         attn_implementation="sdpa", use_cache=False)
    return LlamaModel(config).to("cuda", torch.bfloat16)


def training_step(model, opt, embeds, micro_batches=1):
    def step():
        for _ in range(micro_batches):
            # A new step for CUDA graph contenders: their graphs' previous outputs may be reused.
            torch.compiler.cudagraph_mark_step_begin()
            out = model(inputs_embeds=embeds).last_hidden_state
            loss = out.float().square().mean() / micro_batches
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def leave_inductor_as_is(names: str) -> None:
    """Turn off the named settings the halo backend gives Inductor (halo_compile/_flags.py)."""
    for name in filter(None, names.split(",")):
        if name == "realize":
            _flags.realize_user_kernel_inputs = False
        elif name == "static-launch":
            _flags.static_launch = False
        elif name == "merge-unrotations":
            _flags.merge_unrotations = False
        else:
            raise SystemExit(f"--as-is: unknown setting {name!r}; known: realize, "
                             "static-launch, merge-unrotations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per optimizer step (gradient accumulation)")
    parser.add_argument("--compile", choices=("layers", "model"), default="layers",
                        help="compile each decoder layer, or the whole model")
    parser.add_argument("--no-packed-check", action="store_true",
                        help="skip transformers' per-step packed-sequence detection (a host "
                             "synchronization); the inputs are not packed")
    parser.add_argument("--as-is", default="",
                        help="comma-separated halo settings of Inductor to leave as torch has "
                             "them, to measure what they save: realize (an input several halo "
                             "kernel launches share computed once), static-launch (halo's "
                             "kernels through Inductor's static CUDA launcher), "
                             "merge-unrotations (q/k/v's and gate/up's un-rotated gradients "
                             "summed before one un-rotation)")
    parser.add_argument("--reps", type=int, default=2, help="steps per contender and round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of timing, each taking every contender in turn")
    parser.add_argument("--contenders", default=",".join(NAMES))
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    parser.add_argument("--profile", default="",
                        help="contenders to profile (comma separated): per-kernel GPU times")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    names = parse_names(args.contenders)
    if args.no_packed_check:
        import transformers.masking_utils

        transformers.masking_utils.find_packed_sequence_indices = lambda position_ids: None
    leave_inductor_as_is(args.as_is)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(args.layers).state_dict().items()}
    embeds = torch.randn(args.batch, args.seq, 4096, device="cuda", dtype=torch.bfloat16)
    rows, steps, notes = [], {}, {}
    for name in names:
        before = torch.cuda.memory_allocated()  # the contenders built earlier stay allocated
        model = build_model(args.layers)
        model.load_state_dict(state)
        if args.compile == "model":
            model, skipped = compile_fn(name, model)
        else:
            skipped = None
            for i, layer in enumerate(model.layers):
                compiled, skipped = compile_fn(name, layer)
                if skipped:
                    break
                model.layers[i] = compiled
        if skipped:
            print(f"{name}: skipped ({skipped})", flush=True)
            rows.append((name, "skipped", "-", "-", "-", "-", "-", "-", skipped))
            continue
        steps[name] = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5,
                                                             fused=True), embeds,
                                    args.accumulate)
        loss = steps[name]().detach().item()
        peak = peak_gib(steps[name]) - before / 2**30
        notes[name] = (peak, loss)
        if name in args.profile.split(","):
            print(f"--- {name}: GPU kernels over 3 steps ---")
            print(kernel_breakdown(steps[name], 3, top=25), flush=True)
    tokens = args.accumulate * args.batch * args.seq
    times = interleaved_median_ms(steps, args.rounds, args.reps)
    queued = interleaved_median_ms(steps, args.rounds, 4 * args.reps, queued=True)
    host = host_ms(steps, args.rounds, 4 * args.reps)
    for name, ms in times.items():
        peak, loss = notes[name]
        rows.append((name, f"{ms:.1f}", f"{tokens / (ms * 1e-3):.0f}", speedup(times, name),
                     f"{queued[name]:.1f}", speedup(queued, name), f"{host[name]:.1f}",
                     f"{peak:.2f}",
                     f"first loss {loss:.4f}"))
        print(rows[-1], flush=True)
    emit(markdown_table(
        f"Training step (fwd+bwd+AdamW), {args.layers} Llama-3-8B-shaped decoder layers, seq "
        f"{args.seq}, batch {args.batch}, bf16, compiled by {args.compile}"
        + (f", {args.accumulate} micro-batches per optimizer step" if args.accumulate > 1
           else "")
        + (", packed-sequence check skipped" if args.no_packed_check else "")
        + (f", halo's Inductor settings left as torch has them: {args.as_is}" if args.as_is
           else ""),
        ["contender", "ms / step (synchronized)", "tokens/s", "x bf16 inductor",
         "ms / step (queued)", "x bf16 inductor (queued)", "host ms a step", "peak GiB", "note"],
        rows),
        args.markdown)


if __name__ == "__main__":
    main()
