"""The plugin manager: entry-point discovery, blocking, isolation of broken plugins.

Load order:
1. every entry point of group ``wsss_bench`` whose distribution is wsss-bench itself (the
   built-ins, registered exactly like third-party plugins);
2. third-party entry points of the same group, unless ``WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD=1``;
3. plugins registered in-process with :func:`register_plugin` (tests, notebooks).

``WSSS_BENCH_BLOCK_PLUGINS=a,b`` blocks plugins by entry-point name.  A plugin that fails to import
or raises inside a registration hook produces a warning naming it; the others keep working.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import KINDS, Component, Registry

DISABLE_AUTOLOAD_ENV = "WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "WSSS_BENCH_BLOCK_PLUGINS"
ENTRY_POINT_GROUP = hookspecs.PROJECT
OWN_DISTRIBUTION = "wsss-bench"

_HOOK_OF_KIND = {
    "backbone": "register_backbones",
    "clusterer": "register_clusterers",
    "method": "register_methods",
    "dataset": "register_datasets",
    "refiner": "register_refiners",
    "launcher": "register_launchers",
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered; the rest keeps working."""


@dataclass
class PluginInfo:
    """What is known about one loaded plugin."""

    name: str
    distribution: Optional[str] = None
    version: Optional[str] = None
    builtin: bool = False
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class PluginState:
    """The plugin manager plus everything it registered."""

    pm: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    registries: dict[str, Registry]
    failures: dict[str, str]


_state: Optional[PluginState] = None
_extra_plugins: list[tuple[Any, str]] = []


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def _warn(plugin: str, what: str, exc: BaseException) -> None:
    warnings.warn(f"wsss-bench plugin {plugin!r} {what}: {type(exc).__name__}: {exc}",
                  PluginWarning, stacklevel=3)


