"""Answer scorers and the code sandbox: good answers pass, bad or hostile code fails with a reason, nothing hangs."""

import tempfile
import time
from pathlib import Path

import pytest

from dllm_studio.eval.scoring import (OUTPUT_LIMIT, extract_code, final_number, normalize, run_code_tests,
                                      score_code, score_math, score_qa)


@pytest.mark.parametrize("text,expected", [
    ("Paris", "paris"), ("  The   Paris!! ", "paris"), ("An apple.", "apple"), ('"Rome"', "rome"),
    ("the the end", "end"), ("New   York City", "new york city"), ("Theodore", "theodore"),
    ("St. Louis.", "st. louis"), ("", ""), ("...", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("generated,answer,correct", [
    ("Paris", "Paris", True), ("paris.", "Paris", True), ("The Paris\n", "Paris", True),
    ("A cat", "cat", True), ("Paris is the capital", "Paris", False), ("Lyon", "Paris", False),
    ("", "Paris", False), ("Parisian", "Paris", False),
])
def test_score_qa(generated, answer, correct):
    assert score_qa(generated, answer) is correct


@pytest.mark.parametrize("text,number", [
    ("12", "12"), ("It is 12.", "12"), ("12.0", "12"), ("3.50", "3.5"), ("-3", "-3"), ("x = -3.", "-3"),
    ("7 plus 5 is 12", "12"), ("1,000 apples", "1000"), ("10-12", "12"), ("-0", "0"),
    ("no number here", None), ("", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


@pytest.mark.parametrize("generated,answer,correct", [
    ("The answer is 12.", "12", True), ("12.0", "12", True), ("7 + 5 = 12", "12", True),
    ("It is -3", "-3", True), ("It is 3", "-3", False), ("12 or 13", "12", False),
    ("twelve", "12", False), ("", "12", False),
])
def test_score_math(generated, answer, correct):
    assert score_math(generated, answer) is correct


def test_extract_code_strips_fences():
    assert extract_code("def f(): pass") == "def f(): pass"
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"  # an answer cut off inside its block


LARGER = ["assert larger(2, 5) == 5", "assert larger(-1, -4) == -1"]
GOOD = "def larger(a, b):\n    return a if a > b else b\n"


def run(code, timeout_s=5.0):
    return run_code_tests(code, "larger", LARGER, timeout_s=timeout_s)


def test_correct_code_passes():
    outcome = run(GOOD)
    assert outcome.passed and outcome.reason == "all 2 tests passed"


def test_fenced_answer_passes_through_score_code():
    item = {"entry_point": "larger", "tests": LARGER}
    assert score_code(f"Sure!\n```python\n{GOOD}```\nThis returns the larger one.", item).passed
    assert score_code("   ", item).reason == "the answer holds no code"


@pytest.mark.parametrize("code,reason", [
    ("def larger(a, b):\n    return min(a, b)\n", "test failed: assert larger(2, 5) == 5"),
    ("def larger(a, b) return a\n", "does not compile"),
    ("raise ValueError('boom')\n", "raised ValueError: boom"),
    ("def larger(a, b):\n    return a / 0\n", "ZeroDivisionError"),
    ("def bigger(a, b):\n    return max(a, b)\n", "defines no function larger"),
    ("import sys\nsys.exit(0)\n" + GOOD, "called sys.exit(0)"),
    ("import sys\ndef larger(a, b):\n    sys.exit(0)\n", "sys.exit(0) was called during the test"),
    ("import os\ndef larger(a, b):\n    os._exit(0)\n", "exited with status 0 before the tests finished"),
    ("import os\nos.close(1)\nos._exit(0)\n", "exited with status 0"),
])
def test_wrong_or_exiting_code_fails(code, reason):
    outcome = run(code)
    assert not outcome.passed and reason in outcome.reason


def test_infinite_loop_times_out():
    start = time.perf_counter()
    outcome = run("while True:\n    pass\n", timeout_s=1.0)
    assert not outcome.passed and outcome.reason == "timed out after 1 s"
    assert time.perf_counter() - start < 4


def test_huge_output_is_capped_not_hung():
    start = time.perf_counter()
    outcome = run("print('x' * 10_000_000)\n" + GOOD)
    assert not outcome.passed and "limit" in outcome.reason
    assert len(outcome.output) <= 2000 and time.perf_counter() - start < 4
    assert not run("while True:\n    print('y' * 1000)\n").passed
    assert OUTPUT_LIMIT < 10_000_000


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket()\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "import socket\nsocket.getaddrinfo('example.com', 80)\n",
    "import _socket\n_socket.socket()\n",
    "import sys\ndel sys.modules['socket']\nimport socket\n",  # a re-import cannot restore the real module
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n",
])
def test_network_is_refused(code):
    outcome = run(code + GOOD)
    assert not outcome.passed
    assert "network access is disabled" in outcome.reason or "importing socket is disabled" in outcome.reason


def test_processes_cannot_be_started_or_signalled():
    assert "processes is disabled" in run("import subprocess\nsubprocess.run(['true'])\n" + GOOD).reason
    assert "processes is disabled" in run("import os\nos.kill(os.getppid(), 9)\n" + GOOD).reason


def test_files_land_in_the_work_directory_which_is_removed(monkeypatch):
    from dllm_studio.eval import sandbox

    monkeypatch.setattr(sandbox, "unavailable", lambda: "no sandbox in this test")  # the host-side work dir
    code = "import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\n" + GOOD
    outcome = run_code_tests(code, "larger", LARGER, unsafe_code_eval=True)
    assert outcome.passed
    workdir = Path(outcome.output.strip())
    assert workdir.name == "work" and workdir.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not workdir.parent.exists()


def test_writing_outside_the_work_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    outcome = run(f"open({str(target)!r}, 'w').write('x')\n" + GOOD)
    assert not outcome.passed and "writing outside" in outcome.reason
    assert not target.exists()


@pytest.mark.parametrize("code", [
    "x = bytearray(8 * 2**30)\n",
    "chunks = [bytearray(64 * 2**20) for _ in range(64)]\n",
])
def test_memory_bomb_fails(code):
    outcome = run(code + GOOD)
    assert not outcome.passed and "MemoryError" in outcome.reason


def test_a_frozen_build_without_python_refuses_clearly(monkeypatch):
    from dllm_studio.errors import InvalidSettingsError

    monkeypatch.setattr("sys.frozen", True, raising=False)
    with pytest.raises(InvalidSettingsError, match="needs a Python interpreter"):
        run(GOOD)
