"""The public verbs: :func:`patch_model` and :func:`unpatch_model`, and the :class:`Patch` handle."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from vlm_accel.config import MethodConfig, check_known_params, field_names
from vlm_accel.methods.base import Method
from vlm_accel.patches import adapter_for
from vlm_accel.registry import get_method_class
from vlm_accel.runtime.engine import Runtime
from vlm_accel.runtime.state import StreamState
from vlm_accel.runtime.stats import PatchStats

PATCH_ATTRIBUTE = "_vlm_accel_patch"

MethodSpec = str | MethodConfig


class Patch:
    """A live patch on a model. Use as a context manager, or call :meth:`remove`."""

    def __init__(self, model: nn.Module, configs: list[MethodConfig], runtime: Runtime) -> None:
        self.model = model
        self.configs = configs
        self._runtime = runtime

    @property
    def config(self) -> MethodConfig | list[MethodConfig]:
        """The method's config (a list when methods were composed)."""
        return self.configs[0] if len(self.configs) == 1 else list(self.configs)

    @property
    def methods(self) -> list[Method]:
        return list(self._runtime.methods)

    @property
    def stats(self) -> PatchStats:
        return self._runtime.stats

    @property
    def active(self) -> bool:
        return getattr(self.model, PATCH_ATTRIBUTE, None) is self

    def reset_stats(self) -> None:
        self._runtime.stats = PatchStats()

    @contextmanager
    def stream(self) -> Iterator[StreamState]:
        """Carry method state across ``generate()`` / forward calls, e.g. one frame per call of a robot episode
        (TTF). Outside a stream every call stands alone. ``reset()`` starts a new episode inside it; a batch may
        carry one stream per row (methods keep per-row state)."""
        if not self.active:
            raise RuntimeError("this patch was removed; a stream needs an active patch")
        if self._runtime.stream is not None:
            raise RuntimeError("a stream is already open on this patch; close it before opening another")
        stream = StreamState()
        self._runtime.stream = stream
        try:
            yield stream
        finally:
            self._runtime.stream = None

    def reset(self) -> None:
        """Start a new episode in the open stream (forget previous frames); an error outside ``stream()``."""
        if self._runtime.stream is None:
            raise RuntimeError("no stream is open: use `with patch.stream(): ...` to carry state across calls")
        self._runtime.stream.reset()

    def remove(self) -> None:
        """Remove every hook and restore the original attention implementation (bitwise-identical outputs)."""
        if not self.active:
            return
        self._runtime.remove()
        delattr(self.model, PATCH_ATTRIBUTE)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Patch({', '.join(repr(c) for c in self.configs)}, {state})"


def _resolve_configs(method: MethodSpec | Sequence[MethodSpec], params: dict[str, Any]) -> list[MethodConfig]:
    if isinstance(method, MethodConfig):
        if params:
            raise TypeError(f"pass parameters inside the config object, not as keywords: {sorted(params)}")
        return [method]
    if isinstance(method, str):
        config_cls = get_method_class(method).config_cls
        check_known_params(config_cls, params)
        return [config_cls(**params)]
    if isinstance(method, Sequence) and method:
        names = [m for m in method if isinstance(m, str)]
        unused = set(params)
        configs: list[MethodConfig] = []
        for item in method:
            if isinstance(item, MethodConfig):
                configs.append(item)
                continue
            if not isinstance(item, str):
                raise TypeError(f"each method must be a registered name or a MethodConfig, got {type(item).__name__}")
            config_cls = get_method_class(item).config_cls
            mine = {k: v for k, v in params.items() if k in field_names(config_cls)}
            unused -= set(mine)
            configs.append(config_cls(**mine))
        if unused:
            raise TypeError(f"parameter(s) {sorted(unused)} match none of the methods {names}")
        return configs
    raise TypeError(
        f"method must be a registered name, a MethodConfig or a non-empty list of them, got {type(method).__name__}"
    )


def check_composition(methods: list[Method]) -> None:
    """Refuse only compositions that are ill-defined, saying why. Selection methods compose as successive stages
    (each acts on what the previous kept); reweighting and gates compose with anything."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"a method can appear only once in a composition, got {names}")
    selecting = [m for m in methods if m.changes_length]
    merging = [m for m in selecting if m.merges_tokens]
    if merging and len(selecting) > 1:
        raise ValueError(
            f"{merging[0].name} averages each image's full visual-token grid, so it cannot be composed with another "
            f"token-selection method ({[m.name for m in selecting if m is not merging[0]]}): the other would leave "
            "it a partial grid, or pool tokens it had already merged"
        )


def patch_model(model: nn.Module, method: MethodSpec | Sequence[MethodSpec], **params: Any) -> Patch:
    """Patch ``model`` in place with one method (a registered name or a config) or a list of methods.

    Example: ``patch = patch_model(model, "fastv", layer=2, keep_ratio=0.25)``; then ``model.generate(...)`` as
    usual, ``patch.stats`` for what it did, ``patch.remove()`` (or ``unpatch_model(model)``) to restore it.
    A model that is already patched raises: remove the patch first, or pass a list to compose methods.
    """
    adapter = adapter_for(model)
    if getattr(model, PATCH_ATTRIBUTE, None) is not None:
        raise ValueError(
            "model is already patched by vlm_accel; call unpatch_model(model) first, "
            "or pass a list of methods to patch_model to compose them"
        )
    configs = _resolve_configs(method, params)
    methods = [get_method_class(config.method_name)(config) for config in configs]
    check_composition(methods)
    runtime = Runtime(model, adapter, methods)
    try:
        runtime.install()
    except Exception:
        runtime.remove()
        raise
    patch = Patch(model, configs, runtime)
    setattr(model, PATCH_ATTRIBUTE, patch)
    return patch


def unpatch_model(model: nn.Module) -> None:
    """Remove the vlm_accel patch from ``model`` (a no-op on an unpatched model)."""
    patch = getattr(model, PATCH_ATTRIBUTE, None)
    if patch is not None:
        patch.remove()


def get_patch(model: nn.Module) -> Patch | None:
    """The active patch on ``model``, if any."""
    return getattr(model, PATCH_ATTRIBUTE, None)
