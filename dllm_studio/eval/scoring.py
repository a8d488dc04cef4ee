"""Pure scorers for generated answers, and the sandbox that runs generated code against its tests.

QA answers are compared exactly after `normalize`; math answers by their last number; code by
running the task's assert statements in a separate, limited Python process.

Threat model: the code under test is hostile. It must not write outside its own working directory,
reach any network (the host's loopback included), leave a process running after its verdict, or
exhaust the machine. The layers, in order of strength:
  1. Operating-system isolation (`dllm_studio.eval.sandbox`, Linux with bubblewrap): namespaces with no
     network, a read-only host file tree with one private size-capped writable folder, no capabilities,
     a PID namespace whose processes all die with it, and for root a pids cgroup. Where it is missing,
     code suites are refused (`SandboxUnavailableError`) unless the caller passes unsafe_code_eval=True.
  2. Kernel limits the child sets on itself before the code runs: address space, CPU time, file size,
     open files and processes; plus a wall-clock timeout after which the child is killed with its
     process group (and, sandboxed, its whole PID namespace).
  3. A fresh working directory, a minimal environment (no inherited variables, so no tokens or keys)
     and `python -I`.
  4. An in-process guard (best effort only: Python code that sets out to escape it can, e.g. through
     io.FileIO or by loading an extension module from its file): socket creation and name lookup raise,
     process creation and signalling raise, writes outside the working directory raise, and imports of
     socket, ssl and ctypes modules not yet loaded are refused. It gives clear reasons for honest
     mistakes; it is not a fence.
The sandbox does not hide the host's files from reading (only the task folder is replaced); run
untrusted models' code only on a machine whose readable files may be seen by it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import string
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from dllm_studio.errors import InvalidSettingsError, SandboxUnavailableError
from dllm_studio.eval import sandbox

_PUNCTUATION = string.punctuation + "“”‘’«»…–—¡¿。，、！？"
_ARTICLES = re.compile(r"^(?:(?:a|an|the)\s+)+")
# A number not glued to a word on its left: a minus after a digit or letter ("10-12") is a dash.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

MEMORY_LIMIT = 512 * 2**20  # bytes of address space for the code under test
OUTPUT_LIMIT = 2 * 2**20  # bytes the code may print (and write to any one file)
OUTPUT_SHOWN = 2000  # characters of the code's output kept in a CodeOutcome
FILE_LIMIT = 256  # open files
# The in-process guard (layer 4); tests switch it off to prove that the OS layers hold on their own.
IN_PROCESS_GUARDS = True
# The interpreter that runs code under test. In a frozen (PyInstaller) build sys.executable is the app
# itself, so such a build must point this at a real Python before the code suite can run.
PYTHON = sys.executable


# ---- QA and math ----------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """Lowercase, surrounding punctuation and spaces stripped, leading articles dropped, spaces collapsed."""
    text = " ".join(text.lower().split()).strip(_PUNCTUATION + " ")
    return _ARTICLES.sub("", text).strip(_PUNCTUATION + " ")


def score_qa(generated: str, answer: str) -> bool:
    """Exact match after normalisation ("The Paris." matches "Paris")."""
    return normalize(generated) == normalize(answer)


def final_number(text: str) -> str | None:
    """The last integer or decimal in `text`, canonical ("12.0" -> "12", "1,000" -> "1000"), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        value = Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def score_math(generated: str, answer: str) -> bool:
    """The answer's last number equals the expected one."""
    found = final_number(generated)
    return found is not None and found == final_number(answer)


# ---- code -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeOutcome:
    passed: bool
    reason: str  # why it failed, or how many tests passed
    output: str = ""  # the tail of what the code printed, for diagnosis


def extract_code(generated: str) -> str:
    """The code in an answer: its ``` fenced blocks joined (an unclosed last one included), else all of it."""
    blocks = _FENCE.findall(generated)
    return "\n\n".join(blocks) if blocks else generated


def score_code(generated: str, item: dict, unsafe_code_eval: bool = False) -> CodeOutcome:
    """Run the answer's code against the item's tests (see `run_code_tests`)."""
    code = extract_code(generated)
    if not code.strip():
        return CodeOutcome(False, "the answer holds no code")
    return run_code_tests(code, item["entry_point"], item["tests"], unsafe_code_eval=unsafe_code_eval)


def code_runner_missing() -> str | None:
    """Why generated code cannot be run here (a frozen build bundles no Python to run it in), or None."""
    if getattr(sys, "frozen", False) and PYTHON == sys.executable:
        return ("The code suite needs a Python interpreter to run its tests, and this build bundles none; "
                "run the qa, math and text suites, or evaluate from a Python install.")
    return None


def require_sandbox(unsafe_code_eval: bool = False) -> None:
    """Raise `SandboxUnavailableError` (with the reason) if generated code cannot be isolated here,
    unless the user has agreed to run it without isolation."""
    reason = sandbox.unavailable()
    if reason and not unsafe_code_eval:
        raise SandboxUnavailableError(reason + " Generated code is not run without isolation unless you agree to it.")


