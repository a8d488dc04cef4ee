"""`dllm-studio compare` and `dllm-studio study` end to end on the demo: output, report files, refusals."""

import json

import pytest

from dllm_studio.cli import main
from dllm_studio.quant.export import read_profile
from dllm_studio.report import TABLE_HEADER, read_report, row_cells, study_grid, text_table

TINY = ["--calib-samples", "2", "--seq-len", "32"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def rtn4(tmp_path_factory):
    """A native RTN W4 folder of the demo, as `quantize` writes it."""
    out = tmp_path_factory.mktemp("compare") / "rtn4"
    assert main(["quantize", "demo", "--method", "rtn", "--wbits", "4", *TINY, "--out", str(out)]) == 0
    return out


def test_compare_json_prints_the_report_it_writes(capsys, tmp_path, rtn4):
    code, out, err = run_cli(capsys, "compare", "demo", rtn4, "--suite", "math", "--limit", 2, "--report", tmp_path,
                             "--json")
    assert code == 0
    printed, saved = json.loads(out), read_report(tmp_path)
    assert printed == saved
    assert [(r["model"], r["suite"], r["verdict"]) for r in printed["rows"]][0] == ("demo", "math", "baseline")
    assert [r["model"] for r in printed["rows"]] == ["demo", "rtn4"]
    variant = printed["rows"][1]
    assert variant["bits_per_weight"] == read_profile(rtn4)["summary"]["bits_per_weight"]
    assert variant["flipped_items"] == sum(item["flips"]["rtn4"]["first_flip"] is not None
                                           for item in printed["items"]["math"])
    assert err.splitlines()[0].startswith("[1/2] math on demo (")
    assert err.splitlines()[-1] == f"report: {tmp_path / 'report.html'} (and report.json, report.csv)"


def test_compare_prints_the_table_of_its_rows(capsys, tmp_path, rtn4):
    code, out, _ = run_cli(capsys, "compare", "demo", rtn4, "--suite", "qa", "--limit", 2, "--report", tmp_path,
                           "--no-flips")
    assert code == 0
    rows = read_report(tmp_path)["rows"]
    assert out == text_table([row_cells(r) for r in rows], TABLE_HEADER) + "\n"
    assert [r["flipped_items"] for r in rows] == [None, None]  # --no-flips
    assert read_report(tmp_path)["items"]["qa"][0]["flips"] == {}


def test_compare_of_a_missing_model_folder_fails_with_its_name(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, out, err = run_cli(capsys, "compare", "demo", missing, "--suite", "qa", "--limit", 1)
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == f"error: No model folder at {missing} (and it is not a hub id like 'org/name')."


def test_compare_refuses_a_file_as_report_folder_before_loading(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    code, _, err = run_cli(capsys, "compare", "demo", "demo", "--suite", "qa", "--report", taken)
    assert (code, err) == (1, f"error: Cannot write the report into {taken}: it is a file.\n")


def test_study_prints_the_grid_and_says_what_it_skips(capsys, tmp_path):
    code, out, err = run_cli(capsys, "study", "demo", "--methods", "rtn,gptq", "--bits", "w4a16,w8a8", "--suite",
                             "math", "--limit", 2, "--report", tmp_path, *TINY)
    assert code == 0
    report = read_report(tmp_path)
    header, grid = study_grid(report)
    assert out == text_table(grid, header) + "\n"
    assert [line[:2] for line in grid] == [("full precision", "demo"), ("W4A16", "RTN"), ("W4A16", "GPTQ"),
                                           ("W8A8", "RTN")]
    skipped = [c for c in report["cells"] if c["status"] == "skipped"]
    assert [c["label"] for c in skipped] == ["GPTQ W8A8"]
    assert err.splitlines()[0] == f"skipping GPTQ W8A8: {skipped[0]['reason']}"
    assert skipped[0]["reason"].startswith("GPTQ is weight-only")
    assert report["cells"][1]["recipe"]["calib_samples"] == 2 and report["cells"][1]["recipe"]["seq_len"] == 32
    assert "[cell 3/4] RTN W8A8: running (" in err and "[cell 4/4] GPTQ W8A8: skipped (" in err


def test_study_refuses_a_bad_setting(capsys, tmp_path):
    code, _, err = run_cli(capsys, "study", "demo", "--bits", "4bit", "--suite", "qa", "--report", tmp_path)
    assert (code, err) == (1, "error: A bit-width setting reads like w4a16 or w8a8, not '4bit'.\n")
