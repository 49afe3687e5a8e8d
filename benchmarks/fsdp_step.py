"""A training step of 4 Llama-3-8B-shaped decoder layers under FSDP2 on 2 GPUs: tokens/s and
all-gather bytes per step for bf16 Inductor, halo FP8 with a bf16 all-gather, halo FP8 with the
FP8 all-gather, and torchao float8 with its FP8 all-gather, run side by side.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 benchmarks/fsdp_step.py [--markdown out.md]
    torchrun --nproc-per-node 2 benchmarks/fsdp_step.py --tiny     # CPU, gloo, tiny shapes

Parameters are fp32 master weights, computed in bf16 (FSDP2 MixedPrecisionPolicy, gradients
reduce-scattered in fp32), as torchtitan trains; each block is compiled, then fully_shard'ed
(torchtitan's order). The all-gather bytes are what each rank puts into FSDP2's all-gathers in
one step (forward and backward), counted at torch.distributed's all-gather call.
"""

from __future__ import annotations

import argparse
import os
import time

# NVLink multicast stays off on the shared GPU hosts (the device's KINDS.md): set before NCCL.
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[_name] = "0" if _name == "NCCL_NVLS_ENABLE" else "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import halo_compile  # noqa: E402,F401  (the backend is found by entry point)
from halo_compile.distributed import count_all_gather_bytes, enable_fp8_all_gather  # noqa: E402

LLAMA3_8B = {"dim": 4096, "heads": 32, "kv_heads": 8, "ffn": 14336, "batch": 2, "seq": 4096}
TINY = {"dim": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "batch": 2, "seq": 32}
HALO_FP8 = {"format": "fp8_e4m3", "hadamard": "halo2"}
VARIANTS = ("bf16 inductor", "halo fp8 / bf16 all-gather", "halo fp8 / fp8 all-gather",
            "torchao float8 / fp8 all-gather")


class DecoderLayer(nn.Module):
    """A Llama decoder layer: RMSNorm, GQA attention (SDPA), RMSNorm, SwiGLU MLP."""

    def __init__(self, dim, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    def __init__(self, layers, shape):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(shape["dim"], shape["heads"], shape["kv_heads"], shape["ffn"])
            for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build(variant, args, shape, device):
    """The sharded, compiled model of one variant (same seed, same weights for all)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(args.layers, shape)
    if variant.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    halo = variant.startswith("halo")
    options = {**HALO_FP8, "compiler": args.compiler}
    if variant == "halo fp8 / fp8 all-gather":
        enabled = enable_fp8_all_gather(model, options)
        assert enabled, "no linear weight was set up for the FP8 all-gather"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        if halo:
            layer.compile(backend="halo", options=options)
        else:
            layer.compile(backend=args.compiler)
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def run_variant(variant, args, shape, device):
    """Median step seconds, all-gather bytes per step (this rank) and peak GiB, or an error."""
    model = build(variant, args, shape, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(shape["batch"], shape["seq"], shape["dim"], device=device, generator=g,
                    dtype=torch.bfloat16)

    def step():
        loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant.startswith("torchao"):
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(model)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.warmup):
        step()
    synchronize()
    with count_all_gather_bytes() as all_gather:
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], all_gather.bytes, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU with gloo")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compiler", choices=("inductor", "aot_eager"), default=None,
                        help="default: inductor on GPU, aot_eager with --tiny")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    args.compiler = args.compiler or ("aot_eager" if args.tiny else "inductor")
    shape = TINY if args.tiny else LLAMA3_8B
    use_cuda = not args.tiny
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    tokens = shape["batch"] * shape["seq"] * world  # per step, all ranks
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        torch._dynamo.reset()
        try:
            seconds, ag_bytes, peak = run_variant(variant, args, shape, device)
            rows.append((variant, f"{tokens / seconds:,.0f}", f"{seconds * 1e3:.1f}",
                         f"{ag_bytes / 2**20:,.2f}", f"{peak:.1f}"))
        except Exception as error:  # report the variant that cannot run, keep the others
            rows.append((variant, "failed", f"{type(error).__name__}: {str(error)[:120]}", "", ""))
    if rank == 0:
        base = next((float(r[3].replace(",", "")) for r in rows
                     if r[0] == VARIANTS[0] and r[1] != "failed"), None)
        headers = ("variant", "tokens/s", "step ms", "all-gather MiB/step/rank", "peak GiB",
                   "all-gather vs bf16")
        table_rows = [(*r, f"{float(r[3].replace(',', '')) / base:.2f}x" if base and r[3] else "")
                      for r in rows]
        device_name = torch.cuda.get_device_name() if use_cuda else "CPU (gloo)"
        lines = [f"FSDP2 training step, {args.layers} decoder layers {shape}, {world} ranks, "
                 f"{device_name}, torch {torch.__version__}, compiler {args.compiler}", "",
                 "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows]
        table = "\n".join(lines)
        print(table, flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(table + "\n\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
