"""A model read for `bmp`: its blocks, hooks, and the per-parameter factor of each step.

The parsed tree (`.structure`) is first *fused*: in every chain, a Linear or Conv followed
directly by a BatchNorm becomes one leaf (revision 2: a normalisation belongs to the block
before it, `.affine`). `Plan.scalars()` gathers every block's scalars into one flat list (per
block: `s_z`, then the `s_W` of each of its parameters) in two halves, `gather()` (the
statistics as tensors) and `combine()` (Python floats), so that a stack of models can run the
first once under `vmap` and the second per member (`.batched`). `Plan.factors(s, propagate)`
walks the tree from the output down:

    propagate=True:  factor(parameter of block l) = (1 / s_W) · Π_{blocks k above l} (1 / s_z(k))
    propagate=False: factor(parameter of block l) = 1 / s_W

where a chain multiplies its blocks' `s_z`, a sum of paths adds its paths' `s_z`, and a
parameter inside a path sees the path's blocks above it times everything above the sum.
A zero scalar gives an infinite factor (the optimizer's clamp bounds it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from optim._checks import UnsupportedModelError
from optim.backmatching.layers import AFFINE, NORMS, Block, make_block, supported
from optim.backmatching.structure import Chain, Leaf, Node, Paths, describe, leaves, parse

__all__ = ["Plan"]

_Program = int | list["_Program"] | tuple["_Program", ...]


class Plan:
    """The blocks of `model`, hooked; parameters in a fixed order with their names."""

    def __init__(self, model: nn.Module, scheme: str = "bmp") -> None:
        self.scheme = scheme
        self.tree: Node = fuse(parse(model, scheme, supported))
        tree_leaves = leaves(self.tree)
        self.blocks: list[Block] = [make_block(leaf) for leaf in tree_leaves]
        self._index = {id(leaf): i for i, leaf in enumerate(tree_leaves)}
        self._check_reuse()
        self.params: list[nn.Parameter] = []
        self.names: list[str] = []
        self.slots: list[list[int]] = []  # per block: index into params per s_W, -1 if frozen
        self._collect_parameters(model)
        self.offsets: list[int] = []
        offset = 0
        for block in self.blocks:
            self.offsets.append(offset)
            offset += 1 + block.n_params
        self.size = offset
        # per block: (index into params, index into s of that parameter's s_W), trainable only
        self._targets = [
            [(slot, off + 1 + j) for j, slot in enumerate(slots) if slot >= 0]
            for off, slots in zip(self.offsets, self.slots, strict=True)
        ]
        self._program = self._compile(self.tree)
        self._weight_index: list[int] = []  # per block: its weight's norm in `gather()`'s
        self._n_weights = 0
        for block in self.blocks:
            has_weight = block.weight() is not None
            self._weight_index.append(self._n_weights if has_weight else -1)
            self._n_weights += has_weight
        self._layout: list[tuple[int, int, bool]] = []  # per hooked block, from `gather()`
        self._hooked = [b for b in self.blocks if b.hooked]
        self.handles: list[RemovableHandle] = []
        for b in self._hooked:
            self.handles += b.register()

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def scalars(self, mean: bool = False) -> list[float]:
        """Every block's scalars from the statistics recorded since the last call (`mean`:
        means over output positions instead of sums, `mean_over_positions`).

        The weights and the layer inputs waiting for their norms are reduced in one
        multi-tensor call, and every value reaches Python together: on a small network the
        per-call overhead, not the arithmetic, is what this costs."""
        s = self.combine(_floats(self.gather()), mean)
        self.reset()
        return s

    def gather(self, fused: bool = True) -> list[Tensor]:
        """The 0-d tensors the scalars are made of, in the order `combine` reads them: the
        norms of the weights, then of the inputs waiting for theirs, then per hooked block its
        recorded values and its `finish()` values.

        Weights are read from the modules at this call, so inside `torch.func.functional_call`
        they are the parameters it was given, and under `vmap` every tensor here is one per
        member (`optim.backmatching.batched`, which passes `fused=False`: vmap has no rule for
        the multi-tensor norm)."""
        self._require_records()
        hooked = self._hooked
        weights = [w for block in self.blocks if (w := block.weight()) is not None]
        reduce = weights + [block.pending for block in hooked if block.pending is not None]
        if not reduce:
            tensors: list[Tensor] = []
        elif fused:
            tensors = list(torch._foreach_norm(reduce))
        else:
            tensors = [torch.linalg.vector_norm(t) for t in reduce]
        self._layout = []
        for block in hooked:
            finished = block.finish()
            waiting = block.pending is not None
            if block.pending is not None:
                block.counts.append(block.pending.numel())
            self._layout.append((len(block.values), len(finished), waiting))
            tensors += block.values
            tensors += finished
        return tensors

    def combine(self, values: list[float], mean: bool = False) -> list[float]:
        """The flat scalar list (per block `s_z`, then each parameter's `s_W`) from the values
        of the last `gather()`, as floats; reads the blocks' counts and sizes, changes nothing."""
        layout = iter(self._layout)
        next_pending = self._n_weights
        position = next_pending + sum(waiting for _, _, waiting in self._layout)
        s: list[float] = []
        for block, w in zip(self.blocks, self._weight_index, strict=True):
            own: list[float] = []
            extra: list[float] = []
            if block.hooked:
                n, k, waiting = next(layout)
                own = values[position : position + n]
                extra = values[position + n : position + n + k]
                position += n + k
                if waiting:
                    own.append(values[next_pending])
                    next_pending += 1
            norm = values[w] if w >= 0 else 0.0
            s_z, s_w = block.scalars(own, extra, norm * norm, mean)
            s.append(s_z)
            s += s_w
        return s

    def reset(self) -> None:
        """Forget the statistics recorded since the last step."""
        for block in self._hooked:
            block.reset()
        self._layout = []

    def _require_records(self) -> None:
        for block in self._hooked:
            missing = block.missing()
            if missing is not None:
                raise RuntimeError(
                    f"{self.scheme}: {missing}: no forward pass with gradients enabled since "
                    "the last step; run forward and backward before step()"
                )

    def factors(self, s: list[float], propagate: bool = True) -> list[float]:
        """The factor of each parameter in `params` order, for the flat scalar list `s`;
        `propagate=False`: each block's own `1/s_W` only."""
        out = [1.0] * len(self.params)
        if propagate:
            self._assign(self._program, 1.0, s, out)
            return out
        for targets in self._targets:
            for slot, k in targets:
                out[slot] = 1.0 / s[k] if s[k] != 0.0 else math.inf
        return out

    def _compile(self, node: Node) -> _Program:
        """The tree with leaves as block indices, chains as lists (output side first, nested
        chains merged) and sums as tuples: what `_assign` walks every step."""
        if isinstance(node, Leaf):
            return self._index[id(node)]
        if isinstance(node, Chain):
            steps: list[_Program] = []
            for child in reversed(node.nodes):
                compiled = self._compile(child)
                steps += compiled if isinstance(compiled, list) else [compiled]
            return steps
        return tuple(self._compile(path) for path in node.paths)

    def _assign(self, node: _Program, upstream: float, s: list[float], out: list[float]) -> float:
        """Set the factors of `node`'s parameters given the product above it; return its s_z."""
        if isinstance(node, tuple):
            return sum(self._assign(path, upstream, s, out) for path in node)
        total = 1.0
        for step in node if isinstance(node, list) else [node]:
            if isinstance(step, int):
                for slot, k in self._targets[step]:
                    out[slot] = upstream / s[k] if s[k] != 0.0 else math.inf
                s_z = s[self.offsets[step]]
            else:
                s_z = self._assign(step, upstream, s, out)
            total *= s_z
            upstream = upstream / s_z if s_z != 0.0 else math.inf
        return total

    def _check_reuse(self) -> None:
        owners: dict[int, Block] = {}
        for block in self.blocks:
            for module in block.modules():
                first = owners.setdefault(id(module), block)
                if first is not block and block.hooked:
                    raise UnsupportedModelError(
                        self.scheme,
                        f"{describe(block.path, block.module)}: the same module "
                        f"is also used as {first.path}; back-matching needs each layer once",
                    )

    def _collect_parameters(self, model: nn.Module) -> None:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        owner: dict[int, str] = {}
        for block in self.blocks:
            slots = []
            for local, p in block.params():
                if id(p) in owner:
                    raise UnsupportedModelError(
                        self.scheme,
                        f"parameter {names.get(id(p), local)!r} is shared by "
                        f"{owner[id(p)]} and {block.path}; tied weights are not supported",
                    )
                owner[id(p)] = block.path
                slots.append(len(self.params) if p.requires_grad else -1)
                if p.requires_grad:
                    self.params.append(p)
                    self.names.append(names.get(id(p), f"{block.path}.{local}"))
            self.slots.append(slots)
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in owner:
                raise UnsupportedModelError(
                    self.scheme,
                    f"parameter {name!r} is not in a layer back-matching "
                    "understands (a sum of paths or an activation cannot train parameters)",
                )
        if not self.params:
            raise UnsupportedModelError(self.scheme, "the model has no trainable parameters")


def fuse(node: Node) -> Node:
    """The tree with every `Linear/Conv → BatchNorm` pair of a chain read as one leaf (the
    BatchNorm must normalise the layer's output channels)."""
    if isinstance(node, Leaf):
        return node
    if isinstance(node, Paths):
        return Paths(node.path, tuple(fuse(p) for p in node.paths))
    steps: list[Node] = []
    for child in (fuse(c) for c in node.nodes):
        before = steps[-1] if steps else None
        if isinstance(child, Leaf) and isinstance(before, Leaf) and _fusable(before, child):
            steps[-1] = Leaf(before.path, before.module, child.module, child.path)
        else:
            steps.append(child)
    return Chain(tuple(steps))


def _fusable(layer: Leaf, norm: Leaf) -> bool:
    if layer.norm is not None or type(layer.module) not in AFFINE:
        return False
    if type(norm.module) not in NORMS or hasattr(norm.module, "backmatching_slope"):
        return False
    out = getattr(layer.module, "out_features", None) or layer.module.out_channels
    return bool(norm.module.num_features == out)


def _floats(tensors: list[Tensor]) -> list[float]:
    """0-d tensors to Python floats with one device synchronisation where possible."""
    if not tensors:
        return []
    first = tensors[0]
    if first.device.type == "cpu":
        return [t.item() for t in tensors]  # cheaper than stacking a few scalars
    if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        values: list[float] = torch.stack(tensors).tolist()
        return values
    return [float(t) for t in tensors]
