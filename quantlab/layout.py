"""The names of a run directory's entries, in one home (a leaf module: the recipe's
validation reserves them, :class:`quantlab.rundir.RunDir` builds paths from them, the report
reads a run's files by them; the layout itself is drawn in :mod:`quantlab.rundir`'s
docstring)."""

# ------------------------------------------------------------------ the run's own entries
PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"
RECIPE = "recipe.yaml"
ENVIRONMENT = "environment.json"
CALIBRATION = "calibration.json"
REFERENCE = "reference"
#: the float model's own KL in another dtype (quantlab.scoring.noise_floor)
NOISE_FLOOR = "noise_floor.json"
ALLOCATION = "allocation"
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
PLOTS = "plots"

#: the run's own top-level entries; a method directory, named by its label,
#: must not collide with any of them (recipe.RESERVED_LABELS is derived from this)
RUN_ENTRIES = frozenset(
    {
        PLAN_JSON,
        PLAN_TENSORS,
        RECIPE,
        ENVIRONMENT,
        CALIBRATION,
        REFERENCE,
        NOISE_FLOOR,
        ALLOCATION,
        RESULTS_CSV,
        RESULTS_PARQUET,
        RESULTS_MD,
        REPORT_HTML,
        PLOTS,
    }
)
#: what a several-models run (pipeline.run_models) writes beside its models' run directories
CONTAINER_ENTRIES = frozenset({"report", "methods_x_models.csv"})

# ------------------------------------------------------------------ one method's entries
CHECKPOINT = "checkpoint"
#: written last into a checkpoint directory: the sha256 of every file (quantlab.checkpoint)
SIDECAR = "quantlab.json"
#: the method's metrics; written last, it marks the method done
METRICS = "metrics.json"
#: written after a method's checkpoint is exported: what a resumed run needs to skip the
#: sensitivity pass, quantization and export (options as resolved, stage times, layer stats)
EXPORT_RECORD = "export.json"
#: why the method failed (distributed runs)
ERROR = "error.json"
#: who works on the method now (quantlab.runner.note_running)
RUNNING = "running.json"
SENSITIVITY = "sensitivity.json"
