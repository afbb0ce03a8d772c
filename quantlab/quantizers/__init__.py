"""Quantizer backends. See :mod:`quantlab.quantizers.base` for the interface."""
