"""The Optuna tuner (`tuner: "optuna"`, the default): a sweep of the arm's search space by
the spec's sampler. Its arm in a spec (`spec`), the spec's checks it owns (`checks`), its run
and jobs (`arm`), its samplers and pruners (`sampling`). This `__init__` imports nothing.
"""
