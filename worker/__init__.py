"""ratebench's worker: turning a study spec into trained networks and Optuna results.

- `worker.spec`: the study spec (`StudySpec`), validated with field paths; re-used by the service.
- `worker.tasks`: datasets × models, all offline (`TASKS`, `describe_tasks`).
- `worker.runner`: `run_trial(TrialConfig, reporter) -> TrialResult`, one training run, no Ray
  and no database inside.
- `worker.sweep`: `run_study(spec, storage_url, study_key, ...)`, the arms' Optuna sweeps and
  final seeds as Ray tasks, with the driver as the only database writer.
- `worker.summary`: leaderboard rows per arm (`summarize_study`).
- `worker.results`: every trial with its recorded attributes (`load_trials`).
- `worker.storage`: the Optuna storage the worker opens, with bounded connections.

Submodules are imported on use, so `import worker.spec` does not start Ray.
"""

__all__ = ["results", "runner", "spec", "storage", "summary", "sweep", "tasks"]
