"""Named component registries, one per plugin kind.

Plugins add components through the ``register`` callback handed to their registration hook; the
host keeps the name, the factory, a one-line help, an optional pydantic options model and the
plugin that registered it.  Look-ups of unknown names fail with close matches; two plugins
registering the same name fail naming both.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, PluginError

KINDS = ("backbone", "clusterer", "method", "dataset", "refiner", "launcher")


@dataclass(frozen=True)
class Component:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    help: str = ""
    options: Optional[type[BaseModel]] = None
    plugin: str = "?"
    #: ``name version`` of the distribution that installed the plugin (None: in-process).
    distribution: Optional[str] = None

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check ``options`` against the component's model; return them with defaults filled."""
        if self.options is None:
            return dict(options)
        try:
            return self.options(**options).model_dump()
        except ValidationError as exc:
            raise ConfigError(
                f"invalid options for {self.kind} {self.name!r}: {format_validation_error(exc)}"
            ) from None

    def create(self, **options: Any) -> Any:
        """Validate ``options`` and call the factory with them."""
        return self.factory(**self.validate_options(options))


def format_validation_error(exc: ValidationError, root: str = "(root)") -> str:
    """Render a pydantic error as one line: ``a.b: message; c: message``.

    ``root`` names errors that belong to no field (a model-level validator).
    """
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or root
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


@dataclass
class Registry:
    """Components of one kind, keyed by name."""

    kind: str
    components: dict[str, Component] = field(default_factory=dict)
    #: Names registered more than once, with every registration (the first one is kept in
    #: ``components`` so that ``wsss plugins`` can still list it).
    conflicts: dict[str, list[Component]] = field(default_factory=dict)

    def add(self, component: Component) -> None:
        """Add ``component``; a name already taken is recorded as a conflict (see :meth:`check`)."""
        if not component.name or not isinstance(component.name, str):
            raise PluginError(f"plugin {component.plugin!r} registered a {self.kind} without a name")
        previous = self.components.get(component.name)
        if previous is not None:
            self.conflicts.setdefault(component.name, [previous]).append(component)
            return
        self.components[component.name] = component

    def conflict_message(self) -> Optional[str]:
        """One line naming every conflicting name and the distributions that register it."""
        if not self.conflicts:
            return None
        parts = []
        for name, regs in sorted(self.conflicts.items()):
            who = " and ".join(f"plugin {c.plugin!r} ({c.distribution or 'in-process'})" for c in regs)
            parts.append(f"{self.kind} {name!r} is registered by {who}")
        return ("; ".join(parts) + "; uninstall one, or block one with WSSS_BENCH_BLOCK_PLUGINS=<plugin>")

    def check(self) -> "Registry":
        """This registry, or a :class:`PluginError` when a name in it is registered twice."""
        message = self.conflict_message()
        if message is not None:
            raise PluginError(message)
        return self

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.components)

    def get(self, name: str) -> Component:
        """The component called ``name``; ``prefix:variant`` resolves to component ``prefix``."""
        if name in self.components:
            return self.components[name]
        prefix = name.split(":", 1)[0]
        if ":" in name and prefix in self.components:
            return self.components[prefix]
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(self.names()) or "none"
        raise PluginError(f"unknown {self.kind} {name!r}.{hint} Registered: {known}.")

    def create(self, name: str, **options: Any) -> Any:
        """Build the component ``name``; a ``prefix:variant`` name passes ``variant=...``.

        What the factory returns is checked against its kind's contract
        (:mod:`wsss_bench.contracts`) and remembers which component it is.
        """
        from . import contracts

        component = self.get(name)
        if name != component.name:
            options = {"variant": name.split(":", 1)[1], **options}
        return contracts.check_created(component.create(**options), component)
