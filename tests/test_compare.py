"""The comparison engine: decision flips, `compare`, the `study` sweep with its cache, and the report files."""

import csv
import html
import json
import math
import weakref

import pytest
import torch

from dllm_studio import jobs, sampling
from dllm_studio.compare import REPORT_VERSION, Candidate, CompareStage, SuiteCompared, compare
from dllm_studio.errors import Cancelled, InvalidSettingsError, QuantizationError, SuiteError, WriteError
from dllm_studio.eval.drop import compare_results
from dllm_studio.eval.runner import evaluate
from dllm_studio.eval.stats import wilson
from dllm_studio.events import CancelToken, EvalProgress
from dllm_studio.flips import decision_flips, first_divergence
from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant import pipeline
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.report import FILES, ROW_FIELDS, ReportError, charts, read_report, study_grid, write_report
from dllm_studio.sampling import GenerationConfig
from dllm_studio.study import CACHE, StudyProgress, parse_setting, plan, study

TINY = {"calib_samples": 2, "seq_len": 32}  # a recipe's calibration, small enough for a test


def never_load():
    pytest.fail("a model was loaded before the inputs were checked")


@pytest.fixture(scope="module")
def rtn4(demo_model):
    """The demo quantized RTN W4: on math's first three items it gets the second wrong ('5 + 1 = 5')."""
    return jobs.run(pipeline.quantize(demo_model, QuantRecipe(method="rtn", wbits=4, **TINY)))


def rtn4_candidate(rtn4) -> Candidate:
    return Candidate("rtn4", model=rtn4.model, profile={"summary": rtn4.summary, "layers": rtn4.layers})


@pytest.fixture(scope="module")
def compared(demo_model, rtn4):
    """The demo against its RTN W4 variant on qa and math (3 items each, with flips): (report, events)."""
    events = []
    report = jobs.run(compare([Candidate("demo", model=demo_model), rtn4_candidate(rtn4)], ["qa", "math"], limit=3),
                      events.append)
    return report, events


def row_of(report, model, suite):
    return next(r for r in report["rows"] if r["model"] == model and r["suite"] == suite)


# ---- decision flips ------------------------------------------------------------------------------------

def trajectory(model, prompt_ids, config):
    return jobs.run(sampling.denoise(model, prompt_ids, config)).steps


def demo_prompt(model):
    return model.chat_ids([{"role": "user", "content": "What is the capital of France?"}])


@pytest.mark.parametrize("config", [
    GenerationConfig(gen_length=16, steps=8, block_length=8),  # two blocks, two tokens a step
    GenerationConfig(gen_length=16, steps=8, block_length=8, remasking="random", temperature=0.7, seed=3),
], ids=["greedy", "random-remasking-sampled"])
def test_a_model_teacher_forced_on_its_own_trajectory_never_flips(demo_model, config):
    prompt = demo_prompt(demo_model)
    steps = trajectory(demo_model, prompt, config)
    flips = decision_flips(demo_model, prompt, config, steps, steps)
    assert (flips.first_flip, flips.flipped_steps, flips.first_divergence) == (None, 0, None)
    assert [s.step for s in flips.steps] == [s.step for s in steps] == list(range(1, 9))
    assert [[(c.position, c.token_id) for c in d.candidate] for d in flips.steps] == \
           [[(c.position, c.token_id) for c in s.committed] for s in steps]
    if config.temperature:  # the draws matter: teacher-forced under another seed, the same steps do flip
        reseeded = GenerationConfig(**{**config.__dict__, "seed": config.seed + 1})
        assert decision_flips(demo_model, prompt, reseeded, steps).first_flip is not None


PROMPT = [0, 1]


class FixedLogits:
    """A stand-in model whose answer positions have fixed probabilities over tokens 0..3 (4 is the mask), whatever
    the state: which position a step commits follows from the rows alone."""

    mask_token_id, stop_token_ids, context_length, family, shift_logits = 4, (3,), 16, "fixed", False
    device, dtype, module = torch.device("cpu"), torch.float32, torch.nn.Module()
    no_kv_cache = "its logits are written by hand"
    answer_length, check_settings = DiffusionLM.answer_length, DiffusionLM.check_settings

    def __init__(self, rows):
        self.rows = rows

    def forward(self, x):
        logits = torch.full((*x.shape, 5), -30.0)
        logits[:, len(PROMPT):, :4] = torch.tensor(self.rows).clamp_min(1e-9).log()
        return logits

    def decode(self, ids):
        return " ".join(map(str, ids))


