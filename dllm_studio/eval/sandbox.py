"""Operating-system isolation for generated code: bubblewrap namespaces and a pids cgroup (Linux).

`wrap` turns a command into one that runs inside a bubblewrap (`bwrap`) sandbox:
  - new user, PID, network, IPC, UTS and cgroup namespaces (`--unshare-all`): no network at all (not even
    the host's loopback), and when the sandbox's first process exits the kernel kills every process
    left in its PID namespace, so nothing the code started outlives the verdict;
  - the host's file tree read-only, the task's files read-only at `TASK_DIR`, and one private, size-capped
    tmpfs at `WORK_DIR` as the only writable place; it vanishes with the sandbox;
  - no capabilities, no further user namespaces, a new session (no terminal injection), a cleared
    environment, and bwrap dies with its parent.
Process count: RLIMIT_NPROC (set by the child) holds for an ordinary user, counted inside the sandbox's
own user namespace. Real root ignores RLIMIT_NPROC in every namespace (measured here: a root child forked
300 processes under a limit of 64), so for root `pids_cgroup` adds a cgroup whose pids.max is
`PROCESS_LIMIT`, where a writable pids controller exists; elsewhere root's fork bomb is stopped by the
wall-clock timeout, after which the PID namespace takes every process with it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PROCESS_LIMIT = 64  # processes in one sandbox, bwrap's own included
WORK_LIMIT = 64 * 2**20  # bytes the code may store in its working directory
TASK_DIR = "/tmp/task"  # the task's files (read-only) inside the sandbox
WORK_DIR = TASK_DIR + "/work"
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORK_DIR, "TMPDIR": WORK_DIR, "LC_ALL": "C.UTF-8"}


def kept_in_tmp(program: str | Path) -> list[str]:
    """The host folders under /tmp that running `program` needs, which the sandbox's private /tmp would hide:
    the program's own folder and Python's prefixes (a checkout, or its .venv, may well live under /tmp)."""
    wanted = {Path(program).absolute().parent, *(Path(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix))}
    tmp = Path("/tmp")
    return sorted({str(p) for p in wanted if p != tmp and tmp in p.parents})


def bwrap_flags(task: str | Path, program: str | Path = sys.executable) -> list[str]:
    """bwrap's arguments (before the command) for a sandbox whose task files are the folder `task` and that
    runs `program`."""
    flags = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for folder in kept_in_tmp(program):  # bound read-only again over the private /tmp
        flags += ["--ro-bind", folder, folder]
    flags += ["--ro-bind", str(task), TASK_DIR, "--size", str(WORK_LIMIT), "--tmpfs", WORK_DIR,
             "--remount-ro", "/tmp", "--remount-ro", "/dev",
             "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
             "--die-with-parent", "--new-session", "--clearenv", "--chdir", WORK_DIR]
    for name, value in _ENV.items():
        flags += ["--setenv", name, value]
    return flags


def wrap(command: list[str], task: str | Path, cgroup: Path | None = None) -> list[str]:
    """`command` run inside the sandbox; with `cgroup`, the sandbox joins it before its first fork."""
    wrapped = [shutil.which("bwrap") or "bwrap", *bwrap_flags(task, command[0]), "--", *command]
    if cgroup is None:
        return wrapped
    # The shell moves itself into the cgroup, then becomes bwrap: no process of the sandbox starts outside it.
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *wrapped]


@functools.cache
def unavailable() -> str | None:
    """Why generated code cannot be isolated on this machine, or None; probed once per process."""
    if not sys.platform.startswith("linux"):
        return f"There is no operating-system sandbox for generated code on {sys.platform} (bubblewrap is Linux-only)."
    if shutil.which("bwrap") is None:
        return ("The sandbox for generated code needs bubblewrap, which is not installed "
                "(on Debian or Ubuntu: apt install bubblewrap).")
    with tempfile.TemporaryDirectory(prefix="dllm-probe-") as task:
        Path(task, "work").mkdir()  # the working directory's mount point
        try:
            # The interpreter itself, not just a shell: it must be reachable inside (e.g. from a .venv in /tmp).
            program = ["/bin/sh", "-c", "exit 0"] if getattr(sys, "frozen", False) else [sys.executable, "-c", "pass"]
            probe = subprocess.run(wrap(program, task), capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"The bubblewrap sandbox for generated code does not start here: {exc}."
    if probe.returncode != 0:
        detail = " ".join(probe.stderr.split())[:300] or f"exit status {probe.returncode}"
        return f"The bubblewrap sandbox for generated code does not start here: {detail}."
    return None


@contextlib.contextmanager
def pids_cgroup() -> Iterator[Path | None]:
    """A fresh cgroup allowing `PROCESS_LIMIT` processes, for root only (others have RLIMIT_NPROC), or None
    where no pids controller is writable. Removed on exit, once the processes in it are gone."""
    group = _make_pids_cgroup() if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    try:
        yield group
    finally:
        if group is not None:
            _remove_cgroup(group)


def _pids_parents() -> list[Path]:
    """Where this process's pids cgroup lives: the v1 pids hierarchy, or the v2 unified one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    parents = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            parents.append(Path("/sys/fs/cgroup/pids", path.lstrip("/")))
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            parents.append(Path("/sys/fs/cgroup", path.lstrip("/")))
    return parents


def _make_pids_cgroup() -> Path | None:
    for parent in _pids_parents():
        group = parent / f"dllm-code-{secrets.token_hex(6)}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / "pids.max").write_text(str(PROCESS_LIMIT))
            return group
        except OSError:  # e.g. a v2 group whose parent does not delegate the pids controller
            _remove_cgroup(group)
    return None


def _remove_cgroup(group: Path, wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # busy: killed processes are still exiting
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
