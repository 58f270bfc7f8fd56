"""The hypergradient tuner (`tuner: "hypergradient"`): an arm's per-layer, per-step SGD schedule
learned by exact hypergradients through reversible training (`optim.hypergrad`). Its arm in a
spec (`spec`), the spec's checks it owns (`checks`), its run and jobs on the driver's side
(`arm`), and what its Ray tasks run (`jobs`). This `__init__` imports nothing.
"""
