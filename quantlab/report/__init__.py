"""Tables (and, later, plots and HTML) built from a run directory's results."""
