"""The suite's own guarantees: a hung test names itself and where it hung, a test that starts a real
server or client without the `realserver` marker fails instead of hiding in the fast loop, and a gateway
process tells its tests the port it bound.

Most run a small pytest session in-process (pytester) with this suite's conftest hooks."""

from __future__ import annotations

import poplib
import re
import signal
from pathlib import Path

import httpx
import pytest

from gateway import accounts
from tests.conftest import TEST_SCRYPT_LN
from tests.gwproc import spawn_gateway

pytest_plugins = ["pytester"]

CONFTEST = """
from tests.conftest import (
    cyrus,
    dovecot,
    mail_user,
    pytest_collection_modifyitems,
    pytest_runtest_call,
    pytest_runtest_setup,
)
pytest_plugins = ["tests.timeouts"]
"""
INI = """
[tool.pytest.ini_options]
trio_mode = true
addopts = "--strict-markers -p no:cacheprovider"
filterwarnings = ["error"]
timeout = 0.5
timeout_method = "signal"
markers = ["realserver: x", "client: x"]
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyprojecttoml(INI)
    return pytester


def test_a_hung_trio_test_fails_with_the_await_it_hung_on_and_the_next_test_runs(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        test_hang="""
        import trio

        async def wait_for_nothing(event):
            await event.wait()

        async def test_hangs(nursery):
            event = trio.Event()
            nursery.start_soon(wait_for_nothing, event)
            await wait_for_nothing(event)

        async def test_after_it():
            await trio.sleep(0)
        """
    )
    result = inner.runpytest_inprocess()
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout (>0.5s) from pytest-timeout: the test was cancelled; its trio tasks were waiting at:*",
            "*task \"<test 'test_hangs'>\":*",
            '*test_hang.py", line 4, in wait_for_nothing*',
            "*FAILED test_hang.py::test_hangs - Failed: Timeout (>0.5s)*",
        ]
    )
    assert "run() from inside a run()" not in result.stdout.str()


def test_a_blocking_call_in_a_trio_test_and_a_hung_sync_test_fail_where_they_block(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        test_block="""
        import time

        async def test_blocks_the_loop():
            time.sleep(30)

        def test_blocks():
            time.sleep(30)
        """
    )
    result = inner.runpytest_inprocess()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(['*test_block.py", line 4, in test_blocks_the_loop*'])
    result.stdout.fnmatch_lines(["test_block.py:7: Failed"])


def test_starting_a_real_program_without_the_realserver_marker_fails(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_unmarked="""
        import pytest
        from tests.realservers.fs import require_program

        def test_unmarked():
            require_program("curl")

        @pytest.mark.realserver
        def test_marked():
            require_program("curl")

        def test_reaching_dovecot_around_the_fixture_list(request):
            request.getfixturevalue("dovecot")
        """
    )
    result = inner.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        ["*UnmarkedRealServerTest: test_unmarked.py::test_unmarked runs curl but has no `realserver` marker*"]
    )
    result.stdout.fnmatch_lines(["*test_reaching_dovecot_around_the_fixture_list runs dovecot*"])


def test_real_server_fixtures_and_client_tests_are_marked_realserver(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_marks="""
        import pytest

        @pytest.fixture
        def upstream(mail_user):
            return mail_user

        def test_direct(dovecot): pass
        def test_through_a_fixture(upstream): pass
        def test_jmap(cyrus): pass
        @pytest.mark.client
        def test_client(): pass
        def test_fast(tmp_path): pass
        """
    )
    result = inner.runpytest_inprocess("-m", "not realserver", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_marks.py::test_fast", "*1/5 tests collected (4 deselected)*"])


def test_a_gateway_process_on_port_0_reports_its_ports_and_its_log(tmp_path: Path) -> None:
    gateway = spawn_gateway(tmp_path, f"maildir://{tmp_path / 'mail'}")
    try:
        assert gateway.port > 0 and gateway.host == "127.0.0.1"
        p = poplib.POP3(gateway.host, gateway.port, timeout=10)
        assert p.getwelcome().startswith(b"+OK")
        p.quit()
        assert httpx.get(f"http://127.0.0.1:{gateway.admin_port()}/healthz", timeout=5).status_code == 200
        mark = gateway.lines_so_far()
        gateway.proc.send_signal(signal.SIGHUP)
        reloaded = gateway.wait_for_line(re.compile(rb"SIGHUP: .*reload"), after=mark)
        assert b"SIGHUP" in reloaded.group(0)
    finally:
        assert gateway.stop() == 0
    assert "listening on 127.0.0.1:" in gateway.stderr_text()


def test_tests_hash_passwords_cheaply_and_the_dummy_costs_the_same() -> None:
    # tests/conftest.py's cheap_scrypt; test_accounts' production_scrypt tests see the real cost (ln=14)
    cheap = f"$scrypt$ln={TEST_SCRYPT_LN},r=8,p=1$"
    assert accounts.hash_password("pw").startswith(cheap)
    assert accounts.DUMMY_HASH.startswith(cheap)
    assert accounts.verify_password("pw", accounts.hash_password("pw"))
    assert not accounts.verify_password("pw", accounts.DUMMY_HASH)
