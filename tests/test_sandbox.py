"""The OS sandbox for generated code: every escape route is closed and nothing outlives a verdict.

Most attacks run twice: with every layer, and with the in-process guard switched off, which proves the
operating-system layer (bubblewrap namespaces, rlimits, pids cgroup for root) holds on its own. They are
skipped only where that sandbox cannot exist (no bwrap, not Linux); the refusal there is tested below.
"""

from __future__ import annotations

import re
import secrets
import select
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dllm_studio.errors import SandboxUnavailableError
from dllm_studio.eval import sandbox, scoring
from dllm_studio.eval.scoring import run_code_tests

NO_SANDBOX = sandbox.unavailable()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no OS sandbox on this machine: {NO_SANDBOX}")
GOOD = "\ndef larger(a, b):\n    return a if a > b else b\n"
SLEEP = shutil.which("sleep") or "/bin/sleep"


def run(code: str, timeout_s: float = 5.0, **kwargs):
    return run_code_tests(code + GOOD, "larger", ["assert larger(2, 5) == 5"], timeout_s=timeout_s, **kwargs)


@pytest.fixture(params=[True, False], ids=["all-layers", "os-layer-alone"])
def guards(request, monkeypatch):
    monkeypatch.setattr(scoring, "IN_PROCESS_GUARDS", request.param)


@pytest.fixture
def os_layer_alone(monkeypatch):
    monkeypatch.setattr(scoring, "IN_PROCESS_GUARDS", False)


@pytest.fixture
def host_dir():
    """A writable host folder outside /tmp (the sandbox hides /tmp, which would prove less)."""
    folder = Path(tempfile.mkdtemp(prefix=".sandbox-target-", dir=Path(__file__).parent))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def survivors(marker: str) -> list[str]:
    """Host processes whose command line holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(proc.name)
        except OSError:  # it exited while we looked
            pass
    return found


# ---- files ----------------------------------------------------------------------------------------

WRITES = {
    "open": "open(T, 'w').write('x')",
    "io.FileIO": "import io\nio.FileIO(T, 'w').write(b'x')",
    "os.open": "import os\nos.write(os.open(T, os.O_WRONLY | os.O_CREAT), b'x')",
    "pathlib": "import pathlib\npathlib.Path(T).write_text('x')",
    "shutil": "import shutil\nshutil.copyfile('/etc/hostname', T)",
    "subprocess sh": "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > ' + T], check=True)",
}


@needs_sandbox
@pytest.mark.parametrize("api", WRITES)
def test_no_api_writes_outside_the_work_dir(guards, host_dir, api):
    target = host_dir / "escaped.txt"
    outcome = run(f"T = {str(target)!r}\n{WRITES[api]}\n")
    assert not outcome.passed and not target.exists()
    assert list(host_dir.iterdir()) == []


@needs_sandbox
def test_host_tmp_is_out_of_reach_too(os_layer_alone, tmp_path):
    target = tmp_path / "escaped.txt"
    outcome = run(f"import io\nio.FileIO({str(target)!r}, 'w').write(b'x')\n")
    assert not outcome.passed and not target.exists()


@needs_sandbox
def test_the_work_dir_is_writable_private_and_discarded(os_layer_alone, monkeypatch):
    roots = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        folder = real(*args, **kwargs)
        roots.append(Path(folder.name))
        return folder

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    marker = secrets.token_hex(8)
    outcome = run(f"import os\nopen('kept.txt', 'w').write({marker!r})\nprint(os.getcwd(), open('kept.txt').read())\n")
    assert outcome.passed and outcome.output.strip() == f"{sandbox.WORK_DIR} {marker}"
    assert roots and not roots[-1].exists()  # the host side of the task is deleted, and the work dir was never on it


# ---- network ----------------------------------------------------------------------------------------

@pytest.fixture
def listener():
    """A real TCP listener on the host's loopback; a connection from the code would be pending on it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def reached(server: socket.socket) -> bool:
    return bool(select.select([server], [], [], 0.2)[0])


CONNECTS = {
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
    # A fresh copy of the _socket extension, loaded from its file past any import hook or patched module.
    "fresh _socket": ("import _socket, importlib.machinery, importlib.util\n"
                      "loader = importlib.machinery.ExtensionFileLoader('_socket', _socket.__file__)\n"
                      "fresh = importlib.util.module_from_spec(importlib.util.spec_from_loader('_socket', loader))\n"
                      "s = fresh.socket(fresh.AF_INET, fresh.SOCK_STREAM)\ns.settimeout(2)\n"
                      "s.connect(('127.0.0.1', PORT))"),
    "subprocess python": ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import socket; "
                          "socket.create_connection((\"127.0.0.1\", %d), timeout=2)' % PORT], check=True)"),
}


@needs_sandbox
@pytest.mark.parametrize("api", CONNECTS)
def test_no_api_reaches_the_host_loopback(guards, listener, api):
    port = listener.getsockname()[1]
    outcome = run(f"PORT = {port}\n{CONNECTS[api]}\n")
    assert not outcome.passed
    assert not reached(listener)


# ---- processes ----------------------------------------------------------------------------------------

def double_fork_sleeper(marker: str) -> str:
    """Code that starts a sleeper in a new session (fork, setsid, fork, exec) and waits until it runs."""
    return f"""import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv({SLEEP!r}, ['sleep', {marker!r}])
    os._exit(0)
os.wait()
def running():
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if {marker!r} in open('/proc/' + pid + '/cmdline').read():
                return True
        except OSError:
            pass
while not running():
    time.sleep(0.01)
print('sleeper running', flush=True)
"""