# The reference commits position 0 (token 0, p .9), then 1 (token 1, p .8), then 2 (token 2, p .7).
REFERENCE = [[0.9, 0.05, 0.05, 0.0], [0.1, 0.8, 0.1, 0.0], [0.1, 0.1, 0.7, 0.1]]
THREE = GenerationConfig(gen_length=3, steps=3, block_length=3)


def test_a_model_preferring_another_token_flips_at_that_step():
    other = FixedLogits([*REFERENCE[:2], [0.1, 0.7, 0.1, 0.1]])  # position 2 would get token 1
    reference = trajectory(FixedLogits(REFERENCE), PROMPT, THREE)
    flips = decision_flips(other, PROMPT, THREE, reference, trajectory(other, PROMPT, THREE))
    assert [(d.flipped, d.other_positions, d.other_tokens) for d in flips.steps] == \
           [(False, False, False), (False, False, False), (True, False, True)]
    assert [(c.position, c.token_id) for c in flips.steps[2].candidate] == [(2, 1)]
    assert (flips.first_flip, flips.flipped_steps, flips.first_divergence) == (3, 1, 3)


def test_a_model_surer_of_a_later_position_flips_where_it_would_commit_elsewhere():
    other = FixedLogits([*REFERENCE[:2], [0.05, 0.05, 0.85, 0.05]])  # position 2 now beats position 1 at step 2
    reference = trajectory(FixedLogits(REFERENCE), PROMPT, THREE)
    own = trajectory(other, PROMPT, THREE)
    flips = decision_flips(other, PROMPT, THREE, reference, own)
    assert [(d.flipped, d.other_positions, d.other_tokens) for d in flips.steps] == \
           [(False, False, False), (True, True, False), (False, False, False)]
    assert own[-1].tokens == reference[-1].tokens == (0, 1, 2)  # the same answer, reached in another order
    assert (flips.first_flip, flips.first_divergence) == (2, 2)
    decided = flips.to_dict()["decisions"][1]
    assert (decided["reference"], decided["candidate"], decided["other_position"]) == ([[1, 1]], [[2, 2]], True)


def steps_of(*states):
    return [tuple(s) for s in states]


def test_first_divergence_of_hand_made_trajectories():
    ours = steps_of((9, 1, 9), (0, 1, 9), (0, 1, 2))
    assert first_divergence(ours, steps_of((9, 1, 9), (0, 1, 9), (0, 1, 2))) is None
    assert first_divergence(ours, steps_of((9, 1, 9), (1, 1, 9), (1, 1, 2))) == 2
    assert first_divergence(ours, steps_of((9, 1, 9), (0, 1, 9), (0, 1, 3))) == 3
    assert first_divergence(ours, steps_of((9, 1, 9), (0, 1, 9))) == 3  # one ending sooner diverges there
    assert first_divergence(steps_of((9, 1, 9)), ours) == 2


# ---- compare -------------------------------------------------------------------------------------------

def test_the_same_model_under_another_label_agrees_everywhere(demo_model):
    events = []
    report = jobs.run(compare([Candidate("demo", model=demo_model), Candidate("again", model=demo_model)],
                              ["qa", "text"], limit=2), events.append)
    stages = [(e.suite, e.model, e.index, e.total) for e in events if isinstance(e, CompareStage)]
    assert stages == [("qa", "demo", 1, 4), ("text", "demo", 2, 4), ("qa", "again", 3, 4), ("text", "again", 4, 4)]
    assert next(e for e in events if isinstance(e, CompareStage)).eta_s is None
    assert [e.row for e in events if isinstance(e, SuiteCompared)] == report["rows"]
    for suite in ("qa", "text"):
        base, again = row_of(report, "demo", suite), row_of(report, "again", suite)
        assert (base["verdict"], base["relative_drop"], base["agreement"], base["flipped_items"]) == \
               ("baseline", None, None, None)
        assert (again["score"], again["relative_drop"], again["verdict"]) == \
               (base["score"], 0.0, "not significant at n = 2")
    qa = row_of(report, "again", "qa")
    assert (qa["agreement"], qa["flipped_items"], qa["first_flip_mean"], qa["p_value"]) == (1.0, 0, None, 1.0)
    assert (row_of(report, "again", "text")["agreement"], row_of(report, "again", "text")["flipped_items"]) == \
           (None, None)  # the text suite has no answers to agree on or steps to flip
    assert [flips["first_flip"] for item in report["items"]["qa"] for flips in item["flips"].values()] == [None, None]
    assert (report["suites"], report["base"], report["kind"], report["version"]) == (["qa", "text"], "demo",
                                                                                     "compare", REPORT_VERSION)


