"""The evaluation runner and `dllm-studio eval`: events, result fields, scoring of known answers, cancel, JSON."""

import json
import math

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.errors import Cancelled, InvalidSettingsError
from dllm_studio.eval import suites
from dllm_studio.eval.runner import SUITE_DEFAULTS, EvalResult, evaluate, masked_nll, suite_config
from dllm_studio.eval.suites import load_suite
from dllm_studio.events import CancelToken, DenoiseStep, EvalProgress
from dllm_studio.sampling import GenerationConfig, GenerationResult, GenerationStats

ITEMS = {
    "qa": [{"id": "qa-1", "suite": "qa", "prompt": "What is the capital of France?", "answer": "Paris"},
           {"id": "qa-2", "suite": "qa", "prompt": "What is the capital of Italy?", "answer": "Rome"},
           {"id": "qa-3", "suite": "qa", "prompt": "What colour is the sky?", "answer": "blue", "fact": "extra"}],
    "math": [{"id": "math-1", "suite": "math", "prompt": "What is 7 plus 5?", "answer": "12"},
             {"id": "math-2", "suite": "math", "prompt": "What is 2 minus 5?", "answer": "-3"}],
    "code": [{"id": "code-1", "suite": "code", "prompt": "Write a Python function larger(a, b).",
              "answer": "def larger(a, b):\n    return max(a, b)\n", "entry_point": "larger",
              "tests": ["assert larger(2, 5) == 5", "assert larger(-1, -4) == -1"]},
             {"id": "code-2", "suite": "code", "prompt": "Write a Python function add(a, b).",
              "answer": "def add(a, b):\n    return a + b\n", "entry_point": "add", "tests": ["assert add(2, 3) == 5"]}],
    "text": [{"id": "text-1", "suite": "text", "text": "The capital of France is Paris."},
             {"id": "text-2", "suite": "text", "text": "A cat is a mammal."},
             {"id": "text-3", "suite": "text", "text": "Hello! How are you today?"}],
}


