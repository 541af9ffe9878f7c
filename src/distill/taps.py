"""Feature taps: capture intermediate outputs of named modules with forward hooks.

Neither model's ``forward`` changes: a tap names a module by its path in
``model.named_modules()`` (``features.1``, ``encoder.layer.2``) and records its output on
every forward pass. Modules returning tuples (Hugging Face layers) are tapped at element 0.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn

from .errors import DistillError


def tapped_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"cannot tap a module output of type {type(output).__name__}")


class FeatureTaps:
    """Forward hooks on ``names`` of ``model``; ``features`` holds the latest outputs by name."""

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.features: dict[str, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in dict.fromkeys(names):  # unique, in order
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                listing = ", ".join(n for n in list(modules)[1:13] if n)
                raise DistillError(f"{role} has no module named {name!r}{hint} (modules: {listing}, ...)")
            self._handles.append(modules[name].register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def record(module: nn.Module, inputs: object, output: object) -> None:
            self.features[name] = tapped_tensor(output)

        return record

    def take(self) -> dict[str, Tensor]:
        """The features of the last forward pass (and forget them, so they are never stale)."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