@pytest.mark.parametrize("labels,suites,settings,error,message", [
    (["a"], ["qa"], {}, InvalidSettingsError, "Compare needs a base model and at least one variant."),
    (["a", "a"], ["qa"], {}, InvalidSettingsError, "Two models share a label: a, a."),
    (["a", "b"], ["qa"], {"limit": 0}, InvalidSettingsError, "limit must be at least 1, not 0."),
    (["a", "b"], [], {}, InvalidSettingsError, "Choose at least one suite."),
    (["a", "b"], ["qa", "nope"], {}, SuiteError, "No suite named 'nope'"),
    (["a", "b"], ["qa"], {"overrides": {"remasking": "sideways"}}, InvalidSettingsError, "remasking must be one of"),
])
def test_bad_inputs_are_refused_before_any_model_loads(labels, suites, settings, error, message):
    candidates = [Candidate(label, load=never_load) for label in labels]
    with pytest.raises(error) as raised:
        jobs.run(compare(candidates, suites, **settings))
    assert str(raised.value).startswith(message)


def test_a_cancel_after_the_first_row_stops_with_the_base_row_only(demo_model):
    cancel, rows = CancelToken(), []

    def on_event(event):
        if isinstance(event, SuiteCompared):
            rows.append(event.row)
            cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(compare([Candidate("demo", model=demo_model), Candidate("again", model=demo_model)],
                         ["qa", "math"], limit=2, cancel=cancel), on_event)
    assert [(r["model"], r["suite"], r["verdict"]) for r in rows] == [("demo", "qa", "baseline")]


class Held:
    """The demo under another identity whose loading and letting go are logged."""

    def __init__(self, model, label, log):
        self._model = model
        log.append(f"load {label}")
        weakref.finalize(self, log.append, f"release {label}")

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_candidates_are_loaded_one_at_a_time(demo_model):
    log = []
    candidates = [Candidate(label, load=lambda label=label: Held(demo_model, label, log)) for label in "abc"]
    report = jobs.run(compare(candidates, ["qa"], limit=1))
    assert log == ["load a", "release a", "load b", "release b", "load c", "release c"]
    assert [m["label"] for m in report["models"]] == ["a", "b", "c"]


def test_rows_hold_the_paired_statistics_of_the_same_evaluations(compared, demo_model, rtn4):
    report, events = compared
    base = jobs.run(evaluate(demo_model, "math", limit=3))
    quant = jobs.run(evaluate(rtn4.model, "math", limit=3))
    stats = compare_results(base, quant)
    row = row_of(report, "rtn4", "math")
    assert [r.correct for r in base.records] == [True, True, True]
    assert [r.correct for r in quant.records] == [True, False, True]  # the variant's miss makes the row non-trivial
    assert (row["score"], row["relative_drop"], row["p_value"], row["test"], row["verdict"], row["band"]) == \
           (quant.accuracy, stats.drop, stats.p_value, stats.test, stats.verdict, stats.band or "")
    assert (row["drop_low"], row["drop_high"]) == stats.drop_interval
    # in points too: 1 of 3 lost is 33.3 points, with Newcombe's interval on the difference itself (b = 1, c = 0)
    from dllm_studio.eval.stats import paired_difference_interval

    assert row["absolute_drop"] == pytest.approx(1 / 3)
    assert (row["absolute_drop_low"], row["absolute_drop_high"]) == pytest.approx(paired_difference_interval(2, 1, 0, 0))
    assert (row["score_low"], row["score_high"]) == wilson(2, 3)
    base_row = row_of(report, "demo", "math")
    assert (base_row["score"], base_row["score_low"], base_row["score_high"]) == (1.0, *wilson(3, 3))
    assert row["agreement"] == sum(a.generated == b.generated for a, b in zip(base.records, quant.records)) / 3
    assert [a["rtn4"]["text"] for a in (i["answers"] for i in report["items"]["math"])] == \
           [r.generated for r in quant.records]
    assert row["bits_per_weight"] == rtn4.summary["bits_per_weight"]
    assert row["weight_bytes"] == rtn4.model.weight_bytes()


