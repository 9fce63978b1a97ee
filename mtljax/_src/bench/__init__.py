"""Fair benchmarks of multi-task methods: single-task baselines, Δm%, seeds, validation-based
model selection.

For each problem, every method trains the same model, on the same batches, for the same number
of steps, from the same initial parameters of each seed. The comparison follows the protocol of
Maninis et al., "Attentive Single-Tasking of Multiple Tasks" (CVPR 2019) and Navon et al.,
"Multi-Task Learning as a Bargaining Game" (ICML 2022):

* **Single-task baselines**: one model per task, the same architecture and budget, trained on
  that task alone (the multi-task model with weights ``eₜ``: only task ``t``'s loss reaches the
  shared trunk, the other heads receive no gradient). Each baseline is a separate run from the
  seed's initial parameters.
* **Model selection on validation only**: every ``eval_every`` steps the model is scored on the
  validation split (the main tasks' validation Δm% against the baselines' validation metrics);
  the best parameters are kept, and the test split is read once, at the end, for those.
* **Δm%** (Maninis et al. 2019) over the main tasks ``t = 1..T``:

      Δm% = (1/T) Σₜ (−1)^{hₜ} (M_{m,t} − M_{b,t}) / M_{b,t} × 100,

  ``hₜ = 1`` when higher is better for task ``t``'s metric, ``M_{b,t}`` the single-task
  baseline's test metric (its mean over seeds). Lower is better; 0 is single-task
  performance. Reported as mean ± standard error over seeds.
* Auxiliary tasks are trained but excluded from Δm% and model selection; the report compares
  the main tasks with their single-task baselines, and with equal weighting of the main tasks
  alone (``ew [main only]``), to say whether the auxiliary tasks helped.

Each run between two validation evaluations is one jitted :meth:`mtljax.TrainStep.scan`. A
baseline keeps the checkpoint best on its own task's validation metric. The step time is the
median over chunks of (chunk wall time / steps), leaving out each compiled step's first chunk;
``rank`` orders methods by mean Δm%, ``mean_rank`` (MR) averages their ranks on each main
task's test metric. Gradient conflicts (pairwise cosines of the task gradients w.r.t. the
shared parameters) are measured at every evaluation on a fixed probe set of training batches.

The package: :mod:`~mtljax._src.bench.stats` (Δm%, means ± s.e., ranks),
:mod:`~mtljax._src.bench.suites` (what each suite runs), :mod:`~mtljax._src.bench.run` (baselines,
methods over seeds, suites), :mod:`~mtljax._src.bench.report` (text and JSON),
:mod:`~mtljax._src.bench.plots` (figures) and :mod:`~mtljax._src.bench.published` (published
results with their sources, rank correlation). A suite's problem may carry a plateau
learning-rate schedule (:class:`~mtljax._src.bench.suites.Plateau`); each problem's report
gives the share of the step time spent building batches (``data``).
"""
