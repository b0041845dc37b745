"""Integration tests use real sockets, namespaces and daemons.

A test may skip on a developer's machine where a tool or root is missing, but under CI
(``CI=true``) a skipped integration test fails the run: CI installs everything they need, so a
skip there means something was not tested.

Every test that needs a network asks for the ``lan`` fixture and calls it: ``lan(3)`` is a
switch with three hosts (`netns.Lan`), deleted when the test ends, however it ends.  Creating the
LAN inside the test (rather than in a fixture per size) lets one fixture serve every size, and a
test that skips before calling it creates nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from .attacks import MB, Channel
from .netns import Lan, LanFactory


@pytest.fixture
def lan() -> Iterator[LanFactory]:
    """`lan(n)`: a new LAN of `n` hosts, deleted at the end of the test."""
    with ExitStack() as made:

        def create(count: int, mtu: int = 1500, gro: bool = False) -> Lan:
            return made.enter_context(Lan.create(count, mtu, gro))

        yield create


@pytest.fixture
def nft_or_skip() -> None:
    """For tests that drop datagrams with nftables (`release.random_loss`)."""
    if subprocess.run(["which", "nft"], capture_output=True, check=False).returncode:
        pytest.skip("nftables (nft) is not installed")


@pytest.fixture(scope="session")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    """The honest 4 MB release the adversarial suite attacks (integration/test_attacks_*.py):
    signed once for the whole run, as every attack leaves it unchanged."""
    return Channel.make(tmp_path_factory.mktemp("release"), 4 * MB, chunk="256K")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") == "true" and skipped:
        if reporter:
            reporter.write_line(
                f"CI=true: {skipped} integration test(s) skipped; failing the run", red=True
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
