"""ratebench's worker: turning a study spec into trained networks and Optuna results.

- `worker.spec`: the study spec (`StudySpec`), validated with field paths; re-used by the service.
  Stored specs load with `StudySpec.from_stored` (versioned, trusted). Its building blocks and
  limits: `worker.spec_base`; its cross-field checks: `worker.spec_checks`.
- `worker.arms`: the tuners. `worker.arms.base` is the contract the sweep drives (`ArmRun`,
  `Job`), the study names and `best_trial`; `worker.arms.optuna` and
  `worker.arms.hypergradient` (with `hypergradient_arm`, `hypergradient_jobs`) each own their
  spec options, checks, Ray jobs and bookkeeping; `worker.arms.sampling`: the Optuna tuner's
  samplers and pruners.
- `worker.tasks`: datasets × models, all offline (`TASKS`, `describe_tasks`).
- `worker.runner`: `run_trial(TrialConfig, reporter) -> TrialResult`, one training run, no Ray
  and no database inside.
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
