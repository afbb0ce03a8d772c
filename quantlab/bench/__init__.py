"""Scoring: perplexity, speed and size of a (reloaded) model."""
