"""The chat conversation file, read and written by the engine alone: round trips, older files, bad files."""

import errno
import json

import pytest

from dllm_studio.conversation import FORMAT_VERSION, Conversation, Turn, load_conversation, save_conversation
from dllm_studio.errors import ConversationError, WriteError
from dllm_studio.events import Commit, DenoiseStep
from dllm_studio.sampling import GenerationConfig

MASK = 9
SAMPLER = {"gen_length": 4, "steps": 2, "block_length": 4, "remasking": "low_confidence", "temperature": 0.0,
           "seed": 7, "cache": "dual", "threshold": 0.9}
STATS = {"steps": 2, "forward_passes": 2, "wall_time_s": 0.5, "ms_per_step": 250.0, "answer_tokens": 3,
         "answer_tokens_per_s": 6.0, "peak_rss_bytes": 1000, "kernels": {"int4": "dequant"}, "weight_bytes": 64,
         "forward_equivalents": 1.25, "tokens_per_step": 2.0, "cache_refreshes": 1, "cache_bytes": 512}


def answered(prompt: str, variant: str | None = None) -> Turn:
    """A done, parallel-decoded turn: two steps, the first refilling the cache, the second committing three tokens."""
    first = DenoiseStep(1, 2, 0, (5, MASK, MASK, MASK), (Commit(0, 5, 0.95),), (1, 2, 3), refreshed=True)
    second = DenoiseStep(2, 2, 0, (5, 6, 2, 2), (Commit(1, 6, 0.9), Commit(2, 2, 0.8), Commit(3, 2, 0.75)), ())
    pieces = {5: "Par", 6: "is", 2: "", MASK: ""}
    return Turn(prompt, 2, 4, MASK, variant, "done", frames=[first, second], pieces=pieces,
                token_ids=[5, 6, 2, 2], answer="Paris", length=2, stats=dict(STATS), adaptive=True)


def conversation() -> Conversation:
    failed = Turn("Again?", 2, 4, MASK, "RTN W4", "failed", "out of memory.")
    return Conversation("demo", "RTN W4", dict(SAMPLER),
                        {"fp": [answered("Capital?")], "quant": [answered("Capital?", "RTN W4"), failed]})


def saved(tmp_path, change=None):
    """A conversation written by this version, then edited as `change(data)` says."""
    path = tmp_path / "chat.json"
    save_conversation(path, conversation())
    if change is not None:
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_conversation_round_trips_with_every_step(tmp_path):
    original = conversation()
    path = saved(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == FORMAT_VERSION
    loaded = load_conversation(path)
    # Confidences are kept to 4 decimals and only the pieces of ids in the frames are kept: these are exact.
    assert loaded == original
    assert loaded.panes["fp"][0].frames[0].refreshed and not loaded.panes["fp"][0].frames[1].refreshed
    assert loaded.panes["quant"][0].adaptive and loaded.panes["quant"][0].step_of(1) == "1 of 2"


def test_a_file_saved_before_caches_thresholds_and_refreshes_opens_with_the_defaults(tmp_path):
    def as_before(data):
        for key in ("cache", "threshold"):
            del data["sampler"][key]
        for turns in data["panes"].values():
            for turn in turns:
                del turn["adaptive"]
                for step in turn["steps"]:
                    del step["refreshed"]
                if turn["stats"]:
                    for key in ("forward_equivalents", "tokens_per_step", "cache_refreshes", "cache_bytes"):
                        del turn["stats"][key]

    loaded = load_conversation(saved(tmp_path, as_before))
    defaults = GenerationConfig()
    assert loaded.sampler == {**SAMPLER, "cache": defaults.cache, "threshold": defaults.threshold}
    turn = loaded.panes["fp"][0]
    assert not turn.adaptive and [f.refreshed for f in turn.frames] == [False, False]
    assert turn.step_of(1) == "1 of 2" and turn.answer == "Paris"
    assert turn.stats == {k: v for k, v in STATS.items()
                          if k not in ("forward_equivalents", "tokens_per_step", "cache_refreshes", "cache_bytes")}


def test_a_format_1_file_reads_its_old_stat_names(tmp_path):
    def as_format_1(data):
        data["version"] = 1
        stats = data["panes"]["fp"][0]["stats"]
        stats["tokens"], stats["tokens_per_s"] = stats.pop("answer_tokens"), stats.pop("answer_tokens_per_s")

    assert load_conversation(saved(tmp_path, as_format_1)).panes["fp"][0].stats == STATS


def test_sampler_values_are_coerced_to_the_config_types(tmp_path):
    def as_text(data):
        data["sampler"].update(steps="2", temperature=1, threshold=None)

    sampler = load_conversation(saved(tmp_path, as_text)).sampler
    assert (sampler["steps"], sampler["temperature"], sampler["threshold"]) == (2, 1.0, None)
    assert type(sampler["temperature"]) is float


def test_a_newer_file_is_refused_by_its_format(tmp_path):
    path = saved(tmp_path, lambda data: data.update(version=FORMAT_VERSION + 1))
    with pytest.raises(ConversationError) as caught:
        load_conversation(path)
    assert str(caught.value) == (f"{path} is not a dLLM Studio conversation (ValueError: it was written by a "
                                 f"newer dLLM Studio (format {FORMAT_VERSION + 1})).")


@pytest.mark.parametrize("edit, reason", [
    (lambda data: data["sampler"].pop("steps"), "KeyError: 'steps'"),
    (lambda data: data["sampler"].update(seed="seven"), "ValueError: invalid literal for int() with base 10: 'seven'"),
    (lambda data: data["sampler"].update(threshold=[0.9]), "TypeError: float() argument must be"),
    (lambda data: data["panes"].pop("quant"), "KeyError: 'quant'"),
    (lambda data: data["panes"]["fp"][0].update(state="running"), "ValueError: a turn's state is 'running'"),
    (lambda data: data["panes"]["fp"][0].update(length=5),
     "ValueError: an answer of 4 tokens cannot have 5 before its end"),
])
def test_a_malformed_file_names_the_part_at_fault(tmp_path, edit, reason):
    path = saved(tmp_path, edit)
    with pytest.raises(ConversationError) as caught:
        load_conversation(path)
    assert str(caught.value).startswith(f"{path} is not a dLLM Studio conversation ({reason}")


def test_a_truncated_file_is_not_a_conversation(tmp_path):
    path = saved(tmp_path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ConversationError) as caught:
        load_conversation(path)
    try:
        json.loads(text[: len(text) // 2])
    except ValueError as exc:  # the decoder's own words, whatever they are in this Python
        expected = f"{path} is not a dLLM Studio conversation (JSONDecodeError: {exc})."
    assert str(caught.value) == expected


def test_a_missing_file_says_why(tmp_path):
    with pytest.raises(ConversationError) as caught:
        load_conversation(tmp_path / "gone.json")
    assert str(caught.value) == f"{tmp_path / 'gone.json'}: No such file or directory"


def test_a_failing_write_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    path = saved(tmp_path)
    before = path.read_bytes()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dllm_studio.files.os.replace", full_disk)
    with pytest.raises(WriteError) as caught:
        save_conversation(path, Conversation("other", None, dict(SAMPLER), {"fp": [], "quant": []}))
    assert str(caught.value) == f"Could not write {path}: the disk is full."
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["chat.json"]