def write_suite(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture
def suite_files(tmp_path):
    return {name: write_suite(tmp_path / f"{name}.test.jsonl", items) for name, items in ITEMS.items()}


# ---- the runner on a real (tiny, random) model --------------------------------------------------------

@pytest.mark.parametrize("name", ["qa", "math", "code"])
def test_answer_suites_on_tiny_llada(llada, suite_files, name):
    events = []
    result = jobs.run(evaluate(llada, load_suite(str(suite_files[name]))), events.append)
    n = len(ITEMS[name])
    assert [type(e) for e in events] == [EvalProgress] * n
    assert [(e.done, e.total, e.item_id) for e in events] == [(i + 1, n, item["id"]) for i, item in enumerate(ITEMS[name])]
    assert isinstance(result, EvalResult) and result.suite == name and result.items == n
    assert 0 <= result.accuracy <= 1 and events[-1].accuracy == result.accuracy and result.nll_per_token is None
    config = SUITE_DEFAULTS[name]
    assert result.settings["gen_length"] == config.gen_length and result.settings["steps"] == config.steps
    assert result.forward_passes_per_item == config.steps and result.ms_per_step > 0
    assert result.wall_time_per_item_s > 0 and result.wall_time_s >= result.wall_time_per_item_s * n
    assert result.peak_rss_bytes > 10 * 2**20
    for record, item in zip(result.records, ITEMS[name]):
        assert (record.id, record.prompt, record.expected) == (item["id"], item["prompt"], item["answer"])
        assert isinstance(record.generated, str) and isinstance(record.correct, bool) and record.reason


def test_text_suite_scores_a_finite_positive_nll(llada, suite_files):
    events = []
    result = jobs.run(evaluate(llada, str(suite_files["text"])), events.append)
    assert len(events) == 3 and all(e.correct is None and e.accuracy is None for e in events)
    assert result.accuracy is None and result.ms_per_step is None
    assert math.isfinite(result.nll_per_token) and result.nll_per_token > 0
    assert events[-1].nll_per_token == pytest.approx(result.nll_per_token)
    assert all(r.nll_per_token > 0 and r.generated == "" and r.correct is None for r in result.records)
    assert 0 < result.forward_passes_per_item <= 8


def test_masked_nll_is_seeded(llada, dream):
    first = masked_nll(llada, "The capital of France is Paris.", seed=1)
    assert masked_nll(llada, "The capital of France is Paris.", seed=1) == first
    assert masked_nll(llada, "The capital of France is Paris.", seed=2) != first
    nll, passes = masked_nll(dream, "The capital of France is Paris.")  # Dream's shifted logits
    assert math.isfinite(nll) and nll > 0 and passes > 0
    # Near log(vocab) for a random model, far from it would mean mis-weighted masks.
    assert 0.5 * math.log(320) < first[0] < 2 * math.log(320)


def test_limit_and_overrides(llada, suite_files):
    result = jobs.run(evaluate(llada, str(suite_files["qa"]), {"gen_length": 8, "seed": 3}, limit=2))
    assert result.items == 2 and [r.id for r in result.records] == ["qa-1", "qa-2"]
    assert (result.settings["gen_length"], result.settings["steps"], result.settings["block_length"]) == (8, 8, 8)
    assert result.settings["seed"] == 3 and result.forward_passes_per_item == 8
    with pytest.raises(InvalidSettingsError, match="limit must be at least 1"):
        jobs.run(evaluate(llada, str(suite_files["qa"]), limit=0))


def test_suite_config():
    assert suite_config("code") == GenerationConfig(gen_length=32, steps=32, block_length=32)
    assert suite_config("qa", {"steps": 8}) == GenerationConfig(gen_length=16, steps=8, block_length=16)
    assert suite_config("code", {"gen_length": 32, "block_length": 8}).steps == 32
    assert suite_config("qa", {"remasking": "margin", "cfg_scale": 1.0}).remasking == "margin"
    assert SUITE_DEFAULTS["qa"].remasking == "low_confidence"  # overrides never touch the defaults
    with pytest.raises(InvalidSettingsError, match="Unknown generation setting 'gen_len'"):
        suite_config("qa", {"gen_len": 8})
    with pytest.raises(InvalidSettingsError, match="not a multiple of block_length"):
        suite_config("qa", {"block_length": 5})


def test_cancel_between_items(llada, suite_files):
    token = CancelToken()
    job = evaluate(llada, str(suite_files["qa"]), cancel=token)
    assert next(job).done == 1
    token.cancel()
    with pytest.raises(Cancelled):
        next(job)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        jobs.run(evaluate(llada, str(suite_files["text"]), cancel=token))


# ---- scoring with a stand-in model whose answers are known --------------------------------------------

class ScriptedModel:
    """Looks like a DiffusionLM to the runner; answers each prompt with a fixed text."""

    family = "scripted"
    module = torch.nn.Module()  # no quantized layers: no kernels to report
    mask_token_id = None
    shift_logits = False
    context_length = 4096

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.prompts: list[str] = []

    def chat_ids(self, messages):
        self.prompts.append(messages[-1]["content"])
        return [len(self.prompts) - 1]

    def denoise(self, prompt_ids, config, cancel=None):
        text = self.answers[self.prompts[prompt_ids[0]]]
        yield DenoiseStep(step=1, total_steps=4, block=0, tokens=(1,), committed=(), masked=())
        return GenerationResult(text, [1, 2], list(prompt_ids),
                                GenerationStats(steps=4, forward_passes=4, wall_time_s=0.01, answer_tokens=2))


@pytest.mark.parametrize("name,answers,expected", [
    ("qa", ["The Paris.", "rome", "It is blue"], [True, True, False]),
    ("math", ["7 + 5 = 12", "The answer is 3."], [True, False]),
    ("code", ["```python\ndef larger(a, b):\n    return a if a > b else b\n```", "def add(a, b):\n    return a - b\n"],
     [True, False]),
])
def test_known_answers_are_scored(suite_files, name, answers, expected):
    model = ScriptedModel({item["prompt"]: a for item, a in zip(ITEMS[name], answers)})
    events = []
    result = jobs.run(evaluate(model, str(suite_files[name])), events.append)
    assert [r.correct for r in result.records] == expected and [e.correct for e in events] == expected
    assert result.accuracy == pytest.approx(sum(expected) / len(expected))
    assert [r.generated for r in result.records] == answers
    assert result.ms_per_step == pytest.approx(2.5) and result.forward_passes_per_item == 4
    assert result.wall_time_per_item_s == pytest.approx(0.01)
    assert model.prompts == [item["prompt"] for item in ITEMS[name]]  # the item's prompt, as the user's message


def test_reasons_say_what_went_wrong(suite_files):
    model = ScriptedModel({item["prompt"]: "no idea" for item in ITEMS["math"]})
    records = jobs.run(evaluate(model, str(suite_files["math"]))).records
    assert records[0].reason == "no number in the answer"
    model = ScriptedModel({ITEMS["code"][0]["prompt"]: "while True: pass", ITEMS["code"][1]["prompt"]: "def add(a, b) return"})
    records = jobs.run(evaluate(model, str(suite_files["code"]), limit=2)).records
    assert "timed out" in records[0].reason and "does not compile" in records[1].reason


def test_text_suite_needs_a_mask_token(suite_files):
    with pytest.raises(InvalidSettingsError, match="scripted models have no mask token"):
        jobs.run(evaluate(ScriptedModel({}), str(suite_files["text"])))


# ---- the CLI ------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, message):
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert err.count("error: ") == 1 and "Traceback" not in err


def test_cli_eval_suite_path_writes_json(capsys, llada_dir, suite_files, tmp_path):
    out_file = tmp_path / "results" / "qa.json"
    out_file.parent.mkdir()
    code, out, err = run_cli(capsys, "eval", llada_dir, "--suite", suite_files["qa"], "--json", out_file)
    assert code == 0
    assert [l.split()[:3] for l in err.splitlines() if l.startswith("qa ")] == [
        ["qa", "1/3", "qa-1:"], ["qa", "2/3", "qa-2:"], ["qa", "3/3", "qa-3:"]]
    header, row = out.splitlines()
    assert header.split() == ["suite", "items", "skipped", "score", "ms/step", "tokens/step", "passes/answer",
                              "full-seq/answer", "s/answer", "peak", "RSS"]
    assert row.split()[:4] == ["qa", "3", "0", "acc"] and row.split()[6:9] == ["1.00", "16.0", "16.0"]
    data = json.loads(out_file.read_text())
    assert data["model"] == str(llada_dir) and data["overrides"] == {} and len(data["suites"]) == 1
    qa = data["suites"][0]
    assert qa["suite"] == "qa" and qa["items"] == 3 and 0 <= qa["accuracy"] <= 1 and qa["settings"]["gen_length"] == 16
    for key in ("ms_per_step", "forward_passes_per_item", "wall_time_per_item_s", "peak_rss_bytes", "wall_time_s"):
        assert qa[key] > 0
    assert [(r["id"], r["prompt"], r["expected"]) for r in qa["records"]] == [
        (i["id"], i["prompt"], i["answer"]) for i in ITEMS["qa"]]
    assert all(isinstance(r["generated"], str) and isinstance(r["correct"], bool) for r in qa["records"])
    assert [p.name for p in out_file.parent.iterdir()] == ["qa.json"]  # no temporary file left behind


def test_cli_eval_only_given_flags_override(capsys, llada_dir, suite_files, tmp_path):
    out_file = tmp_path / "out.json"
    code, _, _ = run_cli(capsys, "eval", llada_dir, "--suite", suite_files["code"], "--limit", 1, "--steps", 16,
                         "--remasking", "margin", "--json", out_file)
    assert code == 0
    data = json.loads(out_file.read_text())
    assert data["overrides"] == {"steps": 16, "remasking": "margin"}
    settings = data["suites"][0]["settings"]
    assert (settings["gen_length"], settings["steps"], settings["block_length"], settings["remasking"]) == (32, 16, 32, "margin")
    assert settings["temperature"] == 0.0 and settings["forbid_eos"] is False


def test_cli_eval_all_runs_the_four_shipped_suites(capsys, llada_dir, suite_files, tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "TASKS_DIR", suite_files["qa"].parent)
    out_file = tmp_path / "all.json"
    code, out, _ = run_cli(capsys, "eval", llada_dir, "--suite", "all", "--limit", 1, "--gen-length", 8,
                           "--json", out_file)
    assert code == 0
    assert [l.split()[0] for l in out.splitlines()[1:]] == ["qa", "math", "code", "text"]
    assert "nll" in out.splitlines()[-1]
    data = json.loads(out_file.read_text())
    assert [(s["suite"], s["items"]) for s in data["suites"]] == [("qa", 1), ("math", 1), ("code", 1), ("text", 1)]
    assert data["suites"][2]["settings"]["gen_length"] == 8 and data["suites"][3]["nll_per_token"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--suite", "{bad}"], "bad.jsonl, line 2: invalid JSON"),
    (["--suite", "{missing}"], "No suite named"),
    (["--suite", "{qa}", "--limit", "0"], "--limit must be at least 1"),
    (["--suite", "{qa}", "--gen-length", "16", "--block-length", "5"], "not a multiple of block_length"),
    (["--suite", "{qa}", "--json", "{nowhere}"], "the folder"),
])
def test_cli_eval_errors_are_one_line(capsys, llada_dir, suite_files, tmp_path, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ITEMS["qa"][0]) + "\n{oops\n")
    paths = {"{bad}": bad, "{missing}": tmp_path / "missing.jsonl", "{qa}": suite_files["qa"],
             "{nowhere}": tmp_path / "no" / "out.json"}
    code, out, err = run_cli(capsys, "eval", llada_dir, *[paths.get(a, a) for a in argv])
    assert code == 1 and out == ""
    assert_one_line_error(err, message)
    assert "loading" not in err.lower()  # refused before any model load


