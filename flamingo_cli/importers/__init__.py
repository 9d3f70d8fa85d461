"""Importers of other toolkits' checkpoints: each maps a foreign layout onto our model, strictly."""
