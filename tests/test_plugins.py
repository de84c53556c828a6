"""The plugin system: discovery, registries, errors, blocking, broken plugins."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os

import pytest
from click.testing import CliRunner

import wsss_bench
from wsss_bench import plugins
from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hook_names, hookimpl


@pytest.fixture(autouse=True)
def _fresh_plugins():
    plugins.reset()
    yield
    plugins._extra_plugins.clear()
    plugins.reset()


def test_builtins_registered_through_entry_points() -> None:
    eps = [ep for ep in metadata.entry_points(group="wsss_bench")]
    assert {"resnet38d", "timm", "sklearn", "cam", "subcat", "synthetic", "voc"} <= {e.name for e in eps}
    assert all(e.value.startswith("wsss_bench_plugins.") for e in eps)
    infos = {i.name: i for i in plugins.plugin_infos()}
    assert infos["cam"].builtin and infos["cam"].distribution == "wsss-bench"


def test_public_api_lists_and_creates() -> None:
    assert "resnet38d" in wsss_bench.list_backbones()
    assert "kmeans" in wsss_bench.list_clusterers()
    assert {"cam", "subcat"} <= set(wsss_bench.list_methods())
    assert "synthetic" in wsss_bench.list_datasets()
    backbone = wsss_bench.create_backbone("timm:resnet18", output_stride=8)
    assert backbone.stride == 8 and backbone.out_channels == 512


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(PluginError, match="Did you mean 'kmeans'"):
        wsss_bench.create_clusterer("kmean")


def test_invalid_options_are_reported() -> None:
    with pytest.raises(wsss_bench.UserError, match="n_init"):
        wsss_bench.create_clusterer("kmeans", n_init=0)


class Duplicate:
    @hookimpl
    def register_clusterers(self, register):
        register("kmeans", object, help="a clash")


def test_duplicate_name_fails_its_kind_only_and_names_both_plugins() -> None:
    from click.testing import CliRunner

    from wsss_bench.cli.main import cli

    plugins.register_plugin(Duplicate(), "dupe")
    try:
        with pytest.raises(PluginError, match=r"clusterer 'kmeans' is registered by plugin '(sklearn|dupe)' "
                                              r"\(.*\) and plugin '(dupe|sklearn)'"):
            plugins.registry("clusterer")
        assert "resnet38d" in plugins.registry("backbone").names()  # other kinds keep working
        runner = CliRunner()
        listed = runner.invoke(cli, ["list", "clusterers"])
        assert listed.exit_code == 2 and len(listed.output.strip().splitlines()) == 1, listed.output
        assert "wsss-bench" in listed.output and "in-process" in listed.output  # both origins
        assert runner.invoke(cli, ["list", "backbones"]).exit_code == 0
        shown = runner.invoke(cli, ["plugins"])
        assert shown.exit_code == 0, shown.output
        assert any("CONFLICT" in line and "kmeans" in line for line in shown.output.splitlines()), shown.output
        assert runner.invoke(cli, ["--help"]).exit_code == 0
    finally:
        plugins.unregister_plugin("dupe")


class Exploding:
    @hookimpl
    def register_backbones(self, register):
        raise RuntimeError("boom")


def test_plugin_raising_in_registration_warns_and_rest_works() -> None:
    plugins.register_plugin(Exploding(), "exploding")
    with pytest.warns(plugins.PluginWarning, match="exploding.*boom"):
        names = plugins.registry("backbone").names()
    assert "resnet38d" in names


def test_broken_entry_point_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEP:
        name, group, value = "broken", "wsss_bench", "no_such_module_xyz"

        def load(self):
            raise ImportError("No module named 'no_such_module_xyz'")

    class FakeDist:
        metadata = {"Name": "wsss-broken"}
        version = "9.9"
        entry_points = [FakeEP()]

    real = metadata.distributions
    monkeypatch.setattr(metadata, "distributions", lambda: [*real(), FakeDist()])
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "0")
    with pytest.warns(plugins.PluginWarning, match="broken.*failed to load"):
        state = plugins.get_state()
    assert "broken" in state.failures and "cam" in state.infos


def test_autoload_disabled_skips_third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEP:
        name, group, value = "thirdparty", "wsss_bench", "x"

        def load(self):  # pragma: no cover - must not be called
            raise AssertionError("loaded although autoload is disabled")

    class FakeDist:
        metadata = {"Name": "wsss-thirdparty"}
        version = "1.0"
        entry_points = [FakeEP()]

    real = metadata.distributions
    monkeypatch.setattr(metadata, "distributions", lambda: [*real(), FakeDist()])
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    assert "thirdparty" not in plugins.get_state().infos


def test_block_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.BLOCK_ENV, "subcat")
    assert "subcat" not in wsss_bench.list_methods()
    assert "cam" in wsss_bench.list_methods()


class Extra:
    @hookimpl
    def register_methods(self, register):
        register("noop", lambda: None, help="does nothing")

    @hookimpl
    def register_commands(self, cli):
        import click

        @cli.command("hello-plugin")
        def hello():
            click.echo("hello from a plugin")


def test_hook_register_commands_and_listing() -> None:
    plugins.register_plugin(Extra(), "extra")
    from wsss_bench.cli.main import cli

    plugins.add_plugin_commands(cli)
    runner = CliRunner()
    assert runner.invoke(cli, ["hello-plugin"]).output.strip() == "hello from a plugin"
    listed = json.loads(runner.invoke(cli, ["plugins", "--json"]).output)
    entry = next(p for p in listed if p["name"] == "extra")
    assert entry["registers"] == {"method": ["noop"]}
    assert "noop" in runner.invoke(cli, ["list", "methods"]).output
    cli.commands.pop("hello-plugin", None)


def test_every_hook_is_documented_in_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in hook_names():
        assert f"`{name}(" in readme, f"hook {name} is not documented in README.md"


def test_help_imports_no_torch_and_still_lists_plugin_commands() -> None:
    """`wsss --help` (and each shell-completion TAB) loads the torch-free command modules of the
    `wsss_bench.commands` group only, not the plugins (whose backbones import torch)."""
    import subprocess
    import sys

    env = {**os.environ, "WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD": "1"}  # a plain install: built-ins only
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "wsss_bench.cli.main", "--help"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "wsss_bench_plugins.backbone_resnet38d" not in imported
    commands = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert {"cluster", "convert-weights", "run", "data"} <= commands
    data = subprocess.run([sys.executable, "-m", "wsss_bench.cli.main", "data", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert "synth" in data.stdout and "fashion" in data.stdout


def test_no_plugin_imports_the_cli_the_orchestration_or_another_plugin() -> None:
    """Plugins use public API only: what they need is in the host's documented modules."""
    import ast
    from pathlib import Path

    forbidden = ("wsss_bench.cli", "wsss_bench.orchestration", "wsss_bench.runner", "wsss_bench_plugins", "plugins.")
    for path in sorted((Path(__file__).parents[1] / "plugins").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
                own = path.stem.startswith("commands_") and name.endswith(path.stem[len("commands_"):])
                # a plugin's torch-free command module may import its own plugin module, lazily
                assert own or not (name.startswith(".") and name.strip(".")), f"{path.name} imports sibling {name}"
