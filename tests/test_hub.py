"""MODEL -> local folder: the demo, folder paths, and hub ids through the Hugging Face cache, offline; cancelling a load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from checkpoints import make_llada

from dllm_studio import hub, jobs
from dllm_studio.errors import Cancelled, ModelNotFoundError
from dllm_studio.events import CancelToken, DownloadProgress
from dllm_studio.models import WEIGHTS_STAGE, load_model, open_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE with an empty cache in tmp_path; returns the hub cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read the environment when it was imported.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # "org/name" must not also be a folder under the working directory.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def cache_repo(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source` as a downloaded repo: content-addressed blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in sorted(source.iterdir()):
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


# ---- demo and folders ------------------------------------------------------------------------

def test_demo_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "DEMO_PATH", tmp_path / "demo")
    with pytest.raises(ModelNotFoundError, match="demo model"):
        hub.resolve("demo")


def test_demo_present_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "DEMO_PATH", make_llada(tmp_path / "demo", shards=1))
    assert hub.resolve("demo") == tmp_path / "demo"


def test_local_folder_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    assert hub.resolve(str(folder)) == folder.resolve()
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("model") == folder.resolve()  # relative paths come back absolute


def test_missing_path_and_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="No model folder at"):
        hub.resolve(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        hub.resolve(str(tmp_path / "config.json"))


# ---- hub ids, offline ------------------------------------------------------------------------

def test_offline_and_not_cached_names_the_id(offline: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="org/missing") as missing:
        hub.resolve("org/missing")
    assert "HF_HUB_OFFLINE" in str(missing.value)


def test_invalid_hub_id_is_a_clear_error(offline: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a valid hub id"):
        hub.resolve("org/bad--name")  # matches HUB_ID, but the hub forbids "--"


def test_offline_cached_repo_resolves_and_loads(offline: Path, tmp_path: Path) -> None:
    snapshot = cache_repo(offline, "org/name", make_llada(tmp_path / "src"))

    assert hub.resolve("org/name").resolve() == snapshot.resolve()
    model = load_model("org/name")
    assert model.family == "llada" and model.source == "org/name"
    assert model.path.resolve() == snapshot.resolve()


# ---- download plumbing (no network: snapshot_download replaced) --------------------------------

def test_download_falls_back_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if not local_files_only:
            raise ConnectionError("hub unreachable")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.download("org/name") == tmp_path
    assert calls == [False, True]


def test_download_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def snapshot_download(repo_id, *, tqdm_class, **kwargs):
        # As huggingface_hub does: a network-bytes bar, a written-bytes bar whose total grows per file,
        # and a files-done bar.
        network = tqdm_class(total=0, initial=0, unit="B", unit_scale=True, desc="Downloading bytes")
        written = tqdm_class(total=0, initial=0, unit="B", unit_scale=True, desc="Reconstructing")
        files = tqdm_class(total=2, desc="Fetching 2 files")
        written.total += 100
        for bar in (network, written):
            bar.update(40)
            bar.update(60)
        files.update(2)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    events = []
    hub.download("org/name", events.append)
    assert events == [DownloadProgress("org/name", 40, 100), DownloadProgress("org/name", 100, 100)]


def test_progress_class_emits_byte_events() -> None:
    events = []
    bar = hub._progress_class("org/name", events.append)(total=None, unit="B")
    bar.update(512)
    bar.total = 2048
    bar.update(1024)
    hub._progress_class("org/name", events.append)(total=3, unit="it").update(1)  # not bytes: silent
    hub._progress_class("org/name", None)(total=10, unit="B").update(5)  # no listener: just counts
    assert events == [DownloadProgress("org/name", 512, None), DownloadProgress("org/name", 1536, 2048)]


# ---- cancelling ----------------------------------------------------------------------------------

def cancel_at_first(stage: type | str, cancel: CancelToken, seen: list):
    """An on_event that records every event and cancels at the first one of `stage` (an event type or a stage)."""
    def on_event(event) -> None:
        seen.append(event)
        if isinstance(event, stage) if isinstance(stage, type) else getattr(event, "stage", None) == stage:
            cancel.cancel()

    return on_event


def test_a_cancelled_load_stops_at_the_next_tensor_and_keeps_the_open_model(llada, llada_dir) -> None:
    before = {name: tensor.clone() for name, tensor in llada.module.state_dict().items()}
    cancel, seen = CancelToken(), []
    with pytest.raises(Cancelled):
        jobs.run(open_model(llada_dir, dtype="float32", cancel=cancel), cancel_at_first(WEIGHTS_STAGE, cancel, seen))
    reads = [e for e in seen if e.stage == WEIGHTS_STAGE]
    assert [e.done for e in reads] == [1] and reads[0].total > 1 and seen[-1] is reads[0]  # no "ready"
    after = llada.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_cancelled_download_stops_at_the_next_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written, calls = [], []

    def snapshot_download(repo_id, *, tqdm_class=None, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        bar = tqdm_class(total=400, initial=0, unit="B", desc="Reconstructing")
        for _ in range(4):  # as huggingface_hub does: the bar hears of each chunk before it is written
            bar.update(100)
            written.append(100)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    cancel, seen = CancelToken(), []
    with pytest.raises(Cancelled):
        jobs.run(open_model("org/name", cancel=cancel), cancel_at_first(DownloadProgress, cancel, seen))
    assert seen == [DownloadProgress("org/name", 100, 400)] and written == []
    assert calls == [False]  # a cancel is no network failure: the cache is not tried instead
