"""Tasks: everything that depends on the modality (images, text classification, sentence embeddings, causal language models).

The core (Distiller, terms, trainer, cache) runs on tensors or mappings of tensors and knows no
modality; a :class:`Task` turns a config's data and model settings into those, and scores the
results. ``task:`` in a config picks one (``image_classification`` by default).
"""

from distill.tasks.base import TASKS, Task, get_task, register_task
from distill.tasks.embedding import TextEmbedding
from distill.tasks.image import ImageClassification
from distill.tasks.lm import CausalLM
from distill.tasks.text import TextClassification

__all__ = [
    "TASKS",
    "CausalLM",
    "ImageClassification",
    "Task",
    "TextClassification",
    "TextEmbedding",
    "get_task",
    "register_task",
]
