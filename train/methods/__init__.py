"""The recipes the trainer knows: one file per method, found by name.

Every module of this package registers its Method subclass(es) with `@register`; they are
imported here once, so a new recipe is one new file (plus a preset in configs/). See
base.py for the interface and docs/training.md for the table of methods.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, Method, NoArgs, PhaseChange, Sampling, register, step_draws

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")


def build_method(align, method_args: dict, model) -> Method:
    """The method align.method names, with its Args from `method_args` (a mapping)."""
    cls = METHODS[align.method]
    return cls(align, cls.Args(**method_args), model)


def method_from_config(flat: dict) -> Method:
    """The method of a checkpoint's flat config ({"align.method": ..., "method_args.x": ...};
    keys it lacks take their defaults). Raises ValueError (ConfigError) when it is unknown
    or its options do not check."""
    from ..config import AlignConfig, ModelConfig, method_args, recorded_section
    align = {k: flat[f"align.{k}"] for k in AlignConfig.__dataclass_fields__
             if f"align.{k}" in flat}
    model = {k: flat[f"model.{k}"] for k in ModelConfig.__dataclass_fields__
             if f"model.{k}" in flat}
    given = {k[len("method_args."):]: v for k, v in flat.items()
             if k.startswith("method_args.")}
    for k, v in {**align, **model, **given}.items():   # a recorded config is resolved
        if isinstance(v, str) and "${" in v:              # already: nothing to interpolate
            raise ValueError(f"recorded option {k!r} holds an interpolation "
                             f"({v[:80]!r}); a checkpoint's config is resolved: damaged")
    a = recorded_section(AlignConfig, align, "align")
    m = recorded_section(ModelConfig, model, "model")
    return build_method(a, method_args(a.method, given), m)


__all__ = ["METHODS", "Method", "NoArgs", "PhaseChange", "Sampling", "build_method",
           "method_from_config", "register", "step_draws"]
