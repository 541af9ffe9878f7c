"""The modality-free core: model inputs and outputs, batches and splits, teacher signals, feature
taps, adapters, loss terms and the :class:`~distill.core.distiller.Distiller`. It imports nothing
from the layers above it (tasks, cache, train, pipeline, workflows, report, cli)."""
