"""Task suites: JSONL files of QA, math, code and text items, shipped or the user's own.

One JSON object per line. Every item has a unique "id" and a "suite" (all lines of a file the same):

    qa, math: "prompt", "answer" (math: a number, e.g. "12" or "-3"; optional "solution", the worked
              answer a model is taught, e.g. "4 + 8 = 12"; scoring reads only the final number)
    code:     "prompt", "answer" (reference solution), "entry_point", "tests" (assert statements)
    text:     "text" (a sentence whose likelihood is scored)

Other keys are allowed and ignored. Shipped suites live in resources/tasks/{suite}.{split}.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dllm_studio.errors import SuiteError

SUITES = ("qa", "math", "code", "text")
SPLITS = ("train", "test")
TASKS_DIR = Path(__file__).resolve().parent.parent.parent / "resources" / "tasks"

_REQUIRED: dict[str, dict[str, type]] = {
    "qa": {"prompt": str, "answer": str},
    "math": {"prompt": str, "answer": str},
    "code": {"prompt": str, "answer": str, "entry_point": str, "tests": list},
    "text": {"text": str},
}


@dataclass(frozen=True)
class Suite:
    name: str  # one of SUITES
    path: Path
    items: tuple[dict, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def label(self) -> str:
        """How tables name it: a shipped suite by its name, a file by its stem (two files of qa items stay apart)."""
        shipped = any(self.path == suite_path(self.name, split) for split in SPLITS)
        return self.name if shipped else self.path.stem


def suite_path(name: str, split: str = "test") -> Path:
    """Where the shipped suite `name` keeps its `split`."""
    if split not in SPLITS:
        raise SuiteError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    return TASKS_DIR / f"{name}.{split}.jsonl"


def load_suite(name_or_path: str | Path, split: str = "test") -> Suite:
    """A shipped suite by name (qa, math, code, text), or a JSONL file of the same schema by path."""
    if isinstance(name_or_path, str) and name_or_path in SUITES:
        path = suite_path(name_or_path, split)
        if not path.is_file():
            raise SuiteError(f"The shipped {name_or_path} suite ({split} split) is missing: {path} does not exist.")
        suite = _read(path)
        if suite.name != name_or_path:
            raise SuiteError(f"{path} holds {suite.name!r} items, not {name_or_path!r} ones.")
        return suite
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise SuiteError(f"No suite named {str(name_or_path)!r} and no file at {path}; "
                         f"give one of {', '.join(SUITES)} or the path of a JSONL suite file.")
    return _read(path)


def _read(path: Path) -> Suite:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise SuiteError(f"{path} cannot be read ({exc.strerror}).") from None
    items: list[dict] = []
    first_line: dict[str, int] = {}  # item id -> line it first appeared on
    name: str | None = None
    # Split on "\n" only: str.splitlines would also break inside JSON strings holding U+2028 and kin.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        item = _parse_line(path, number, line)
        if name is None:
            name = item["suite"]
        elif item["suite"] != name:
            raise SuiteError(f"{path}, line {number}: suite {item['suite']!r} differs from {name!r} on the lines "
                             f"before; a file holds one suite.")
        if item["id"] in first_line:
            raise SuiteError(f"{path}, line {number}: duplicate id {item['id']!r} "
                             f"(first on line {first_line[item['id']]}).")
        first_line[item["id"]] = number
        items.append(item)
    if name is None:
        raise SuiteError(f"{path} holds no task items (it is empty).")
    return Suite(name, path, tuple(items))


def _parse_line(path: Path, number: int, line: str) -> dict:
    where = f"{path}, line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}).") from None
    if not isinstance(item, dict):
        raise SuiteError(f"{where}: expected a JSON object, found {_kind(item)}.")
    _check_field(where, item, "id", str)
    _check_field(where, item, "suite", str)
    if item["suite"] not in SUITES:
        raise SuiteError(f"{where}: unknown suite {item['suite']!r} (expected one of {', '.join(SUITES)}).")
    for key, kind in _REQUIRED[item["suite"]].items():
        _check_field(where, item, key, kind)
    _check_suite_specifics(where, item)
    return item


def _check_field(where: str, item: dict, key: str, kind: type) -> None:
    if key not in item:
        raise SuiteError(f"{where}: missing key {key!r}.")
    value = item[key]
    if not isinstance(value, kind):
        raise SuiteError(f"{where}: {key!r} must be {_TYPE_NAMES[kind]}, not {_kind(value)}.")
    if not (value.strip() if isinstance(value, str) else value):
        raise SuiteError(f"{where}: {key!r} is empty.")


def _check_suite_specifics(where: str, item: dict) -> None:
    from dllm_studio.eval.scoring import final_number

    if item["suite"] == "math" and final_number(item["answer"]) is None:
        raise SuiteError(f"{where}: math answer {item['answer']!r} is not a number.")
    if item["suite"] == "code":
        if not item["entry_point"].isidentifier():
            raise SuiteError(f"{where}: entry_point {item['entry_point']!r} is not a Python name.")
        for test in item["tests"]:
            if not isinstance(test, str) or not test.strip():
                raise SuiteError(f"{where}: every entry of 'tests' must be a non-empty string, found {test!r}.")
            _check_compiles(where, item, "test", test)
        _check_compiles(where, item, "reference answer", item["answer"])
        if item["entry_point"] not in _top_level_names(item["answer"]):
            raise SuiteError(f"{where}: item {item['id']!r}: the reference answer defines no "
                             f"{item['entry_point']!r} (its entry_point).")


def _check_compiles(where: str, item: dict, what: str, source: str) -> None:
    """A test (or reference answer) that is not Python would score every answer as wrong: refuse it here."""
    try:
        compile(source, f"{item['id']} {what}", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte in the source
        detail = f"{exc.msg} at its line {exc.lineno}" if isinstance(exc, SyntaxError) else str(exc)
        raise SuiteError(f"{where}: item {item['id']!r} has a {what} that is not valid Python "
                         f"({detail}): {source.strip()!r}.") from None


def _top_level_names(source: str) -> set[str]:
    """Names a module binds at its top level by def, class, assignment or import."""
    import ast

    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _kind(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)
