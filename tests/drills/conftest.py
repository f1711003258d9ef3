"""Reliability drills (issue 7 part 2): the session report plugin and shared fixtures.

Each drill records its outcome with ``tests.drills.report.record``; at the end of the
session this plugin writes ``test-artifacts/drills.json`` and prints the table.
Fixtures of the part suites that the moved drills need are imported here, so they are
the same fixtures, not copies.
"""

from __future__ import annotations

import pytest

from tests.drills.report import COLLECTED, markdown_table, write_json
from tests.engine.conftest import orthanc, reference, worker_config  # noqa: F401 - fixtures
from tests.ingest.conftest import start_ingest  # noqa: F401 - fixture
from tests.projections.conftest import site, site_events  # noqa: F401 - fixtures
from tests.xnat.conftest import standin, study_result  # noqa: F401 - fixtures


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if COLLECTED:
        write_json(COLLECTED)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not COLLECTED:
        return
    terminalreporter.section("reliability drills (test-artifacts/drills.json)")
    terminalreporter.write_line(markdown_table(COLLECTED))
