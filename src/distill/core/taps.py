"""Feature taps: capture intermediate outputs of named modules with forward hooks.

Neither model's ``forward`` changes: a tap names a module by its path in
``model.named_modules()`` (``features.1``, ``encoder.layer.2``) and records its output while
the Distiller runs the model (never during evaluation elsewhere). Modules returning tuples
(Hugging Face layers) are tapped at element 0, or at the element a name asks for:
``encoder.layer.2.attention.self[1]`` is element 1 of that module's output (its attention
probabilities, when the model runs with ``output_attentions=True``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from distill.core.errors import DistillError


def split_name(name: str) -> tuple[str, int | None]:
    """``"block[1]"`` -> ``("block", 1)``; ``"block"`` -> ``("block", None)``."""
    match = re.fullmatch(r"(.*)\[(\d+)\]", name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def tapped_tensor(output: object, element: int | None = None) -> Tensor:
    if element is not None:
        if not isinstance(output, (tuple, list)) or element >= len(output) or not isinstance(output[element], Tensor):
            size = len(output) if isinstance(output, (tuple, list)) else "no"
            raise DistillError(
                f"cannot tap element {element} of a module output of type {type(output).__name__} ({size} elements)"
            )
        return output[element]
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"cannot tap a module output of type {type(output).__name__}")


class FeatureTaps:
    """Forward hooks on ``names`` of ``model``; ``recording()`` collects their outputs."""

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.names = list(dict.fromkeys(names))  # unique, in order
        self.role = role
        self._features: dict[str, tuple[Tensor, int]] = {}
        self._recording = False
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.names:
            path, element = split_name(name)
            if path not in modules or path == "":
                close = difflib.get_close_matches(path, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                listing = ", ".join(n for n in list(modules)[1:13] if n)
                raise DistillError(f"{role} has no module named {path!r}{hint} (modules: {listing}, ...)")
            self._handles.append(modules[path].register_forward_hook(self._recorder(name, element)))

    def _recorder(self, name: str, element: int | None):
        def record(module: nn.Module, inputs: object, output: object) -> None:
            if self._recording:
                tensor = tapped_tensor(output, element)
                self._features[name] = (tensor, tensor._version)

        return record

    @contextmanager
    def recording(self) -> Iterator[dict[str, Tensor]]:
        """Record the tapped outputs of the forward pass run inside the block into the yielded dict."""
        self._features, self._recording = {}, True
        features: dict[str, Tensor] = {}
        try:
            yield features
        finally:
            self._recording = False
            recorded, self._features = self._features, {}
        for name, (tensor, version) in recorded.items():
            if tensor._version != version:
                raise DistillError(
                    f"{self.role} module {name!r}: its output was changed in place later in the forward pass "
                    f"(e.g. by ReLU(inplace=True)); tap the module after it, such as the enclosing block"
                )
            features[name] = tensor

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
