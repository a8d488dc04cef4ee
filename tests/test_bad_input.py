"""Bad input ends in one specific line (CLI: "error: ...", exit 1), never a traceback, and leaves no temporary.

Covers templates the Jinja sandbox rejects, broken recipe.json and quantization_config in a quantized
folder, full or read-only disks under every write path, and task suites that cannot be run as written.
"""

import errno
import json
import shutil
import subprocess

import pytest
from safetensors import SafetensorError

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.errors import SuiteError, WriteError
from dllm_studio.eval.runner import evaluate
from dllm_studio.eval.suites import load_suite
from dllm_studio.files import atomic_write_text, os_error
from dllm_studio.quant.export import save_quantized

# What safetensors 0.8 raises when the disk fills under save_file (seen on a 64 KiB tmpfs).
FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def one_line_error(capsys, *argv) -> str:
    """Run the CLI; assert it failed with exactly one "error: " line on stderr, and return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("loading", "reading"))]
    assert code == 1, err
    assert "Traceback" not in err
    assert len([line for line in lines if line.startswith("error: ")]) == 1, err
    return next(line for line in lines if line.startswith("error: "))


@pytest.fixture
def tmpfs(tmp_path):
    """A mounted 64 KiB tmpfs (mount options by request), unmounted afterwards; skipped where mount is refused."""
    mounted = []

    def mount(options="size=64k"):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


# ---- chat templates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("template, cause", [
    ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    ("{% for %}", "TemplateSyntaxError"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ 1 + messages }}", "TypeError"),
])
def test_a_chat_template_the_sandbox_rejects_is_one_line_naming_its_file(capsys, tmp_path, dream_dir, template, cause):
    folder = tmp_path / "dream"
    shutil.copytree(dream_dir, folder)
    (folder / "chat_template.jinja").write_text(template)
    line = one_line_error(capsys, "generate", folder, "--prompt", "Hi", "--gen-length", 4)
    assert str(folder / "chat_template.jinja") in line and cause in line


# ---- quantized folders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, demo_rtn4):
    return save_quantized(demo_rtn4.model, tmp_path_factory.mktemp("q") / "demo-rtn-w4")


@pytest.mark.parametrize("text, message", [
    ('{"method": "rtn", "wbits": 4', "is not valid JSON"),
    ("[4]", "must hold a JSON object"),
    ('{"wbits": "four"}', "setting 'wbits' has the invalid value 'four'"),
    ('{"skip": [1]}', "setting 'skip' has the invalid value [1]"),
    ('{"method": "rtn", "wbits": 5}', "not a valid recipe: RTN quantizes weights to 8, 4, 3, 2 bits, not 5"),
    ('{"bits": 4}', "not a valid recipe: Unknown recipe setting(s): bits"),
])
def test_a_broken_recipe_json_is_one_line_naming_the_file(capsys, tmp_path, quantized_dir, text, message):
    folder = tmp_path / "q"
    shutil.copytree(quantized_dir, folder)
    (folder / "recipe.json").write_text(text)
    line = one_line_error(capsys, "info", folder)
    assert str(folder / "recipe.json") in line and message in line


@pytest.mark.parametrize("change, message", [
    ({"bits": 0}, "quantization_config.bits is 0"),
    ({"bits": "4"}, "quantization_config.bits is '4'"),
    ({"group_size": -8}, "quantization_config.group_size is -8"),
    ({"group_size": 0}, "quantization_config.group_size is 0"),
    ({"desc_act": "yes"}, "quantization_config.desc_act is 'yes'"),
    ({"quant_method": "exl9"}, "quantization method 'exl9' in config.json"),
])
def test_an_impossible_quantization_config_is_one_line_naming_the_field(capsys, tmp_path, quantized_dir, change, message):
    folder = tmp_path / "q"
    shutil.copytree(quantized_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, "info", folder)
    assert "config.json" in line and message in line


# ---- writes -----------------------------------------------------------------------------------------

def test_os_error_finds_the_system_cause_safetensors_reports_in_words():
    error = os_error(SafetensorError(FULL_DISK))
    assert isinstance(error, OSError) and error.errno == 28
    assert os_error(SafetensorError("Error while serializing: tensor x is not contiguous")) is None
    try:
        try:
            raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert os_error(wrapped).errno == 13
    assert os_error(ValueError("not the system's")) is None


def test_export_on_a_full_disk_says_so_and_leaves_no_partial_folder(capsys, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dllm_studio.shards._raw_bytes", full_disk)  # a tensor that no longer fits
    line = one_line_error(capsys, "quantize", "demo", "--method", "rtn", "--wbits", 4, "--out", tmp_path / "q")
    assert line == f"error: Could not write {tmp_path / 'q'}: the disk is full; nothing was written there."
    assert list(tmp_path.iterdir()) == []


def test_export_onto_a_real_full_disk(capsys, tmpfs):
    disk = tmpfs("size=64k")
    line = one_line_error(capsys, "quantize", "demo", "--method", "rtn", "--wbits", 4, "--out", disk / "q")
    assert "the disk is full" in line
    assert list(disk.iterdir()) == []


def test_eval_json_onto_a_read_only_disk_is_one_line(capsys, tmpfs):
    disk = tmpfs("ro,size=64k")
    line = one_line_error(capsys, "eval", "demo", "--suite", "qa", "--limit", 1, "--json", disk / "out.json")
    assert line == f"error: Could not write {disk / 'out.json'}: Read-only file system."


def test_atomic_write_on_a_full_disk_leaves_nothing(tmpfs):
    disk = tmpfs("size=64k")
    with pytest.raises(WriteError, match="the disk is full"):
        atomic_write_text(disk / "big.json", "x" * 200_000)
    assert list(disk.iterdir()) == []


def test_atomic_write_removes_its_temporary_on_any_failure_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text("old")

    def broken_rename(src, dst):
        raise KeyboardInterrupt  # not the system's: passes through unchanged, but the temporary goes

    monkeypatch.setattr("dllm_studio.files.os.replace", broken_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and path.read_text() == "old"


# ---- task suites ------------------------------------------------------------------------------------------

def code_item(id_, tests=("assert add(1, 2) == 3",), answer="def add(a, b):\n    return a + b\n"):
    return {"id": id_, "suite": "code", "prompt": "Write add(a, b).", "answer": answer, "entry_point": "add",
            "tests": list(tests)}


def write_suite(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_a_code_test_that_is_not_python_is_refused_at_load_with_file_line_and_id(tmp_path):
    path = write_suite(tmp_path / "mine.jsonl", [code_item("c1"), code_item("c2", tests=["assert add(1, 2) == 3",
                                                                                          "assert add(1,, 2) == 3"])])
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    assert str(caught.value).startswith(f"{path}, line 2: item 'c2' has a test that is not valid Python")


def test_a_reference_answer_that_is_not_python_or_lacks_the_entry_point_is_refused(tmp_path):
    path = write_suite(tmp_path / "a.jsonl", [code_item("c1", answer="def add(a, b)\n    return a + b\n")])
    with pytest.raises(SuiteError, match=r"line 1: item 'c1' has a reference answer that is not valid Python"):
        load_suite(path)
    path = write_suite(tmp_path / "b.jsonl", [code_item("c1"), code_item("c2", answer="def plus(a, b):\n    return a + b\n")])
    with pytest.raises(SuiteError, match=r"line 2: item 'c2': the reference answer defines no 'add'"):
        load_suite(path)


def test_an_item_longer_than_the_context_is_skipped_by_id_and_the_rest_run(tmp_path, demo_model):
    long_prompt = "What is the capital of France? " * 200  # far beyond the demo's 512 tokens
    items = [{"id": "q1", "suite": "qa", "prompt": "What is the capital of France?", "answer": "Paris"},
             {"id": "too-long", "suite": "qa", "prompt": long_prompt, "answer": "Paris"},
             {"id": "q3", "suite": "qa", "prompt": "What is the capital of Italy?", "answer": "Rome"}]
    path = write_suite(tmp_path / "qa.jsonl", items)
    result = jobs.run(evaluate(demo_model, path))
    assert [r.id for r in result.records] == ["q1", "q3"] and result.items == 2
    [skipped] = result.skipped
    n = len(demo_model.chat_ids([{"role": "user", "content": long_prompt}]))
    assert (skipped.id, skipped.reason) == ("too-long", f"prompt of {n} tokens + gen_length 16 exceeds context 512")


def test_the_cli_reports_skipped_items_and_counts_them(capsys, tmp_path):
    items = [{"id": "q1", "suite": "qa", "prompt": "What is the capital of France?", "answer": "Paris"},
             {"id": "too-long", "suite": "qa", "prompt": "Paris " * 600, "answer": "Paris"}]
    path = write_suite(tmp_path / "qa.jsonl", items)
    assert main(["eval", "demo", "--suite", str(path), "--json", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    assert any(line.startswith("skipped item too-long: prompt of ") and line.endswith("exceeds context 512")
               for line in err.splitlines())
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["suite", "items", "skipped"] and row.split()[:3] == ["qa", "1", "1"]
    [suite] = json.loads((tmp_path / "r.json").read_text())["suites"]
    assert suite["items"] == 1 and [s["id"] for s in suite["skipped"]] == ["too-long"]