def run_code_tests(code: str, entry_point: str, tests: list[str], timeout_s: float = 5.0,
                   unsafe_code_eval: bool = False) -> CodeOutcome:
    """Run `code`, then each assert in `tests`, in a sandboxed child process; passed only if all ran and held.

    Without an OS sandbox this refuses (`require_sandbox`) unless `unsafe_code_eval`; then only
    layers 2 to 4 of the module docstring apply. The child proves it finished by printing a secret
    token it read from stdin after the last test, so code that exits early (sys.exit(0), os._exit(0))
    cannot pass.
    """
    missing = code_runner_missing()
    if missing:
        raise InvalidSettingsError(missing)
    require_sandbox(unsafe_code_eval)
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="dllm-code-", ignore_cleanup_errors=True) as root:
        Path(root, "work").mkdir()  # the working directory (the sandbox mounts its own tmpfs here)
        Path(root, "solution.py").write_text(code, encoding="utf-8")
        Path(root, "tests.json").write_text(json.dumps({"entry_point": entry_point, "tests": list(tests)}))
        output = Path(root, "output")
        returncode, timed_out = _run_child(root, output, token, timeout_s, sandbox.unavailable() is None)
        return _outcome(output, token, returncode, timed_out, timeout_s)


def _run_child(root: str, output: Path, token: str, timeout_s: float, sandboxed: bool) -> tuple[int | None, bool]:
    cpu_s = math.ceil(timeout_s) + 1
    task, processes = (sandbox.TASK_DIR, sandbox.PROCESS_LIMIT) if sandboxed else (root, 0)
    command = [PYTHON, "-I", "-X", "utf8", "-c", _HARNESS, task, str(MEMORY_LIMIT), str(cpu_s), str(OUTPUT_LIMIT),
               str(FILE_LIMIT), str(processes), str(int(IN_PROCESS_GUARDS))]
    work = Path(root, "work")
    env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LC_ALL": "C.UTF-8"}
    if os.name == "nt":
        env["SYSTEMROOT"] = os.environ.get("SYSTEMROOT", "")
    # The limits are set by the child itself before any generated code runs, not by preexec_fn:
    # preexec_fn is unsafe in a threaded parent (the GUI runs evaluations on worker threads).
    with ExitStack() as stack:
        if sandboxed:
            command = sandbox.wrap(command, root, stack.enter_context(sandbox.pids_cgroup()))
        sink = stack.enter_context(open(output, "wb"))
        proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.PIPE, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.stdin.write(f"{token}\n".encode())
            proc.stdin.close()
        except OSError:  # the child is already gone; its exit status tells why
            pass
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            if sandboxed:
                _kill_pid_namespace(proc)
            return None, True
        finally:
            _kill_group(proc)  # also any process the code left behind in its group
            proc.wait()


