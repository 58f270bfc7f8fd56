"""How `bmp` and `bmp_exact` read a model: a tree of chains, sums of paths, and leaf layers.

Back-matching needs the order in which blocks compose, which a generic `nn.Module.forward`
does not reveal. So the model is read from declarations, never guessed from code:

- `nn.Sequential` is a chain: its children applied in order;
- a module with `backmatching_paths() -> list[nn.Module]` (e.g. `optim.Residual`) is a sum:
  its output is the sum of those paths, each applied to the module's input;
- a module with `backmatching_slope(u) -> Tensor` is an elementwise activation with that slope;
- a module of a type the caller supports (`known`) is a leaf;
- a module with no parameters or buffers of its own and exactly one child is a wrapper around
  that child (a user's `class Net(nn.Module)` holding one `nn.Sequential`): a choice, stated
  here, since such a wrapper's `forward` is taken to be the child's;
- anything else is a `ValueError` naming the module's path and type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from optim._checks import UnsupportedModelError

__all__ = ["Chain", "Leaf", "Node", "Paths", "leaves", "parse"]


@dataclass(frozen=True)
class Leaf:
    """One layer whose scalars the optimizer computes; `path` is its name in the model.

    `norm` is a normalisation layer applied right after `module` and read as part of the same
    block (`bmp` folds `Linear/Conv → BatchNorm` into one block; `norm_path` names it)."""

    path: str
    module: nn.Module
    norm: nn.Module | None = None
    norm_path: str = ""


@dataclass(frozen=True)
class Chain:
    """Blocks applied one after the other (input first)."""

    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Paths:
    """A block whose output is the sum of `paths`, each applied to the block's input."""

    path: str
    paths: tuple[Node, ...]


Node = Leaf | Chain | Paths


def describe(path: str, module: nn.Module) -> str:
    """`features.3 (Conv2d)`: how errors name a module."""
    return f"{path or 'model'} ({type(module).__name__})"


_ADVICE = (
    "use nn.Sequential, optim.Residual and supported layers, or give the module "
    "backmatching_paths() (a sum of paths) or backmatching_slope(u) (an elementwise activation)"
)


def parse(
    model: nn.Module, scheme: str, known: Callable[[nn.Module], bool], advice: str = _ADVICE
) -> Node:
    """Read `model` into a tree; `known` says which leaf layer types the scheme supports and
    `advice` ends the error for anything else."""
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> Node:
        if id(module) in seen and not _stateless(module):
            raise UnsupportedModelError(
                scheme,
                f"{describe(path, module)}: the same module is used twice; "
                "back-matching needs each layer once",
            )
        seen.add(id(module))
        if hasattr(module, "backmatching_paths"):
            _no_own_parameters(scheme, path, module)
            paths: list[nn.Module] = list(module.backmatching_paths())  # type: ignore[operator]
            if not paths:
                raise UnsupportedModelError(
                    scheme, f"{describe(path, module)}: no backmatching_paths()"
                )
            named = [(p, _name(names, p, path, i)) for i, p in enumerate(paths)]
            return Paths(path, tuple(visit(p, name) for p, name in named))
        if hasattr(module, "backmatching_slope") or known(module):
            return Leaf(path, module)
        if isinstance(module, nn.Sequential):
            # `_modules`, not `named_children()`: a module placed twice must appear twice.
            steps = [(n, m) for n, m in module._modules.items() if m is not None]
            return Chain(tuple(visit(m, _join(path, n)) for n, m in steps))
        children = list(module.named_children())
        if len(children) == 1 and _stateless(module):
            name, child = children[0]
            return visit(child, _join(path, name))
        raise UnsupportedModelError(
            scheme, f"{describe(path, module)}: unsupported layer type; {advice}"
        )

    return visit(model, "")


def leaves(node: Node) -> list[Leaf]:
    """The leaves of the tree in forward order (within a sum: path by path)."""
    if isinstance(node, Leaf):
        return [node]
    children = node.nodes if isinstance(node, Chain) else node.paths
    return [leaf for child in children for leaf in leaves(child)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _name(names: dict[int, str], module: nn.Module, parent: str, index: int) -> str:
    return names.get(id(module), _join(parent, f"paths[{index}]"))


def _stateless(module: nn.Module) -> bool:
    """No parameters or buffers of its own (children may have some)."""
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return not own


def _no_own_parameters(scheme: str, path: str, module: nn.Module) -> None:
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        raise UnsupportedModelError(
            scheme,
            f"{describe(path, module)}: a sum of paths cannot hold trainable "
            "parameters of its own; put them inside a path",
        )
