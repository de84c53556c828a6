"""The plugin system: discovery, registries, errors, blocking, broken plugins."""
from __future__ import annotations

import importlib.metadata as metadata
import json

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


def test_duplicate_name_names_both_plugins() -> None:
    plugins.register_plugin(Duplicate(), "dupe")
    with pytest.raises(PluginError, match="registered twice.*'sklearn'.*'dupe'|registered twice.*'dupe'.*'sklearn'"):
        plugins.get_state()


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