def _kill_pid_namespace(proc: subprocess.Popen) -> None:
    """Kill bwrap's child, the sandbox's init: the kernel then kills every process in its PID namespace,
    and bwrap exits only once they are all gone, so waiting for bwrap waits for the whole sandbox."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(int(child), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass  # the group kill that follows takes bwrap itself; --die-with-parent takes its init


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _outcome(output: Path, token: str, returncode: int | None, timed_out: bool, timeout_s: float) -> CodeOutcome:
    with open(output, "rb") as f:
        raw = f.read(OUTPUT_LIMIT + 1)
    text = raw.decode("utf-8", errors="replace")
    marker = text.rfind(token + " ")
    shown = (text[:marker] if marker >= 0 else text).rstrip()[-OUTPUT_SHOWN:]
    if timed_out:
        return CodeOutcome(False, f"timed out after {timeout_s:g} s", shown)
    if marker >= 0:
        try:
            report = json.loads(text[marker + len(token) + 1:].splitlines()[0])
            return CodeOutcome(report["passed"] is True, str(report["reason"]), shown)
        except (ValueError, KeyError, IndexError, TypeError):
            pass  # a garbled report counts as no report
    return CodeOutcome(False, _exit_reason(returncode, len(raw)), shown)


def _exit_reason(returncode: int | None, output_bytes: int) -> str:
    xfsz, xcpu = getattr(signal, "SIGXFSZ", None), getattr(signal, "SIGXCPU", None)
    if output_bytes >= OUTPUT_LIMIT or (xfsz is not None and returncode == -xfsz):
        return f"its output or a file it wrote went past the {OUTPUT_LIMIT // 2**20} MB limit"
    if xcpu is not None and returncode == -xcpu:
        return "it used up its CPU-time limit"
    if returncode is not None and returncode < 0:
        return f"it was killed by signal {signal.Signals(-returncode).name}"
    return f"it exited with status {returncode} before the tests finished"


# The child's program. argv: task folder, address-space bytes, CPU seconds, file-size bytes, open files,
# processes, in-process guards (1 or 0). It reads the token from stdin, so the token appears in no file,
# argument or environment variable.
_HARNESS = r'''
import builtins, io, json, os, sys
root, memory, cpu, fsize, files, processes, guards = sys.argv[1], *map(int, sys.argv[2:])
token = sys.stdin.readline().strip()
with open(os.path.join(root, "solution.py"), encoding="utf-8") as f:
    source = f.read()
with open(os.path.join(root, "tests.json"), encoding="utf-8") as f:
    spec = json.load(f)
work = os.path.realpath(os.getcwd())
out, write, exit_now, dumps = os.dup(1), os.write, os._exit, json.dumps


def report(passed, reason):
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    try:
        write(out, ("\n" + token + " " + dumps({"passed": passed, "reason": reason}) + "\n").encode())
    except BaseException:
        pass
    exit_now(0)  # skips atexit handlers and waiting for threads the code started


def describe(exc):
    text = " ".join(str(exc).split())
    return type(exc).__name__ + (": " + text[:300] if text else "")


def set_limits():
    try:
        import resource
    except ImportError:
        return
    wanted = [("RLIMIT_AS", memory, memory), ("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_FSIZE", fsize, fsize),
              ("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", files, files), ("RLIMIT_NPROC", processes, processes)]
    for name, soft, hard in wanted:
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            old_hard = resource.getrlimit(which)[1]
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(what + " is disabled in the code sandbox")
    return refused


def guard_network():
    import socket, _socket
    no_network = refuse("network access")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    names = ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
             "gethostbyaddr", "getnameinfo", "socketpair", "fromfd", "fromshare", "dup")
    for module in (socket, _socket):
        module.socket = module.SocketType = NoSocket
        for name in names:
            if hasattr(module, name):
                setattr(module, name, no_network)


def guard_processes():
    no_process = refuse("starting or signalling processes")
    modules = [os]
    for name in ("posix", "_posixsubprocess"):
        try:
            modules.append(__import__(name))
        except ImportError:
            pass
    for module in modules:
        for name in dir(module):
            if (name.startswith(("exec", "spawn", "posix_spawn", "fork")) or name == "fork_exec"
                    or name in ("system", "popen", "kill", "killpg")):
                setattr(module, name, no_process)


def inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    full = os.path.realpath(os.fsdecode(os.fspath(path)))
    return full == work or full.startswith(work + os.sep)


def guard_writes():
    outside = "writing outside the sandbox's working directory"

    def checked(func, paths=lambda args, kwargs: args):
        def wrapper(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(outside + " (dir_fd) is disabled in the code sandbox")
            for p in paths(args, kwargs):
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                    raise PermissionError(outside + " is disabled in the code sandbox")
            return func(*args, **kwargs)
        return wrapper

    def path_args(args, kwargs):
        return list(args) + [kwargs[k] for k in ("path", "src", "dst", "file") if k in kwargs]

    def open_paths(args, kwargs):
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return path_args(args[:1], kwargs) if any(c in str(mode) for c in "wax+") else []

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open_paths(args, kwargs):
        flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
        return path_args(args[:1], kwargs) if flags & writing else []

    builtins.open = io.open = checked(io.open, open_paths)
    os.open = checked(os.open, os_open_paths)
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
                 "symlink", "link", "truncate", "chmod", "lchmod", "chown", "lchown", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            setattr(os, name, checked(getattr(os, name), path_args))


class BlockImports:
    """Refuse modules that could undo the guards; those already loaded stay patched in sys.modules."""

    blocked = {"socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "_posixsubprocess", "posix", "nt",
               "multiprocessing", "_multiprocessing", "cffi", "_cffi_backend"}

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in cls.blocked:
            raise ImportError("importing " + name + " is disabled in the code sandbox")
        return None


set_limits()
if guards:
    guard_network()
    guard_processes()
    guard_writes()
    sys.meta_path.insert(0, BlockImports)
namespace = {"__name__": "solution"}  # not "__main__": a demo block at the bottom should not run
try:
    program = compile(source, "solution.py", "exec")
except (SyntaxError, ValueError) as exc:
    report(False, "the code does not compile: " + describe(exc))
try:
    exec(program, namespace)
except SystemExit as exc:
    report(False, "the code called sys.exit(" + repr(exc.code) + ") before the tests ran")
except BaseException as exc:
    report(False, "the code raised " + describe(exc))
if not callable(namespace.get(spec["entry_point"])):
    report(False, "the code defines no function " + spec["entry_point"])
for test in spec["tests"]:
    try:
        exec(compile(test, "test", "exec"), namespace)
    except AssertionError:
        report(False, "test failed: " + test)
    except SystemExit as exc:
        report(False, "sys.exit(" + repr(exc.code) + ") was called during the test: " + test)
    except BaseException as exc:
        report(False, "test " + test + " raised " + describe(exc))
report(True, "all " + str(len(spec["tests"])) + " tests passed")
'''
