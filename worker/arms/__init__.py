"""The tuners: how an arm's sweep study is filled, and everything each tuner owns.

- `worker.arms.base`: the contract the driver (`worker.sweep`) drives — `ArmRun` (an arm's two
  Optuna studies, its final seeds, its counts), `Job` and `Assignment` (work handed to Ray and
  where its news goes) — the study names (`sweep_study_name`, `final_study_name`) and
  `best_trial`.
- `worker.arms.optuna`: `tuner: "optuna"`, a sweep of the search space by the spec's sampler
  (`worker.arms.sampling`): its spec checks and `OptunaArmRun`.
- `worker.arms.hypergradient`: `tuner: "hypergradient"`'s spec options and checks;
  `worker.arms.hypergradient_arm`: its `HypergradArmRun`; `worker.arms.hypergradient_jobs`: what
  its Ray tasks run (the tuning, and a schedule retrained on a final seed).

A new tuner is an arm model (an `worker.spec_base.ArmSpecBase` subclass, tagged in
`worker.spec.ArmSpec`), a module with `check_arm` and `check_build` (`worker.spec_checks.TUNERS`)
and an `ArmRun` subclass (`worker.sweep`). This package's `__init__` imports nothing:
`worker.spec` imports `worker.arms.hypergradient` for its arm without Optuna or PyTorch.
"""
