"""Parameter controls generated from a method's config dataclass, and the parsing of what a user typed back.

The demo never lists parameters by hand: every field of a registered method's config becomes a control whose kind
follows the field's type (bool, int, float, str, ``Literal``, tuples of scalars, ``X | None``). A field whose type
has no control (e.g. SGL's guide model) is rendered as JSON text when its value is JSON, otherwise it is skipped
and keeps the demo's base value, with a note saying so. So a newly registered method appears with no demo change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlm_accel.config import MethodConfig
from vlm_accel.registry import get_method_class

SCALARS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", Path: "str"}
#: keep ratio the demo's base configs use for methods with a ``keep_ratio`` (through ``sweep_configs``)
DEMO_KEEP_RATIO = 0.25


@dataclass(frozen=True)
class FieldSpec:
    """One control: ``kind`` is bool / int / float / str / choice / tuple / json; ``optional`` means an empty
    control stands for None."""

    name: str
    kind: str
    default: Any
    optional: bool = False
    choices: tuple[Any, ...] = ()
    element_kinds: tuple[str, ...] = ()

    def hint(self) -> str:
        if self.kind == "tuple":
            return f"{self.name} ({', '.join(self.element_kinds)}, comma-separated{'; empty = None' if self.optional else ''})"
        if self.kind == "json":
            return f"{self.name} (JSON)"
        return f"{self.name}{' (empty = None)' if self.optional else ''}"


def base_config(name: str) -> MethodConfig:
    """The demo's starting setting of a method: the first of its ``vlm-accel compare`` settings at keep ratio
    ``DEMO_KEEP_RATIO`` (this wires SGL's testbed guide and DyVTE's shipped routers), other fields at defaults.

    Raises ``MethodNotApplicable`` (e.g. SGL without its guide's weights) like ``sweep_configs`` does.
    """
    return get_method_class(name).sweep_configs((DEMO_KEEP_RATIO,))[0]


def _hints(config_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # an annotation naming something only imported for type checking
        return {f.name: f.type for f in dataclasses.fields(config_cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional  # noqa: UP007
    return tp, False


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _spec(name: str, tp: Any, default: Any) -> FieldSpec | None:
    """The control for one field, or None when neither its type nor its value has one."""
    tp, optional = _unwrap_optional(tp)
    optional = optional or default is None
    if tp in SCALARS:
        return FieldSpec(name, SCALARS[tp], default, optional)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return FieldSpec(name, "choice", default, optional, choices=typing.get_args(tp))
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if args and all(a in SCALARS for a in args):
            kinds = tuple(SCALARS[a] for a in args)
            if Ellipsis in typing.get_args(tp):  # tuple[float, ...]: any length, one element type
                kinds = (kinds[0], "...")
            return FieldSpec(name, "tuple", default, optional, element_kinds=kinds)
    if isinstance(default, bool | int | float | str) and not optional:  # an unresolved annotation: go by value
        return FieldSpec(name, SCALARS[type(default)], default)
    if _is_json(default):
        return FieldSpec(name, "json", default, optional)
    return None


def field_specs(config: MethodConfig) -> tuple[list[FieldSpec], list[str]]:
    """Controls for every field of ``config``'s class (defaults from ``config``), and notes on skipped fields."""
    hints = _hints(type(config))
    specs, notes = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        spec = _spec(f.name, hints.get(f.name, Any), value)
        if spec is None:
            shown = getattr(config, f"{f.name}_name", None) or type(value).__name__
            notes.append(f"`{f.name}` is set by the demo ({shown}); it has no control")
        else:
            specs.append(spec)
    return specs, notes


# ---- parsing what a user entered -----------------------------------------------------------------------------


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(name: str, value: Any, kind: str) -> int | float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if kind == "int":
        if float(value) != int(value):
            raise ValueError(f"{name} must be a whole number, got {value}")
        return int(value)
    return float(value)


def _scalar(name: str, text: str, kind: str) -> Any:
    if kind in ("int", "float"):
        return _number(name, text, kind)
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered not in ("true", "false"):
            raise ValueError(f"{name} must be true or false, got {text!r}")
        return lowered == "true"
    return text.strip()


def parse_value(spec: FieldSpec, value: Any) -> Any:
    """A control's value as the config field expects it; ``ValueError`` with a one-line message if malformed."""
    if spec.kind != "bool" and _empty(value):
        if spec.optional:
            return None
        raise ValueError(f"{spec.name} needs a value")
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        return _number(spec.name, value, spec.kind)
    if spec.kind == "str":
        return str(value)
    if spec.kind == "choice":
        if value not in spec.choices:
            raise ValueError(f"{spec.name} must be one of {list(spec.choices)}, got {value!r}")
        return value
    if spec.kind == "tuple":
        parts = [p for p in str(value).replace("(", "").replace(")", "").split(",") if p.strip()]
        kinds = spec.element_kinds
        if kinds[-1:] == ("...",):
            kinds = (kinds[0],) * len(parts)
        if len(parts) != len(kinds):
            raise ValueError(f"{spec.name} needs {len(kinds)} comma-separated values, got {value!r}")
        return tuple(_scalar(f"{spec.name}[{i}]", p, k) for i, (p, k) in enumerate(zip(parts, kinds)))
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{spec.name} must be JSON: {err.msg}") from None


def control_value(spec: FieldSpec) -> Any:
    """The initial value a control shows for ``spec.default``."""
    if spec.default is None:
        return "" if spec.kind in ("str", "tuple", "json") else None
    if spec.kind == "tuple":
        return ", ".join(str(v) for v in spec.default)  # repr-exact, so an untouched control round-trips
    if spec.kind == "json":
        return json.dumps(spec.default)
    return spec.default


def build_config(base: MethodConfig, specs: list[FieldSpec], values: list[Any]) -> MethodConfig:
    """``base`` with the controls' values; the config's own validation names any field out of range."""
    params = {spec.name: parse_value(spec, value) for spec, value in zip(specs, values)}
    return dataclasses.replace(base, **params)
