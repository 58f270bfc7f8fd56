"""ratebench's worker: turning a study spec into trained networks and Optuna results.

- `worker.spec`: the study spec (`StudySpec`), validated with field paths; re-used by the service.
  Stored specs load with `StudySpec.from_stored` (versioned, trusted). Its building blocks and
  limits: `worker.spec_base`, `worker.spec_options`, `worker.spec_schedule`; its cross-field
  checks: `worker.spec_checks`.
- `worker.arms`: the tuners, named in one registry (`worker.arms.TUNERS`). `worker.arms.base` is
  the contract the sweep drives (`ArmRun`, `Job`), the study names and `best_trial`;
  `worker.arms.optuna` and `worker.arms.hypergradient` are packages laid out alike (`spec`,
  `checks`, `arm`), each owning its spec options, checks, Ray jobs and bookkeeping.
- `worker.tasks`: tasks (datasets × models, with their loss and metrics) behind one contract,
  ratebench's own and plugins', found through the entry-point group `ratebench.tasks`
  (`tasks()`, `get_task`, `describe_tasks`).
- `worker.runner`: `run_trial(TrialConfig, reporter) -> TrialResult`, one training run, no Ray
  and no database inside; `worker.cohort`: K of them as one batched model; both through the one
  loop of `worker.training` (what a trial returns: `worker.trial`).
- `worker.sweep`: `run_study(spec, storage_url, study_key, ...)`, the arms' sweeps and final seeds
  as Ray tasks (`worker.remote`), with the driver as the only database writer; it returns the
  leaderboard rows. `worker.failures`: which failed trials are retried.
- `worker.slots`: the trial gate that shares the cluster's slots fairly between the studies
  one scheduler runs at once (`TrialGate`, a study's seat `StudySlots`).
- `worker.summary`: leaderboard rows per arm (`summarize_study`).
- `worker.results`: every trial with its recorded attributes (`load_trials`).
- `worker.storage`: the Optuna storage the worker opens, with bounded connections.

Submodules are imported on use, so `import worker.spec` starts no Ray and imports neither
Optuna nor PyTorch.
"""

__all__ = [
    "arms",
    "failures",
    "remote",
    "results",
    "runner",
    "slots",
    "spec",
    "spec_base",
    "spec_checks",
    "storage",
    "summary",
    "sweep",
    "tasks",
]
