"""Back-matching layer-wise rates: `bmp` (scalar) and `bmp_exact` (damped least squares).

Zhang, Chen, Liu 2018, "On the Local Hessian in Back-propagation" (NeurIPS 2018,
arXiv 1802.09750). Write the network as a chain of blocks `z[l+1] = F_l(W_l, z[l])`. Given a
target shift `Δz[l+1]` of a block's output, back-matching asks for the parameter change and the
input shift that best produce it: `min ‖J_W·ΔW − Δz[l+1]‖²` and `min ‖J_z·Δz[l] − Δz[l+1]‖²`.
One gradient step on those local problems is back-propagation; their exact solutions use the
local Hessians `H_W = J_WᵀJ_W` and `H_z = J_zᵀJ_z`.

- `bmp` (`BackMatching`): replace each batch-averaged local Hessian by a scalar, the mean of its
  spectrum over the directions the block can move (`trace / min dimension`); the algorithm
  becomes SGD with the per-layer rate `lr · (1/s_W(l)) · Π_{blocks k above l} (1/s_z(k))`
  (`propagate=True`) or `lr · 1/s_W(l)` (`propagate=False`, the default). Revision 2: a
  BatchNorm is part of the Linear/Conv block before it and padding taps are not input
  (`.affine`); `mean_over_positions=True` (revision 3, the default) averages a convolution
  block's traces over its output positions instead of summing them. Scalars per layer type:
  `.layers`; the block contract: `.block`; the factor walk: `.plan`; options and the update:
  `.optimizer`. How a model is read (chains, sums of paths, declared slopes): `.structure`.
- `bmp_exact` (`BackMatchingExact`): solve the damped least-squares problems of each block
  directly, for chains of Linear layers and elementwise activations, a chain's target split
  into equal shares (first order): `.exact`.

Both register forward hooks on the model they are built for; `remove_hooks()` detaches them.
"""

from optim.backmatching.exact import BackMatchingExact
from optim.backmatching.optimizer import BackMatching

__all__ = ["BackMatching", "BackMatchingExact"]
