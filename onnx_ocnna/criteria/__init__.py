"""Importance criteria: one registry from name to class (see base.py for the interface)."""

from __future__ import annotations

from onnx_ocnna.criteria.base import Accumulator, Criterion, MemberInfo

CRITERIA: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator adding a criterion to :data:`CRITERIA` under ``cls.name``."""
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **options) -> Criterion:
    """Instantiate a registered criterion; unknown names raise ``InputError``."""
    from onnx_ocnna.errors import InputError

    _load_builtin()
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r}; choose one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](options=options)


def _load_builtin() -> None:
    # Imported lazily so each module registers itself on first use.
    import importlib

    for module in ("ocnna", "magnitude", "activation", "random", "si"):
        try:
            importlib.import_module(f"onnx_ocnna.criteria.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"onnx_ocnna.criteria.{module}":
                raise


__all__ = ["Accumulator", "Criterion", "MemberInfo", "CRITERIA", "register", "get_criterion"]