def test_generate_flags_unchanged(capsys, llada_dir):
    """The shared sampler flags keep generate's own defaults."""
    from dllm_studio.cli import build_parser

    args = build_parser().parse_args(["generate", str(llada_dir), "--prompt", "Hi"])
    assert (args.gen_length, args.steps, args.block_length, args.remasking) == (64, None, None, "low_confidence")
    assert (args.temperature, args.cfg, args.seed, args.forbid_eos, args.defer_eos) == (0.0, 0.0, 0, False, False)
    args = build_parser().parse_args(["eval", str(llada_dir), "--suite", "qa"])
    assert not hasattr(args, "gen_length") and not hasattr(args, "forbid_eos")


@pytest.mark.slow
def test_cli_eval_all_skips_text_for_models_without_masks(capsys, suite_files, tmp_path, monkeypatch):
    from test_diffusion_gemma import make_diffusion_gemma

    monkeypatch.setattr(suites, "TASKS_DIR", suite_files["qa"].parent)
    folder = make_diffusion_gemma(tmp_path / "diffusiongemma-tiny")
    code, out, err = run_cli(capsys, "eval", folder, "--suite", "all", "--limit", 1, "--gen-length", 16)
    assert code == 0, err
    assert "skipping the text suite: diffusion_gemma models have no mask token" in err
    assert [l.split()[0] for l in out.splitlines()[1:]] == ["qa", "math", "code"]