def test_flips_are_counted_per_item_and_match_the_free_running_divergence(compared):
    report, _ = compared
    for suite in ("qa", "math"):
        items = report["items"][suite]
        flips = [item["flips"]["rtn4"] for item in items]
        # Up to the first flip both models see the same states and draw alike, so their own runs part exactly there.
        assert [f["first_flip"] for f in flips] == [f["first_divergence"] for f in flips]
        differs = [i["answers"]["demo"]["text"] != i["answers"]["rtn4"]["text"] for i in items]
        assert all(f["first_divergence"] is not None for f, d in zip(flips, differs) if d)
        firsts = [f["first_flip"] for f in flips if f["first_flip"] is not None]
        row = row_of(report, "rtn4", suite)
        assert (row["flipped_items"], row["first_flip_mean"]) == (len(firsts), math.fsum(firsts) / len(firsts)
                                                                  if firsts else None)
    # The order of the end-of-text padding after the answer is no flip: on qa the variant makes every decision that
    # shapes the answer; on math it flips on the item it gets wrong and on one more whose answer ends the same.
    assert [row_of(report, "rtn4", s)["flipped_items"] for s in ("qa", "math")] == [0, 2]
    wrong = report["items"]["math"][1]["flips"]["rtn4"]  # "5 + 1 = 5" for "5 + 1 = 6": only its last digit flips
    assert [d["step"] for d in wrong["decisions"] if d["flipped"]] == [16] and wrong["decisions"][15]["other_token"]


# ---- study ---------------------------------------------------------------------------------------------

def test_plan_keeps_valid_settings_in_order_and_skips_the_rest_with_the_recipes_reason():
    cells = plan(["rtn", "gptq", "smoothquant"], [(4, 16), (8, 8)], TINY)
    assert [(c["label"], c["status"]) for c in cells] == [
        ("RTN W4A16", "pending"), ("GPTQ W4A16", "pending"), ("SMOOTHQUANT W4A16", "skipped"),
        ("RTN W8A8", "pending"), ("GPTQ W8A8", "skipped"), ("SMOOTHQUANT W8A8", "pending")]
    for cell, (method, wbits, abits) in zip(cells, [("rtn", 4, 16), ("gptq", 4, 16), ("smoothquant", 4, 16),
                                                   ("rtn", 8, 8), ("gptq", 8, 8), ("smoothquant", 8, 8)]):
        recipe = QuantRecipe(method=method, wbits=wbits, abits=abits, **TINY)
        if cell["status"] == "pending":
            assert (cell["recipe"], cell["reason"]) == (recipe.validate().to_dict(), "")
        else:
            with pytest.raises(QuantizationError) as refused:
                recipe.validate()
            assert (cell["recipe"], cell["reason"]) == (None, str(refused.value))
    with pytest.raises(InvalidSettingsError, match="Unknown method nope; choose from rtn, "):
        plan(["rtn", "nope"], [(4, 16)])


def test_parse_setting():
    assert [parse_setting(t) for t in ("w4", "W4A16", " w8a8 ", "w3a16")] == [(4, 16), (4, 16), (8, 8), (3, 16)]
    with pytest.raises(InvalidSettingsError) as refused:
        parse_setting("4bit")
    assert str(refused.value) == "A bit-width setting reads like w4a16 or w8a8, not '4bit'."


@pytest.fixture
def quantize_calls(monkeypatch):
    """The labels of the recipes the pipeline is asked to quantize (study imports it when it runs)."""
    calls, real = [], pipeline.quantize

    def counting(model, recipe, cancel=None):
        calls.append(recipe.label)
        return (yield from real(model, recipe, cancel))

    monkeypatch.setattr(pipeline, "quantize", counting)
    return calls


def run_study(demo_model, folder, settings=((4, 16),), on_event=None, **options):
    return jobs.run(study(Candidate("demo", model=demo_model), ["rtn"], list(settings), ["math"], folder,
                          recipe=TINY, **{"limit": 2, **options}), on_event)


