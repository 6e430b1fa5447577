"""Components that held models share byte for byte (the VAE and text encoder of a family of fine-tunes, a UNet
registered twice) held once per executor: one set of weight tensors and one module, reference-counted by the models
that use them, freed when the last one goes.

A component's identity is a digest of what makes its module: its class, the dtype and device it is loaded to, and
the sha256 of every file in its directory (config and weights, from the model's manifest). Equal identity means
equal weights and equal config, so one module can stand in every pipeline that has it. Modules held here are never
written by a request: a pipeline that loads LoRA adapters gets private module trees over the same tensors first
(`ModelLoader.apply_adapters`).

Thread-safe: reads run in worker threads, the core's event loop releases."""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ComponentPool", "SharedComponent", "component_id"]


def component_id(library: str, class_name: str, dtype: str, device: str, directory: str,
                 digests: Mapping[str, str]) -> str | None:
    """The identity of the component in `directory` (relative to the view) from the manifest's file digests, or
    None when the manifest names no file there (nothing to compare: the component is not shared)."""
    prefix = directory.rstrip("/") + "/"
    files = sorted((path[len(prefix):], digest) for path, digest in digests.items() if path.startswith(prefix))
    if not files:
        return None
    h = hashlib.sha256(f"{library}\0{class_name}\0{dtype}\0{device}".encode())
    for name, digest in files:
        h.update(f"\0{name}\0{digest}".encode())
    return h.hexdigest()


@dataclass(eq=False)
class SharedComponent:
    """One component's weights as held here: the files' buffers and the tensors viewing them, the module built
    around them (None until a pipeline needs it), and the models that hold it."""

    component_id: str
    name: str  # the component name in the first pipeline that had it (vae, text_encoder, unet, ...)
    files: list[tuple[str, str, Any, tuple[Any, ...]]] = field(repr=False)  # (component, path, buffer, specs), as read
    tensors: dict[str, Any] = field(repr=False)
    nbytes: int
    users: set[str] = field(default_factory=set)  # model keys
    module: Any = field(default=None, repr=False)
    on_device: bool = True
    pipelines: int = 0  # materialized pipelines using `module` (CUDA: the weights stay on the device meanwhile)


class ComponentPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, SharedComponent] = {}

    def __len__(self) -> int:
        return len(self._held)

    def take(self, cid: str | None, user: str) -> SharedComponent | None:
        """The held component `cid` with `user` added to its users, or None when none is held."""
        if cid is None:
            return None
        with self._lock:
            component = self._held.get(cid)
            if component is not None:
                component.users.add(user)
            return component

    def add(self, component: SharedComponent, user: str) -> SharedComponent:
        """Holds `component` for `user`, or, when an equal one arrived meanwhile (two models read at once), adds
        `user` to that one and returns it (the caller drops its own copy)."""
        with self._lock:
            held = self._held.setdefault(component.component_id, component)
            held.users.add(user)
            return held

    def release(self, component: SharedComponent, user: str) -> bool:
        """Drops `user` from the component's users; the last one frees it. Returns whether it was freed."""
        with self._lock:
            component.users.discard(user)
            if component.users:
                return False
            if self._held.get(component.component_id) is component:
                del self._held[component.component_id]
            component.module = None
            return True

    def nbytes(self) -> int:
        """Bytes of every component held, each once."""
        with self._lock:
            return sum(c.nbytes for c in self._held.values())

    def shared(self) -> list[SharedComponent]:
        """The components more than one model holds now."""
        with self._lock:
            return [c for c in self._held.values() if len(c.users) > 1]