def _entry_points(group: str = ENTRY_POINT_GROUP) -> list[tuple[metadata.EntryPoint, metadata.Distribution, bool]]:
    """``(entry point, distribution, builtin)`` of ``group`` that should load: not blocked
    (``WSSS_BENCH_BLOCK_PLUGINS``), and third-party ones only while autoload is on."""
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
    blocked = _blocked()
    found = []
    seen: set[tuple[str, str]] = set()
    for dist in metadata.distributions():
        builtin = (dist.metadata["Name"] or "").lower().replace("_", "-") == OWN_DISTRIBUTION
        for ep in dist.entry_points:
            if ep.group != group or (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            if ep.name in blocked or (not builtin and not autoload):
                continue
            found.append((ep, dist, builtin))
    return found


def _load_entry_points(pm: pluggy.PluginManager, infos: dict[str, PluginInfo],
                       failures: dict[str, str]) -> None:
    for ep, dist, builtin in _entry_points():
        dist_name = dist.metadata["Name"]
        if pm.has_plugin(ep.name):
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not break the toolkit
            failures[ep.name] = f"{type(exc).__name__}: {exc}"
            _warn(ep.name, "failed to load", exc)
            continue
        infos[ep.name] = PluginInfo(ep.name, dist_name, dist.version, builtin)


def _collect(pm: pluggy.PluginManager, infos: dict[str, PluginInfo],
             failures: dict[str, str]) -> dict[str, Registry]:
    registries = {kind: Registry(kind) for kind in KINDS}
    for kind, hook_name in _HOOK_OF_KIND.items():
        hook = getattr(pm.hook, hook_name)
        # Call each implementation on its own so that one raising plugin is isolated and every
        # component is attributed to the plugin that registered it.
        for impl in reversed(hook.get_hookimpls()):
            plugin = impl.plugin_name

            def register(name: str, factory: Callable[..., Any], help: str = "",
                         options: Any = None, *, _plugin: str = plugin, _kind: str = kind) -> None:
                info = infos[_plugin]
                dist = f"{info.distribution} {info.version or ''}".strip() if info.distribution else None
                registries[_kind].add(Component(_kind, name, factory, help, options, _plugin, dist))
                infos[_plugin].registered.setdefault(_kind, []).append(name)

            try:
                impl.function(register=register)
            except PluginError:
                raise  # duplicate names are a configuration error the user must resolve
            except Exception as exc:
                failures[plugin] = f"{type(exc).__name__}: {exc}"
                _warn(plugin, f"raised in {hook_name}", exc)
    return registries


def get_state() -> PluginState:
    """Load plugins once per process and return the manager and registries."""
    global _state
    if _state is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        infos: dict[str, PluginInfo] = {}
        failures: dict[str, str] = {}
        _load_entry_points(pm, infos, failures)
        blocked = _blocked()
        for obj, name in _extra_plugins:
            if name not in blocked and not pm.has_plugin(name):
                pm.register(obj, name=name)
                infos[name] = PluginInfo(name)
        pm.check_pending()
        registries = _collect(pm, infos, failures)
        _state = PluginState(pm, infos, registries, failures)
    return _state


def register_plugin(obj: Any, name: str) -> None:
    """Register an in-process plugin object (module or class instance) and reload registries."""
    _extra_plugins.append((obj, name))
    reset()


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    _extra_plugins[:] = [(o, n) for o, n in _extra_plugins if n != name]
    reset()


def reset() -> None:
    """Forget loaded plugins; the next access loads them again (tests, env changes)."""
    global _state
    _state = None


def registry(kind: str) -> Registry:
    """The registry of one kind: backbone, clusterer, method or dataset.

    A name of that kind registered by two plugins is a :class:`PluginError` naming both (the
    other kinds, and ``wsss plugins``, keep working).
    """
    return get_state().registries[kind].check()


def plugin_infos() -> list[PluginInfo]:
    """Loaded plugins, built-ins first."""
    return sorted(get_state().infos.values(), key=lambda i: (not i.builtin, i.name))


#: Entry-point group of plugin modules whose ``register_commands`` is torch-free (cheap to import):
#: the CLI imports only these to list and find commands.
COMMANDS_GROUP = f"{ENTRY_POINT_GROUP}.commands"


def _declared_command_modules() -> list[tuple[str, Any]]:
    """``(name, module)`` of the ``wsss_bench.commands`` entry points, loaded."""
    found = []
    for ep, _, _ in _entry_points(COMMANDS_GROUP):
        try:
            found.append((ep.name, ep.load()))
        except Exception as exc:
            _warn(ep.name, "failed to load its commands", exc)
    return found


def add_declared_commands(cli: Any) -> set[int]:
    """Add the commands of the ``wsss_bench.commands`` modules (no plugin manager, no torch);
    returns the ids of those modules (their pluggy ``register_commands`` is then skipped)."""
    done: set[int] = set()
    for name, module in _declared_command_modules():
        if id(module) in done:
            continue
        done.add(id(module))
        register = getattr(module, "register_commands", None)
        if register is None:
            continue
        try:
            register(cli=cli)
        except Exception as exc:
            _warn(name, "raised in register_commands", exc)
    return done


def undeclared_command_plugins_possible() -> bool:
    """Whether a plugin outside ``wsss_bench.commands`` might add commands: any third-party entry
    point of the ``wsss_bench`` group, or an in-process plugin.  The built-in plugins declare
    all of theirs, so a plain install answers False and ``wsss --help`` imports no plugin."""
    return bool(_extra_plugins) or any(not builtin for _, _, builtin in _entry_points())


def add_plugin_commands(cli: Any, skip_modules: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Let every loaded plugin add sub-commands to the click group ``cli`` (this loads the
    plugins); modules in ``skip_modules`` (already added by :func:`add_declared_commands`) are
    not asked twice."""
    state = get_state()
    for impl in state.pm.hook.register_commands.get_hookimpls():
        if id(impl.plugin) in skip_modules:
            continue
        try:
            impl.function(cli=cli)
        except Exception as exc:
            _warn(impl.plugin_name, "raised in register_commands", exc)
