"""The README's commands work when pasted after its install step, which never activates .venv."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
VENV_ONLY = {"python", "python3", "pip", "pip3", "pytest", "dllm-studio", "dllm-studio-gui"}  # not on PATH then


def commands(markdown: str) -> list[str]:
    """Shell commands a reader may paste: lines of ```bash blocks and inline code spans of two or more words."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", markdown, flags=re.S):
        found += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose) if len(span.split()) > 1]
    return found


def pieces(command: str) -> list[list[str]]:
    """The simple commands of a command line (split at && ; |), each as words."""
    return [shlex.split(part, comments=True) for part in re.split(r"&&|;|\|", command.replace("\\", "/"))
            if part.strip() and not part.strip().startswith("#")]


def problems(command: str) -> list[str]:
    bad = []
    for words in pieces(command):
        if words[0] in ("xvfb-run", "env"):  # the program it runs is the command to check
            words = words[next((i for i, w in enumerate(words) if w in VENV_ONLY or w.startswith(".venv/")), 0):]
        program = words[0]
        if program in VENV_ONLY and words[:3] != ["python3", "-m", "venv"]:
            bad.append(f"{command!r}: {program} is only in .venv/bin after the install")
        elif program.startswith(".venv/bin/"):
            name = program.removeprefix(".venv/bin/")
            if not (Path(sys.prefix) / "bin" / name).exists():
                bad.append(f"{command!r}: the install puts no {name} in .venv/bin")
            if name.startswith("python") and len(words) > 1:
                if words[1] == "-m" and importlib.util.find_spec(words[2]) is None:
                    bad.append(f"{command!r}: no module {words[2]}")
                elif words[1].endswith(".py") and not (ROOT / words[1]).is_file():
                    bad.append(f"{command!r}: no file {words[1]}")
    return bad


def test_the_checker_catches_what_failed_for_a_new_user():
    assert problems("dllm-studio info demo")  # "command not found" after the README's install
    assert problems("python main.py")
    assert problems(".venv/bin/python -m dllm_studio.no_such_module")
    assert not problems(".venv/bin/dllm-studio info demo")
    assert not problems('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/python main.py')


@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "dllm-studio").exists(),
                    reason="runs inside the environment the README's install makes")
@pytest.mark.parametrize("readme", ["README.md", "packaging/README.md"])
def test_every_command_in_the_readme_works_after_the_install(readme):
    found = commands((ROOT / readme).read_text(encoding="utf-8"))
    assert found
    bad = [p for command in found for p in problems(command)]
    assert not bad, "\n".join(bad)
