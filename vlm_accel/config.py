"""Typed, validated, JSON round-trippable method configurations.

Every method is fully described by one dataclass (the PEFT / torchao idiom): it validates in ``__post_init__``,
prints readably, and round-trips through :meth:`MethodConfig.to_json` / :meth:`MethodConfig.from_json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar


class MethodConfig:
    """Base class of every method configuration (subclasses are ``@dataclass``-decorated).

    Subclasses set ``method_name`` (the registry key) and override :meth:`validate`.
    """

    method_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the offending field; the default accepts everything."""

    def label(self) -> str:
        """A short name for tables and plots (methods with a mode switch add it)."""
        return self.method_name

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method_name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"a method config must be a mapping (a JSON object), got {type(data).__name__}")
        data = dict(data)
        name = data.pop("method", cls.method_name)
        if cls is MethodConfig:
            from vlm_accel.registry import get_config_class

            return get_config_class(name).from_dict(data)
        if name != cls.method_name:
            raise ValueError(f"config is for method {name!r}, not {cls.method_name!r}")
        check_known_params(cls, data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MethodConfig:
        return cls.from_dict(json.loads(text))


def field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def check_known_params(config_cls: type, params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(field_names(config_cls)))
    if unknown:
        raise TypeError(
            f"unknown parameter(s) {unknown} for method {config_cls.method_name!r}; "
            f"its parameters are {field_names(config_cls)}"
        )


# ---- field validators (each raises with the field name in the message) -------------------------------------


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_ratio(name: str, value: Any) -> None:
    """A keep ratio: a number in (0, 1]."""
    value = check_number(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
