import pytest

from checkpoints import make_dream, make_llada


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory):
    return make_llada(tmp_path_factory.mktemp("LLaDA-8B-Instruct-tiny"))


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory):
    return make_dream(tmp_path_factory.mktemp("Dream-v0-Instruct-7B-tiny"))


@pytest.fixture(scope="session")
def llada(llada_dir):
    from dllm_studio.models import load_model

    return load_model(llada_dir, dtype="float32")


@pytest.fixture(scope="session")
def dream(dream_dir):
    from dllm_studio.models import load_model

    return load_model(dream_dir, dtype="float32")
