"""`Residual`: the residual container that back-matching understands.

`Residual(branch)` computes `x + branch(x)`; `Residual(branch, shortcut)` computes
`shortcut(x) + branch(x)` (a projection shortcut, e.g. a 1×1 convolution where a ResNet block
changes width or resolution). Both are sums of paths applied to the same input, which is what
`backmatching_paths()` declares: the back-matching scalar of the block is
`s_z = Σ_paths Π(s_z of the path's blocks)`, i.e. `1 + Π(branch s_z)` for the identity shortcut
(He, Zhang, Ren, Sun 2015, arXiv 1512.03385 for the block; docs/design.md for the scalar).

No activation follows the sum here: put it after the block (`nn.Sequential(Residual(...),
nn.ReLU())`), so every piece of the network stays a module whose scalar is known.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """`forward(x) = shortcut(x) + branch(x)`; the shortcut defaults to the identity."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.branch(x)

    def backmatching_paths(self) -> list[nn.Module]:
        """The block's output is the sum of these paths, each applied to the block's input."""
        return [self.shortcut, self.branch]
