"""The conformance suite: sidecar, mTLS and rollout tests run once per engine.

Test directories that start sidecars opt in with an autouse fixture that requests `engine`;
every test there is then generated for each engine (`lean`, `mitmproxy`), and `run_sidecar`
starts the sidecar with that engine. `@pytest.mark.engines("mitmproxy")` limits a test to the
engines it names: where the engines differ on purpose (listed in README), not to hide a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "sidecar"))

import sidecar_support

ENGINES = ("lean", "mitmproxy")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(*names): run this test only on the named engines")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("engines")
        metafunc.parametrize("engine", marker.args if marker else ENGINES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest):
    """The engine `run_sidecar` starts sidecars with, for the tests of one module and engine."""
    previous = sidecar_support.ENGINE
    sidecar_support.ENGINE = request.param
    yield request.param
    sidecar_support.ENGINE = previous
