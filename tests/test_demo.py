"""The bundled demo model and its task suites."""

import json
from pathlib import Path

import pytest

from dllm_studio import jobs
from dllm_studio.demo import tasks
from dllm_studio.eval.runner import suite_config
from dllm_studio.eval.scoring import score_code, score_math, score_qa
from dllm_studio.eval.suites import TASKS_DIR, load_suite
from dllm_studio.hub import DEMO_PATH


def test_generators_are_deterministic_and_match_the_shipped_files(tmp_path):
    first = tasks.write_suites(tmp_path / "a")
    tasks.write_suites(tmp_path / "b")
    for suite in tasks.GENERATORS:
        for split in ("train", "test"):
            name = f"{suite}.{split}.jsonl"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
            assert (tmp_path / "a" / name).read_bytes() == (TASKS_DIR / name).read_bytes(), f"regenerate {name}"
    assert first["qa"][1] >= 100 and first["math"][1] == tasks.MATH_TEST_ITEMS and first["code"][1] >= 40


@pytest.mark.parametrize("suite", ["qa", "math", "code", "text"])
def test_splits_are_disjoint(suite):
    train, test = load_suite(suite, "train").items, load_suite(suite, "test").items
    key = "text" if suite == "text" else "prompt"
    assert not {x[key] for x in train} & {x[key] for x in test}  # no test question appears in training
    assert not {(x["fact"], x["template"]) for x in train} & {(x["fact"], x["template"]) for x in test}
    assert {x["fact"] for x in test} <= {x["fact"] for x in train}  # ...but every tested fact was taught


def test_reference_answers_score_correct():
    for item in load_suite("qa").items[:20]:
        assert score_qa(item["answer"], item["answer"])
    for item in load_suite("math").items[:20]:
        assert score_math(f"The answer is {item['answer']}.", item["answer"])
    for split in ("train", "test"):  # the worked solution the model is taught ends in the scored number
        for item in load_suite("math", split).items:
            assert score_math(item["solution"], item["answer"]) and item["solution"].endswith(f"= {item['answer']}")
    for item in load_suite("code").items[:5]:
        assert score_code(item["answer"], item).passed


def test_every_taught_answer_fits_the_answer_window_eval_generates():
    from dllm_studio.demo.train import GEN_LENGTH, encode_sft
    from dllm_studio.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_PATH)
    for suite, length in GEN_LENGTH.items():
        assert suite_config(suite).gen_length == length
        for item in load_suite(suite, "train").items + load_suite(suite, "test").items:
            prompt, answer = encode_sft(tokenizer, item, suite)  # raises when the answer does not fit
            assert len(answer) == length and prompt


def test_training_run_saves_a_checkpoint_that_loads_and_records_its_recipe(tmp_path):
    """The real recipe for a few seconds, on a tiny model: the folder loads like the shipped one."""
    from dllm_studio.demo.train import DRAWS, SFT_MIX, Recipe, draws, train
    from dllm_studio.models import load_model

    report = train(tmp_path / "m", seed=0, recipe=Recipe(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64,
                                                          minutes=0.05), log=lambda line: None)
    assert report["steps"] > 0 and report["sft_mix"] == SFT_MIX and report["draws"] == DRAWS
    model = load_model(tmp_path / "m")
    assert model.config["d_model"] == 32 and model.tokenizer.mask_token_id is not None
    math, qa = load_suite("math", "train").items, load_suite("qa", "train").items
    assert {draws(x) for x in math if tasks.math_op(x) == "-"} == {2}  # the slowest-learnt operation
    assert {draws(x) for x in math if tasks.math_op(x) != "-"} == {1}
    assert {draws(x) for x in qa if tasks.qa_phrasing(x) == "subject-first"} == {3}  # the slowest-learnt phrasing
    assert {draws(x) for x in qa if tasks.qa_phrasing(x) == "question-first"} == {1}


def test_qa_phrasing_tells_subject_first_questions_apart():
    def phrasing(prompt):
        return tasks.qa_phrasing(next(x for x in load_suite("qa", "test").items + load_suite("qa", "train").items
                                      if x["prompt"] == prompt))

    assert phrasing("The capital of Spain is which city?") == "subject-first"
    assert phrasing("Snow is usually what colour?") == "subject-first"
    assert phrasing("Which city is the capital of Germany?") == "question-first"
    assert phrasing("Tell me the capital of France.") == "question-first"


def test_demo_checkpoint_is_small_and_laid_out_like_llada():
    files = {p.name for p in DEMO_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in DEMO_PATH.iterdir()) <= 25 * 1024 * 1024
    config = json.loads((DEMO_PATH / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".py") for p in DEMO_PATH.iterdir())


@pytest.fixture(scope="module")
def demo():
    from dllm_studio.models import load_model

    return load_model("demo")


def test_demo_answers_held_out_items(demo):
    """A handful of held-out items per suite; the full scores are in the model card.

    On these first 20 items the shipped model gets qa 18 and math 18 right (card: 93.5 % and 84 % over the
    whole splits); the floors leave two items of slack for other CPUs' rounding.
    """
    for suite, n, scorer, least in (("qa", 20, score_qa, 16), ("math", 20, score_math, 16)):
        config = suite_config(suite)
        correct = 0
        for item in load_suite(suite).items[:n]:
            ids = demo.chat_ids([{"role": "user", "content": item["prompt"]}])
            correct += scorer(jobs.run(demo.denoise(ids, config)).text, item["answer"])
        assert correct >= least, suite
    item = load_suite("code").items[0]
    ids = demo.chat_ids([{"role": "user", "content": item["prompt"]}])
    assert score_code(jobs.run(demo.denoise(ids, suite_config("code"))).text, item).passed


def test_demo_info_works_offline(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = demo.info()
    assert info.family == "llada" and 5e5 < info.parameters < 8e6 and info.mask_token_id == demo.config["mask_token_id"]
