"""Task-suite files: shipped names resolve under TASKS_DIR, user files load, every malformed line is named."""

import json

import pytest

from dllm_studio.errors import SuiteError
from dllm_studio.eval import suites
from dllm_studio.eval.suites import SUITES, load_suite

QA = {"id": "qa-1", "suite": "qa", "prompt": "What is the capital of France?", "answer": "Paris"}
MATH = {"id": "math-1", "suite": "math", "prompt": "What is 7 plus 5?", "answer": "12"}
CODE = {"id": "code-1", "suite": "code", "prompt": "Write larger(a, b).", "answer": "def larger(a, b):\n    return max(a, b)",
        "entry_point": "larger", "tests": ["assert larger(2, 5) == 5"]}
TEXT = {"id": "text-1", "suite": "text", "text": "The capital of France is Paris."}


def write_lines(path, *lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    folder.mkdir()
    monkeypatch.setattr(suites, "TASKS_DIR", folder)
    return folder


def test_shipped_names_resolve_under_tasks_dir(tasks_dir):
    for item in (QA, MATH, CODE, TEXT):
        write_lines(tasks_dir / f"{item['suite']}.test.jsonl", item, {**item, "id": item["id"] + "b", "fact": "ignored"})
    write_lines(tasks_dir / "qa.train.jsonl", {**QA, "id": "train-1"})
    for name in SUITES:
        suite = load_suite(name)
        assert suite.name == name and suite.path == tasks_dir / f"{name}.test.jsonl" and len(suite) == 2
    assert [i["id"] for i in load_suite("qa", split="train").items] == ["train-1"]
    assert load_suite("qa").items[1]["fact"] == "ignored"  # extra keys are kept, and ignored by scoring


def test_the_default_tasks_dir_is_the_repositorys_resources():
    assert suites.TASKS_DIR.parts[-2:] == ("resources", "tasks")
    assert (suites.TASKS_DIR.parent.parent / "dllm_studio").is_dir()


def test_missing_shipped_suite_and_bad_split(tasks_dir):
    with pytest.raises(SuiteError, match=r"shipped math suite \(test split\) is missing: .*math.test.jsonl"):
        load_suite("math")
    with pytest.raises(SuiteError, match="Unknown split 'dev'"):
        load_suite("qa", split="dev")


def test_shipped_file_must_hold_its_own_suite(tasks_dir):
    write_lines(tasks_dir / "qa.test.jsonl", MATH)
    with pytest.raises(SuiteError, match="holds 'math' items, not 'qa' ones"):
        load_suite("qa")


def test_user_file_by_path_takes_its_suite_from_the_items(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", CODE, "", {**CODE, "id": "code-2"})  # blank lines are skipped
    suite = load_suite(str(path))
    assert suite.name == "code" and suite.path == path and [i["id"] for i in suite.items] == ["code-1", "code-2"]


def test_no_such_file_names_the_choices(tmp_path):
    with pytest.raises(SuiteError, match="No suite named 'qaa' and no file at qaa; give one of qa, math, code, text"):
        load_suite("qaa")


@pytest.mark.parametrize("lines,message", [
    ([QA, "{not json"], "line 2: invalid JSON"),
    (["[1, 2]"], "line 1: expected a JSON object, found an array"),
    (['"just a string"'], "line 1: expected a JSON object, found a string"),
    ([{k: v for k, v in QA.items() if k != "answer"}], "line 1: missing key 'answer'"),
    ([{k: v for k, v in QA.items() if k != "id"}], "line 1: missing key 'id'"),
    ([{k: v for k, v in QA.items() if k != "suite"}], "line 1: missing key 'suite'"),
    ([{**QA, "answer": "  "}], "line 1: 'answer' is empty"),
    ([{**QA, "prompt": ""}], "line 1: 'prompt' is empty"),
    ([{**MATH, "answer": 12}], "line 1: 'answer' must be a string, not a number"),
    ([{**QA, "id": 7}], "line 1: 'id' must be a string, not a number"),
    ([{**CODE, "tests": "assert True"}], "line 1: 'tests' must be an array, not a string"),
    ([{**CODE, "tests": []}], "line 1: 'tests' is empty"),
    ([{**CODE, "tests": ["assert True", 3]}], "line 1: every entry of 'tests' must be a non-empty string"),
    ([{**CODE, "entry_point": "not a name"}], "line 1: entry_point 'not a name' is not a Python name"),
    ([{k: v for k, v in TEXT.items() if k != "text"}], "line 1: missing key 'text'"),
    ([{**MATH, "answer": "twelve"}], "line 1: math answer 'twelve' is not a number"),
    ([{**QA, "suite": "trivia"}], "line 1: unknown suite 'trivia'"),
    ([QA, {**MATH, "id": "m"}], "line 2: suite 'math' differs from 'qa'"),
    ([QA, {**QA, "id": "qa-2"}, "", {**QA, "id": "qa-3"}, QA], "line 5: duplicate id 'qa-1' (first on line 1)"),
    ([], "holds no task items"),
    (["", "   "], "holds no task items"),
])
def test_malformed_files_name_the_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(SuiteError) as info:
        load_suite(str(path))
    assert str(path) in str(info.value) and message in str(info.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({**QA, "answer": "Zürich"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(SuiteError, match="is not UTF-8 text"):
        load_suite(str(path))