@needs_sandbox
@pytest.mark.parametrize("then", ["", "while True:\n    pass\n"], ids=["verdict", "timeout"])
def test_no_process_outlives_the_verdict(os_layer_alone, then):
    marker = f"30.{secrets.randbelow(10**9):09d}"  # a unique sleep length: the sleeper's command line
    outcome = run(double_fork_sleeper(marker) + then, timeout_s=3.0)
    assert "sleeper running" in outcome.output
    assert outcome.passed is not bool(then)
    assert survivors(marker) == []


@needs_sandbox
def test_a_fork_bomb_stops_at_the_process_limit_even_as_root(os_layer_alone):
    # Bounded on purpose (at most 300 sleepers, a few seconds): it must stop well before that.
    marker = f"20.{secrets.randbelow(10**9):09d}"
    code = f"""import os
forked = 0
try:
    for _ in range(300):
        if os.fork() == 0:
            os.execv({SLEEP!r}, ['sleep', {marker!r}])
        forked += 1
except OSError as exc:
    print('fork refused after', forked)
"""
    outcome = run(code, timeout_s=5.0)
    refused = re.search(r"fork refused after (\d+)", outcome.output)
    assert refused, outcome
    # bwrap, its init and the harness take up to three of the sandbox's processes
    assert sandbox.PROCESS_LIMIT - 3 <= int(refused.group(1)) < sandbox.PROCESS_LIMIT
    assert survivors(marker) == []


@needs_sandbox
def test_a_memory_bomb_fails(os_layer_alone):
    outcome = run("x = bytearray(10 * 2**30)\n")
    assert not outcome.passed and "MemoryError" in outcome.reason


@needs_sandbox
def test_a_time_bomb_is_killed(os_layer_alone):
    start = time.perf_counter()
    outcome = run("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
                  timeout_s=1.0)
    assert not outcome.passed and outcome.reason == "timed out after 1 s"
    assert time.perf_counter() - start < 4


# ---- where no sandbox exists --------------------------------------------------------------------------

REASON = "There is no operating-system sandbox for generated code on testos."


@pytest.fixture
def no_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox, "unavailable", lambda: REASON)


def test_without_a_sandbox_code_is_refused_with_the_reason(no_sandbox):
    with pytest.raises(SandboxUnavailableError, match=re.escape(REASON)):
        run("")


def test_without_a_sandbox_the_opt_in_runs_the_code_unisolated(no_sandbox):
    outcome = run("import os\nprint(os.getcwd())\n", unsafe_code_eval=True)
    assert outcome.passed and outcome.output.strip() != sandbox.WORK_DIR  # a host folder, not the sandbox's


def test_evaluate_refuses_a_code_suite_before_generating(no_sandbox):
    from dllm_studio import jobs
    from dllm_studio.eval.runner import evaluate

    with pytest.raises(SandboxUnavailableError, match=re.escape(REASON)):
        jobs.run(evaluate(None, "code", limit=1))  # no model needed: it stops before the first answer


def test_cli_eval_refuses_code_without_the_flag_and_runs_with_it(no_sandbox, capsys):
    from dllm_studio.cli import main

    assert main(["eval", "demo", "--suite", "code", "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert REASON in err and "--unsafe-code-eval" in err and "Traceback" not in err
    assert main(["eval", "demo", "--suite", "code", "--limit", "1", "--unsafe-code-eval"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["code", "1"]


def test_the_probe_names_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "platform", "linux")
    assert "apt install bubblewrap" in sandbox.unavailable.__wrapped__()


@pytest.mark.gui
def test_compare_asks_before_running_code_without_a_sandbox(qtbot, no_sandbox, open_page, session, demo_rtn4):
    from PySide6.QtWidgets import QApplication

    from ui.pages.compare import ComparePage
    from ui.session import Variant

    session.add_variant(Variant("RTN W4", demo_rtn4.model, demo_rtn4.summary, demo_rtn4.layers))
    compare = open_page(ComparePage)
    for name, box in compare.suite_boxes.items():
        box.setChecked(name == "code")
    compare.limit.setValue(1)
    compare.run_button.click()
    questions = [w for w in QApplication.topLevelWidgets() if w.objectName() == "questionDialog" and w.isVisible()]
    assert len(questions) == 1 and REASON in questions[0].text() and "--" not in questions[0].text()
    assert compare.job is None and not session.busy  # nothing runs until the user agrees
    with qtbot.waitSignal(compare.finished, timeout=120_000) as done:
        questions[0].accept()
    assert [row["suite"] for row in done.args[0]] == ["code"]


@needs_sandbox
def test_an_interpreter_under_tmp_still_runs_inside(monkeypatch):
    """The sandbox's private /tmp hid a checkout's .venv under /tmp (CI's clone can live there): every code
    item failed with "bwrap: execvp ...python: No such file or directory"."""
    folder = Path(tempfile.mkdtemp(prefix="dllm-venv-", dir="/tmp"))
    try:
        python = folder / "bin" / "python"
        python.parent.mkdir()
        python.symlink_to(sys.executable)
        monkeypatch.setattr(scoring, "PYTHON", str(python))
        assert str(python.parent) in sandbox.kept_in_tmp(python)
        outcome = run("")
        assert outcome.passed, outcome.output
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_only_folders_under_tmp_are_bound_again():
    assert sandbox.kept_in_tmp("/usr/bin/python3") == sorted(
        {p for p in (sys.prefix, sys.exec_prefix, sys.base_prefix) if p.startswith("/tmp/")})
    assert "/tmp/ci/.venv/bin" in sandbox.kept_in_tmp("/tmp/ci/.venv/bin/python")
    assert "/tmp" not in sandbox.kept_in_tmp("/tmp/python")
