"""The names of a run directory's top-level entries, in one home (a leaf module: the recipe's
validation reserves them, :class:`quantlab.rundir.RunDir` builds paths from them; the layout
itself is drawn in :mod:`quantlab.rundir`'s docstring)."""

#: the run's own top-level entries; a method directory, named by its label,
#: must not collide with any of them (recipe.RESERVED_LABELS is derived from this)
RUN_ENTRIES = frozenset({
    "plan.json", "plan.safetensors", "recipe.yaml", "environment.json", "calibration.json",
    "reference", "allocation", "results.csv", "results.parquet", "results.md", "report.html",
    "plots"})
#: what a several-models run (pipeline.run_models) writes beside its models' run directories
CONTAINER_ENTRIES = frozenset({"report", "methods_x_models.csv"})
