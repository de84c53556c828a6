"""``wsss plugins`` and ``wsss list``."""
from __future__ import annotations

import json

import click

from ..plugins import get_state, plugin_infos, registry

_KINDS = {"backbones": "backbone", "clusterers": "clusterer", "methods": "method", "datasets": "dataset",
          "refiners": "refiner", "launchers": "launcher"}


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins: distribution, version, and what each registers."""
    infos = plugin_infos()
    failures = get_state().failures
    if as_json:
        data = [{"name": i.name, "distribution": i.distribution, "version": i.version,
                 "builtin": i.builtin, "registers": i.registered} for i in infos]
        data += [{"name": name, "error": error} for name, error in failures.items()]
        data += [{"conflict": reg.conflict_message()} for reg in get_state().registries.values()
                 if reg.conflicts]
        click.echo(json.dumps(data, indent=2))
        return
    for info in infos:
        what = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items())
        origin = f"{info.distribution or 'in-process'} {info.version or ''}".strip()
        click.echo(f"{info.name:<12} {origin:<22} {what or '(commands only)'}")
    for name, error in failures.items():
        click.echo(f"{name:<12} FAILED: {error}")
    for reg in get_state().registries.values():  # listed, not raised: this command shows them
        message = reg.conflict_message()
        if message is not None:
            click.echo(f"{'CONFLICT':<12} {message}")


@click.command("list")
@click.argument("kind", type=click.Choice(sorted(_KINDS)))
def list_command(kind: str) -> None:
    """List registered backbones, clusterers, methods, datasets, refiners or launchers."""
    reg = registry(_KINDS[kind])
    for name in reg.names():
        component = reg.components[name]
        click.echo(f"{name:<20} {component.help}  [{component.plugin}]")


def register(cli: click.Group) -> None:
    """Add the commands to the group."""
    cli.add_command(plugins_command)
    cli.add_command(list_command)
