"""The halo backend under FSDP2 (`fully_shard`) and DDP: 2 processes on CPU with gloo.

Each test spawns two ranks that train a tiny Llama-shaped decoder on halves of a global batch and
compares with one process training on the whole batch. With format="none" (Hadamards on) the
loss and gradients must match to float tolerance; with FP8 the 20-step loss curve within 2%.
"""

import math
import os
import socket
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import halo_compile
from halo_compile.distributed import (
    QuantizedAllGatherWeight,
    count_all_gather_bytes,
    enable_fp8_all_gather,
)

WORLD = 2
VOCAB, DIM, HEADS, FFN, LAYERS, BATCH, SEQ = 128, 64, 4, 128, 2, 4, 16
BLOCK_LINEARS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
DDP_BUCKET_BYTES = 64 * 1024  # the model's 390 KB of parameters make 6 buckets
NONE = {"format": "none", "hadamard": "halo2", "compiler": "aot_eager", "min_features": 16}
FP8 = {"format": "fp8_e4m3", "hadamard": "halo2", "compiler": "aot_eager", "min_features": 16}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, HEADS, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, DIM))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(DIM, FFN, bias=False)
        self.up_proj = nn.Linear(DIM, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(DIM), Attention()
        self.mlp_norm, self.mlp = nn.RMSNorm(DIM), MLP()

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.lm_head = nn.RMSNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def batches(seed, steps):
    """Token batches in which each token has one likely successor: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(VOCAB, generator=g)
    out = []
    for _ in range(steps):
        ids = [torch.randint(0, VOCAB, (BATCH,), generator=g)]
        for _ in range(SEQ - 1):
            noise = torch.randint(0, VOCAB, (BATCH,), generator=g)
            ids.append(torch.where(torch.rand(BATCH, generator=g) < 0.8, successor[ids[-1]], noise))
        out.append(torch.stack(ids, 1))
    return out


def lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def wrap(model, mode, options, backend="halo", fp8_all_gather=False):
    """Shard or replicate `model` and compile it as `mode` says; returns what to call."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    compile_kwargs = {"backend": backend}
    if backend == "halo" and mode == "fsdp_per_block":
        halo_compile.configure(model, options)  # found again through the unsharded parameters
    elif backend == "halo":
        compile_kwargs["options"] = options
    if fp8_all_gather:
        assert enable_fp8_all_gather(model, options) == [
            f"layers.{i}.{name}" for i in range(LAYERS) for name in BLOCK_LINEARS] + ["lm_head"]
    if mode == "fsdp_whole":
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return torch.compile(model, **compile_kwargs)
    if mode == "fsdp_per_block":  # torchtitan: compile each block, then shard
        for layer in model.layers:
            layer.compile(**compile_kwargs)
            fully_shard(layer)
        fully_shard(model)
        return model
    if mode == "ddp":
        # Small buckets (the first included), so that the DDP optimizer splits this tiny model's
        # graph at bucket boundaries and compiles each piece.
        dist._DEFAULT_FIRST_BUCKET_BYTES = DDP_BUCKET_BYTES
        ddp = DistributedDataParallel(model, bucket_cap_mb=DDP_BUCKET_BYTES / 2**20)
        return torch.compile(ddp, **compile_kwargs)
    raise ValueError(mode)


def full_grads(model):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def train(model, step_fn, steps, seed, rank=0, world=1):
    """`steps` AdamW steps on this rank's share of each global batch; returns the global mean
    loss of every step and the gradients of the first."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, first_grads = [], None
    for ids in batches(seed, steps):
        share = ids.chunk(world)[rank]
        loss = lm_loss(step_fn, share)
        loss.backward()
        if first_grads is None:
            first_grads = full_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
            global_loss /= world
        losses.append(global_loss.item())
    return losses, first_grads


def _rank_main(rank, port, out_dir, jobs):
    from torch._dynamo.utils import counters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, job in jobs.items():
            torch._dynamo.reset()
            counters.clear()
            results[name] = job(rank)
        torch.save(results, os.path.join(out_dir, f"results{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(tmp_path, **jobs):
    """Run each job(rank) on 2 gloo ranks; returns rank 0's results by job name (and leaves
    every rank's in tmp_path / f"results{rank}.pt")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path), jobs), nprocs=WORLD)
    return torch.load(tmp_path / "results0.pt", weights_only=False)


def dynamo_graphs():
    """Graph breaks and graphs, as Dynamo counts them."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"]}


def sharded_training(rank, mode, options, steps, backend="halo", fp8_all_gather=False, seed=0):
    model = TinyDecoder(seed)
    step_fn = wrap(model, mode, options, backend, fp8_all_gather)
    with count_all_gather_bytes() as all_gather:
        losses, grads = train(model, step_fn, steps, seed, rank, WORLD)
    return {"losses": losses, "grads": grads, "graphs": dynamo_graphs(),
            "all_gather_bytes": all_gather.bytes / steps,
            "quantized": [layer.fqn for layer in halo_compile.report(model).quantized]}


def single_process(options, steps, seed=0):
    model = TinyDecoder(seed)
    step_fn = model if options is None else torch.compile(model, backend="halo", options=options)
    return train(model, step_fn, steps, seed)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def block_linear_names(quantized):
    """Block-relative names ("attn.q_proj") of the reported linears: a graph compiled per block
    (or entered per block, as whole-model compile of an FSDP2 model is) names them so."""
    return {fqn.split(".", 2)[-1] if fqn.startswith("layers.") else fqn for fqn in quantized}


def check_matches_single_process(results, modes):
    (ref_loss,), ref_grads = single_process(NONE, steps=1)
    (eager_loss,), eager_grads = single_process(None, steps=1)
    assert math.isclose(ref_loss, eager_loss, rel_tol=1e-5)  # rotations cancel
    for mode in modes:
        result = results[mode]
        assert math.isclose(result["losses"][0], ref_loss, rel_tol=1e-6), mode
        assert result["grads"].keys() == ref_grads.keys()
        for name, grad in result["grads"].items():
            assert relative_error(grad, ref_grads[name]) < 1e-5, (mode, name)
            assert relative_error(grad, eager_grads[name]) < 1e-4, (mode, name)
        assert set(BLOCK_LINEARS) <= block_linear_names(result["quantized"]), mode
        # halo adds no graph break: Dynamo makes the graphs it makes for the stock backend.
        assert result["graphs"] == results[f"stock_{mode}"]["graphs"], mode


def test_fsdp2_format_none_matches_single_process(tmp_path):
    modes = ("fsdp_whole", "fsdp_per_block")
    jobs = {mode: partial(sharded_training, mode=mode, options=NONE, steps=1) for mode in modes}
    jobs.update({f"stock_{mode}": partial(sharded_training, mode=mode, options=None, steps=1,
                                          backend="eager") for mode in modes})
    results = run_on_ranks(tmp_path, **jobs)
    check_matches_single_process(results, modes)


def test_ddp_format_none_matches_single_process(tmp_path):
    results = run_on_ranks(
        tmp_path, ddp=partial(sharded_training, mode="ddp", options=NONE, steps=1),
        stock_ddp=partial(sharded_training, mode="ddp", options=None, steps=1, backend="eager"))
    check_matches_single_process(results, ["ddp"])
    # The DDP optimizer compiled the bucket pieces: every linear, under its full name.
    assert results["ddp"]["quantized"] == [
        f"layers.{i}.{name}" for i in range(LAYERS) for name in BLOCK_LINEARS] + ["lm_head"]


def all_gather_bytes(model, linear_weight_bytes):
    """Per step, what one rank puts into FSDP2's all-gathers, with `linear_weight_bytes(p)` for a
    linear's weight shard and float32 for the rest: each block's parameters are all-gathered for
    forward and again for backward, the root's (embedding, final norm, lm_head) once, as FSDP2
    keeps the root unsharded between forward and backward."""
    total = 0
    for name, p in model.named_parameters():
        is_linear_weight = p.dim() == 2 and name != "embed.weight"
        shard = linear_weight_bytes(p) if is_linear_weight else p.numel() // WORLD * 4
        total += shard * (2 if name.startswith("layers.") else 1)
    return total


def test_fp8_training_and_fp8_all_gather_match_single_process(tmp_path):
    steps = 20
    results = run_on_ranks(
        tmp_path,
        fsdp=partial(sharded_training, mode="fsdp_per_block", options=FP8, steps=steps),
        fsdp_fp8_all_gather=partial(sharded_training, mode="fsdp_per_block", options=FP8,
                                    steps=steps, fp8_all_gather=True),
        ddp=partial(sharded_training, mode="ddp", options=FP8, steps=steps))
    reference, _ = single_process(FP8, steps)
    eager, _ = single_process(None, steps)
    assert eager[-1] < 0.6 * eager[0]  # the task is being learnt: a broken gradient would show
    for name, result in results.items():
        for step, (loss, ref) in enumerate(zip(result["losses"], reference, strict=False)):
            assert abs(loss - ref) <= 0.02 * ref, (name, step, loss, ref)

    # The all-gathered bytes: float32 weights by default; with FP8 all-gather a linear's weight
    # shard goes as 1-byte values and a float32 scale per row.
    model = TinyDecoder(0)
    fp32_bytes = all_gather_bytes(model, lambda w: w.numel() // WORLD * 4)
    fp8_bytes = all_gather_bytes(model, lambda w: w.shape[0] // WORLD * (w.shape[1] + 4))
    assert results["fsdp"]["all_gather_bytes"] == fp32_bytes
    assert results["fsdp_fp8_all_gather"]["all_gather_bytes"] == fp8_bytes
    # Against a bf16 all-gather (2 bytes a value) the linear weights' bytes halve (the row
    # scales add 4 / in_features); the embedding and norms stay in their own dtype.
    other_bytes = all_gather_bytes(model, lambda w: 0)
    bf16_linear_bytes = all_gather_bytes(model, lambda w: w.numel() // WORLD * 2) - other_bytes
    measured_fp8_linear_bytes = results["fsdp_fp8_all_gather"]["all_gather_bytes"] - other_bytes
    assert measured_fp8_linear_bytes / bf16_linear_bytes < 0.55


def save_sharded_checkpoint(rank, checkpoint_dir, fp8_all_gather):
    """Train 3 FP8 steps under FSDP2 + halo, save with torch.distributed.checkpoint; return this
    rank's weight shards and the model's high-precision (eager) outputs."""
    import torch.distributed.checkpoint as dcp

    model = TinyDecoder(0)
    step_fn = wrap(model, "fsdp_per_block", FP8, fp8_all_gather=fp8_all_gather)
    train(model, step_fn, 3, 0, rank, WORLD)
    dcp.save(model.state_dict(), checkpoint_id=checkpoint_dir)
    shards = {}
    for name, p in model.named_parameters():
        local = p.to_local()
        shards[name] = (local._tensor if isinstance(local, QuantizedAllGatherWeight)
                        else local).detach().clone()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        eager_logits = model(batches(1, 1)[0])
    return {"shards": shards, "eager_logits": eager_logits}


def test_distributed_checkpoint_loads_into_plain_model(tmp_path):
    import torch.distributed.checkpoint as dcp

    run_on_ranks(tmp_path, **{
        name: partial(save_sharded_checkpoint, checkpoint_dir=str(tmp_path / name),
                      fp8_all_gather=fp8)
        for name, fp8 in (("bf16_all_gather", False), ("fp8_all_gather", True))})
    ranks = [torch.load(tmp_path / f"results{r}.pt", weights_only=False) for r in range(WORLD)]
    for name in ("bf16_all_gather", "fp8_all_gather"):
        plain = TinyDecoder(1)  # other weights until loaded
        state = plain.state_dict()
        dcp.load(state, checkpoint_id=str(tmp_path / name))  # no process group: one process
        plain.load_state_dict(state)
        assert all(type(t) is torch.Tensor for t in state.values()), name
        # The checkpoint holds the trained weights in the original basis: FSDP2's dim-0 shards.
        for param, value in state.items():
            shards = torch.cat([ranks[r][name]["shards"][param] for r in range(WORLD)])
            assert torch.equal(value, shards[:len(value)]), (name, param)
        if name == "bf16_all_gather":  # (FP8 all-gather gives the sharded model FP8 weights)
            with torch.no_grad():
                logits = plain(batches(1, 1)[0])
            assert relative_error(logits, ranks[0][name]["eager_logits"]) < 1e-6
