"""Transform (rotate="fused"): rotate the residual stream by a seeded random Hadamard Q.

A pre-norm transformer's residual stream h is written by the embedding and by the linears whose
outputs are added to it (o_proj, down_proj), and read by the residual adds and by RMSNorms, whose
outputs feed linears. Carrying h Q instead of h changes no output when (after fuse_norms.py):

    stream root        h -> h Q, online       (an embedding lookup's rows, E[ids] Q)
    reading linear     W -> W Q               input side: (h Q)(W Q)ᵀ = h Wᵀ
    writing linear     W -> Qᵀ W, b -> b Q    output side: it writes y Q
    scale-free RMSNorm unchanged              rmsnorm(h Q) = rmsnorm(h) Q

so activations reach q/k/v, gate/up and lm_head already rotated, with no online Hadamard. Any
other reader of the stream (a graph output such as returned hidden states, an op we do not know)
gets the unrotated value (h Q) Qᵀ computed online: correct by construction, at the cost of one
Hadamard pass, noted in the report. Q = diag(signs)·(I ⊗ H_b) with signs drawn from a fixed seed
and b the largest power of two dividing the width (the whole width for 4096).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from halo_compile.kernels.constants import ADD_OPS, MIN_BLOCK
from halo_compile.kernels.hadamard import hadamard_block_size

from .find_norms import _linear_writers
from .folding import (
    flows_only_into,
    fold_weight,
    foldable,
    insert_before_use,
    rotate,
    rotate_output_side,
    unrotate,
)
from .graph_utils import (
    call_target_name,
    fake_value,
    node_arg,
    passthrough_input,
    program_order,
    strip_passthroughs,
)

_LOG = logging.getLogger(__name__)

SEED = 0
_SCALINGS = ("mul", "truediv", "div", "neg")


class RotateResidualStream:
    name = "rotate_residual"

    def run(self, ctx) -> None:
        if ctx.config.rotate != "fused" or not ctx.analysis.residual_adds:
            return
        reason = self._reason_to_skip(ctx)
        _LOG.debug("residual stream %s", f"not rotated: {reason}" if reason else "rotated")
        if reason:
            ctx.fusion.notes.append(f"residual stream not rotated: {reason}")
            for site in ctx.analysis.linears:
                ctx.fusion.note_not_fused(site.fqn, f"residual stream not rotated: {reason}")
            return
        _Rotation(ctx).apply()

    @staticmethod
    def _reason_to_skip(ctx) -> str:
        scale_free = {norm.output for norm in ctx.fusion.scale_free_norms}
        for norm in ctx.analysis.norms:
            if norm.feeds and norm.output not in scale_free:
                return f"{norm.fqn} ({norm.kind}) keeps its scale"
        width = _stream_width(ctx)
        if not hadamard_block_size(width, 0):
            return f"no power-of-two block >= {MIN_BLOCK} divides the width {width}"
        return ""


def _stream_root(ctx) -> fx.Node:
    """The stream's first value: the operand of the first residual add computed before its
    writers (a writer reads the stream, so the stream comes first)."""
    first = ctx.analysis.residual_adds[0]
    position = program_order(ctx.gm.graph)
    operands = [strip_passthroughs(a) for a in first.node.args[:2]]
    return min(operands, key=position.__getitem__)


def _stream_width(ctx) -> int:
    return fake_value(_stream_root(ctx)).shape[-1]


class _Rotation:
    def __init__(self, ctx):
        self.ctx = ctx
        self.graph = ctx.gm.graph
        self.position = program_order(self.graph)
        self.root = _stream_root(ctx)
        self.width = fake_value(self.root).shape[-1]
        self.block = hadamard_block_size(self.width, 0)
        self.signs = SEED  # Q's random signs, drawn in the graph (folding.random_signs)
        self.rotated: set[fx.Node] = set()
        self.unrotated: dict[fx.Node, fx.Node] = {}
        self.linears = ctx.analysis.linear_by_node()
        self.norm_of = {node: norm for norm in ctx.fusion.scale_free_norms for node in norm.nodes}
        self.residual_adds = {add.node for add in ctx.analysis.residual_adds}

    def apply(self) -> None:
        nodes = list(self.graph.nodes)
        self._rotate_root()
        self.ctx.fusion.notes.append(
            f"residual stream (width {self.width}) rotated by Q = random-sign Hadamard, block "
            f"{self.block}, seed {SEED}")
        for node in nodes[nodes.index(self.root) + 1:]:
            if any(source in self.rotated for source in node.all_input_nodes):
                self._visit(node)

    def _rotate_root(self) -> None:
        # Online, on the root's output. For an embedding lookup that is E[ids] Q = (E Q)[ids]:
        # rotating the looked-up rows costs a pass over [tokens, width], folding Q into the
        # table a pass over [vocab, width] at every call (measured on the H100 with a 128256 x
        # 4096 table and 8192 tokens: 18 ms of a 49 ms forward).
        root = self.root
        with self.graph.inserting_after(root):
            rotated_root = self.graph.call_function(rotate, (root, self.signs, self.block))
        # A graph output (returned hidden states) keeps the root itself: it is unrotated already.
        self.ctx.replace_node(root, rotated_root, keep_use=lambda user: user.op == "output")
        self.rotated.add(rotated_root)
        if root.target is not torch.nn.functional.embedding:
            self.ctx.fusion.notes.append(f"stream root {root.name} is not an embedding lookup: "
                                         "rotated online")

    def _visit(self, node: fx.Node) -> None:
        norm = self.norm_of.get(node)
        if norm is not None and norm.input in self.rotated:
            self.rotated.add(norm.output)  # a scale-free RMSNorm commutes with Q
            return
        site = self.linears.get(node)
        if site is not None and site.x in self.rotated and not foldable(site):
            fold_weight(self.ctx, site, rotate, (self.signs, self.block), "Q in")
            self.ctx.fusion.prerotated.add(site.fqn)
            return
        if self._keeps_rotation(node):
            self.rotated.add(node)
            return
        if self._is_stream_add(node):
            self.rotated.add(node)
            return
        self._hand_unrotated(node)

    def _keeps_rotation(self, node: fx.Node) -> bool:
        """An op that commutes with Q along the last dimension: re-layouts and casts that keep
        that dimension whole, eval-mode dropout, scaling by a constant."""
        value = fake_value(node)
        if value is None or value.dim() == 0 or value.shape[-1] != self.width:
            return False
        name = call_target_name(node)
        if name in _SCALINGS:
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            return len(tensors) == 1 and all(isinstance(a, (int, float)) or a is tensors[0]
                                             for a in node.args)
        source = passthrough_input(node)
        if source not in self.rotated:
            return False
        if name == "dropout":
            p, training = node_arg(node, 1, "p"), node_arg(node, 2, "training")
            return p == 0 or training is False
        if name in ("transpose", "permute", "getitem"):
            return _leaves_last_dim(node, fake_value(source).dim())
        return True  # view/reshape/expand/(un)squeeze keeping the width, casts, clone

    def _is_stream_add(self, node: fx.Node) -> bool:
        """`stream + x` stays on the rotated stream: when x is rotated too, when x is written by
        linears that only write here (their output sides are folded), or else x is rotated
        online (a broadcastable tensor of the stream's width)."""
        if call_target_name(node) not in ADD_OPS or len(node.args) < 2:
            return False
        a, b = node.args[:2]
        if not all(isinstance(x, fx.Node) for x in (a, b)):
            return False
        other = b if a in self.rotated else a
        if other in self.rotated:
            return True
        value = fake_value(other)
        if value is None or value.dim() == 0 or value.shape[-1] != self.width:
            return False
        writers = _linear_writers(other, self.linears, {}) if node in self.residual_adds else []
        if writers and all(not foldable(site) and flows_only_into(site.node, node, self.position)
                           for site in writers):
            for site in writers:
                fold_weight(self.ctx, site, rotate_output_side, (self.signs, self.block),
                            "Qᵀ out", bias_fn=rotate)
            return True
        insert_before_use(self.ctx, node, other, rotate, (self.signs, self.block))
        self.ctx.fusion.notes.append(f"{other.name}, added to the stream, rotated online")
        return True

    def _hand_unrotated(self, node: fx.Node) -> None:
        for source in [s for s in node.all_input_nodes if s in self.rotated]:
            if source not in self.unrotated:
                with self.graph.inserting_after(source):
                    self.unrotated[source] = self.graph.call_function(
                        unrotate, (source, self.signs, self.block))
            node.replace_input_with(source, self.unrotated[source])
            self.ctx.fusion.notes.append(f"{node.name} reads the stream: unrotated online")


def _leaves_last_dim(node: fx.Node, source_dims: int) -> bool:
    """Whether a re-layout leaves the source's last dimension in place and whole."""
    name, args = call_target_name(node), node.args[1:]
    last = source_dims - 1
    if name == "transpose":
        return all(d % source_dims != last for d in args if isinstance(d, int))
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return len(dims) > 0 and dims[-1] % source_dims == last
    index = args[0] if isinstance(args[0], tuple) else (args[0],)  # getitem
    if Ellipsis in index or len([i for i in index if i is not None]) == source_dims:
        return isinstance(index[-1], slice) and index[-1] == slice(None)
    return True
