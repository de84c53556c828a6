"""The plugin's own tests: wsss-bench's conformance kit over what this distribution registers."""
from __future__ import annotations

from wsss_bench.testing import Case, cases, check_component, parametrize_plugins

PLUGIN = "random_clusterer"  # the entry-point name in setup.cfg


def test_the_plugin_is_installed_and_registers_its_clusterer() -> None:
    assert [c.name for c in cases("clusterer", plugin=PLUGIN)] == ["random"]


@parametrize_plugins("clusterer", plugin=PLUGIN)
def test_clusterer_conforms(case: Case) -> None:
    check_component(case)
