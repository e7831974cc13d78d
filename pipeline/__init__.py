"""The nerve-segmentation pipeline as a plain library: data, validation, preprocessing,
model, training, evaluation and registry. It knows nothing of Prefect; ``flows/`` composes it."""

__version__ = "0.1.0"