def test_a_rerun_resumes_from_the_cache_and_new_settings_make_new_entries(demo_model, tmp_path, quantize_calls):
    first = run_study(demo_model, tmp_path)
    assert quantize_calls == ["RTN W4A16 g128"]
    assert len(list((tmp_path / CACHE).iterdir())) == 2  # the base's math and the cell's
    events = []
    second = run_study(demo_model, tmp_path, on_event=events.append)
    assert quantize_calls == ["RTN W4A16 g128"]  # nothing quantized again
    assert not any(isinstance(e, EvalProgress) for e in events)  # nor evaluated
    assert second["rows"] == first["rows"]
    assert [r["model"] for r in second["rows"]] == ["demo", "RTN W4A16"]
    assert read_report(tmp_path)["rows"] == first["rows"]
    run_study(demo_model, tmp_path, limit=3)
    assert quantize_calls == ["RTN W4A16 g128"] * 2
    assert len(list((tmp_path / CACHE).iterdir())) == 4
    run_study(demo_model, tmp_path, overrides={"remasking": "margin"})
    assert quantize_calls == ["RTN W4A16 g128"] * 3
    assert len(list((tmp_path / CACHE).iterdir())) == 6


def test_a_cancelled_study_keeps_its_finished_cells_on_disk_and_resumes_after_them(demo_model, tmp_path,
                                                                                    quantize_calls):
    cancel = CancelToken()

    def on_event(event):
        if isinstance(event, SuiteCompared) and event.row["model"] == "RTN W4A16":
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_study(demo_model, tmp_path, [(4, 16), (2, 16)], on_event, cancel=cancel)
    saved = read_report(tmp_path)
    assert [(r["model"], r["suite"]) for r in saved["rows"]] == [("demo", "math"), ("RTN W4A16", "math")]
    quantize_calls.clear()
    events = []
    final = run_study(demo_model, tmp_path, [(4, 16), (2, 16)], events.append)
    assert quantize_calls == ["RTN W2A16 g128"]
    assert final["rows"][:2] == saved["rows"]
    assert [(e.cell, e.label, e.stage) for e in events if isinstance(e, StudyProgress)] == \
           [(1, "RTN W4A16", "running"), (2, "RTN W2A16", "running")]
    assert [c["status"] for c in final["cells"]] == ["done", "done"]


