"""Integration tests use real sockets, namespaces and daemons.

A test may skip on a developer's machine where a tool or root is missing, but under CI
(``CI=true``) a skipped integration test fails the run: CI installs everything they need, so a
skip there means something was not tested.
"""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") == "true" and skipped:
        if reporter:
            reporter.write_line(
                f"CI=true: {skipped} integration test(s) skipped; failing the run", red=True
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
