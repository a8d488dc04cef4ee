"""--threads: one rule for how many CPU threads torch uses, shared by the CLI and the desktop app."""

import json

import pytest
import torch

from dllm_studio.cli import main
from dllm_studio.threads import default_threads


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("physical, allowed, expected", [(8, 8, 7), (8, 3, 2), (2, 2, 1), (1, 1, 1), (None, 4, 3)])
def test_default_is_physical_cores_minus_one(monkeypatch, physical, allowed, expected):
    monkeypatch.setattr("psutil.cpu_count", lambda logical=True: physical if not logical else 2 * (physical or 2))
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(allowed)), raising=False)
    assert default_threads() == expected


def test_generate_uses_the_given_threads_and_says_so(capsys):
    torch.set_num_threads(2)
    assert main(["generate", "demo", "--prompt", "What is 7 + 5?", "--gen-length", "8", "--threads", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["threads"] == 1
    assert torch.get_num_threads() == 1


def test_the_default_is_what_the_desktop_app_uses(capsys):
    assert main(["generate", "demo", "--prompt", "What is 7 + 5?", "--gen-length", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["threads"] == default_threads() == torch.get_num_threads()


def test_eval_json_records_the_threads(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "demo", "--suite", "qa", "--limit", "1", "--threads", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["threads"] == 1


def test_every_command_takes_threads_and_refuses_zero(capsys):
    for command in (["info", "demo"], ["generate", "demo", "--prompt", "hi"],
                    ["eval", "demo", "--suite", "qa"], ["quantize", "demo", "--method", "rtn", "--out", "x"]):
        assert main([*command, "--threads", "0"]) == 1
        assert capsys.readouterr().err == "error: The thread count must be at least 1, not 0.\n"