def test_an_unusable_report_folder_is_refused_before_loading(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file where the folder should be")
    with pytest.raises(WriteError) as refused:
        jobs.run(study(Candidate("demo", load=never_load), ["rtn"], [(4, 16)], ["qa"], taken))
    assert str(refused.value).startswith(f"Cannot use {taken} for the study's report: ")


def test_a_study_with_no_producible_setting_is_refused_before_loading(tmp_path):
    with pytest.raises(InvalidSettingsError) as refused:
        jobs.run(study(Candidate("demo", load=never_load), ["gptq"], [(8, 8)], ["qa"], tmp_path))
    assert str(refused.value).startswith("No method can produce any of these settings: GPTQ W8A8: GPTQ is weight-only")
    assert not (tmp_path / CACHE).exists()


# ---- report files --------------------------------------------------------------------------------------

def test_write_report_lays_out_three_files_that_read_back(compared, tmp_path):
    report, _ = compared
    assert write_report(report, tmp_path / "r") == [tmp_path / "r" / name for name in FILES]
    assert read_report(tmp_path / "r") == json.loads(json.dumps(report))
    assert read_report(tmp_path / "r" / "report.json") == read_report(tmp_path / "r")
    with open(tmp_path / "r" / "report.csv", newline="", encoding="utf-8") as table:
        lines = list(csv.reader(table))
    assert lines[0] == list(ROW_FIELDS)
    assert [(line[0], line[1], line[4]) for line in lines[1:]] == \
           [(r["model"], r["suite"], str(r["score"])) for r in report["rows"]]


def test_report_html_inlines_every_chart(compared, tmp_path):
    report, _ = compared
    write_report(report, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    drawn = charts(report)
    assert list(drawn) == ["Accuracy per category", "Accuracy vs size", "Latency vs size", "Layer outliers",
                           "Layer error"]
    assert page.count("<svg") == len(drawn)
    assert all(svg in page for svg in drawn.values())
    assert "<h2>Accuracy by bit-width" not in page  # a comparison has no study grid


def test_a_study_report_shows_its_grid_and_its_skipped_settings(demo_model, tmp_path):
    report = jobs.run(study(Candidate("demo", model=demo_model), ["rtn", "gptq"], [(4, 16), (8, 8)], ["math"],
                            tmp_path, limit=2, recipe=TINY))
    header, grid = study_grid(report)
    assert header == ("setting", "method", "math")
    assert [line[:2] for line in grid] == [("full precision", "demo"), ("W4A16", "RTN"), ("W4A16", "GPTQ"),
                                           ("W8A8", "RTN")]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    grid_html = page.split("<h2>Accuracy by bit-width, method and category</h2>")[1].split("</table>")[0]
    assert all(f">{html.escape(cell)}</td>" in grid_html for line in grid for cell in line)
    skipped = next(c for c in report["cells"] if c["status"] == "skipped")
    assert f"<li>GPTQ W8A8: {html.escape(skipped['reason'])}</li>" in page
    assert page.count("<svg") == len(charts(report))


@pytest.fixture
def saved_report(compared, tmp_path):
    write_report(compared[0], tmp_path)
    return tmp_path / "report.json"


def rewrite(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_read_report_names_what_is_wrong(saved_report, tmp_path):
    def refused(path):
        with pytest.raises(ReportError) as raised:
            read_report(path)
        return str(raised.value)

    assert refused(tmp_path / "absent") == f"Cannot read {tmp_path / 'absent'}: No such file or directory."
    (tmp_path / "garbage.json").write_text("not json at all")
    assert refused(tmp_path / "garbage.json").startswith(f"{tmp_path / 'garbage.json'} is not a dLLM Studio report "
                                                         "(not JSON: ")
    rewrite(saved_report, lambda d: d.update(version=REPORT_VERSION + 1))
    assert refused(tmp_path) == f"{saved_report} was written by a newer dLLM Studio (report version " \
                                f"{REPORT_VERSION + 1})."
    rewrite(saved_report, lambda d: d.update(version=REPORT_VERSION, kind="eval"))
    assert refused(saved_report) == f"{saved_report} is not a dLLM Studio report (no compare or study kind)."
    rewrite(saved_report, lambda d: (d.update(kind="compare"), d["rows"][1].pop("verdict"), d.pop("models")))
    assert refused(saved_report) == f"{saved_report} is not a complete dLLM Studio report (missing models, verdict)."


def test_the_order_of_the_padding_after_the_answer_is_no_flip():
    from dllm_studio.events import Commit
    from dllm_studio.flips import Padding, StepDecision

    eos, mask = 9, 0
    padding = Padding(answer_end=3, stop_ids=frozenset({eos}))  # the reference answer: 3 tokens, then its end
    step = lambda ours, theirs: StepDecision(1, 0, tuple(Commit(p, t, 1.0) for p, t in theirs),  # noqa: E731
                                             tuple(Commit(p, t, 1.0) for p, t in ours), padding)
    assert not step([(5, eos)], [(6, eos)]).flipped  # padding, committed in another order
    assert step([(5, eos)], [(3, eos)]).other_positions  # the answer ends elsewhere
    assert step([(5, 4)], [(5, eos)]).flipped  # writing past the answer's end
    assert padding.normalized((1, 2, 3, eos, mask, eos), mask) == padding.normalized((1, 2, 3, eos, eos, mask), mask)
    assert padding.normalized((1, 2, 3, mask), mask) != padding.normalized((1, 2, 3, eos), mask)  # the end itself counts


def test_a_suite_file_is_a_row_of_its_own_and_two_of_one_name_are_refused(demo_model, tmp_path):
    from dllm_studio.eval.suites import load_suite

    items = load_suite("qa").items[:2]
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.jsonl").write_text(mine.read_text())
    report = jobs.run(compare([Candidate("a", demo_model), Candidate("b", demo_model)], ["qa", mine], limit=2,
                              flips=False))
    assert report["suites"] == ["qa", "mine"] and [r["suite"] for r in report["rows"]] == ["qa", "mine"] * 2
    assert list(report["items"]) == ["qa", "mine"]  # each file's answers apart, though both hold qa items
    with pytest.raises(InvalidSettingsError, match=r"Two suites share a name \(mine, mine\)"):
        jobs.run(compare([Candidate("a", load=never_load), Candidate("b", load=never_load)],
                         [mine, tmp_path / "other" / "mine.jsonl"]))
