"""Where to deploy: does a run's row fit on a card, and how fast could it run there. A labelled
*projection* from datasheet figures and efficiencies fitted to published measurements, never a
measurement (docs/hardware.md).

Modules, one job each: ``cards`` (the cards as data, users' card files), ``shape`` (a model's
shape from its config.json), ``rows`` (a run's rows: bytes held and read per engine),
``projection`` (fit and speed arithmetic), ``anchors`` (published measurements with sources),
``efficiency`` (the fitted profiles), ``machine`` (this host as a card), ``deploy`` (rows x
cards -> records), ``command`` (``quantlab hardware``).
"""
