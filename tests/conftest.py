import os

import pytest

# Qt windows render offscreen in tests unless a display is chosen explicitly (e.g. Xvfb's xcb).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Quantized layers run the reference kernel unless a test asks otherwise: which kernel the per-machine
# measurement picks differs between CPUs, and tests must not (tests/test_kernels.py covers the choice).
os.environ.setdefault("DLLM_STUDIO_KERNEL", "dequant")

from checkpoints import make_dream, make_llada

from dllm_studio.hardware import CpuUnits

AVX2_CPU = CpuUnits("AVX2", avx512_bf16=False, amx=False, vnni=False)
AMX_CPU = CpuUnits("AVX512", avx512_bf16=True, amx=True, vnni=True)


@pytest.fixture(scope="session", autouse=True)
def avx2_cpu():
    """Every test runs as on an AVX2-only CPU, where dtype "auto" is float32: the demo's exact answers, logits
    and goldens were measured in fp32, and CI machines may have AVX512-BF16/AMX. Tests of "auto" itself patch
    `hardware.cpu_units` again (test_dtype.py). Subprocesses see the real CPU."""
    from dllm_studio import hardware

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hardware, "cpu_units", lambda: AVX2_CPU)
        yield


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


# ---- the desktop app ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def demo_model():
    from dllm_studio.models import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def demo_rtn4(demo_model):
    """The demo quantized RTN W4 (about a second), as the result the Quantize page hands on."""
    from dllm_studio import jobs
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    return jobs.run(quantize(demo_model, QuantRecipe(method="rtn", wbits=4, calib_samples=4, seq_len=64)))


@pytest.fixture
def studio_settings(tmp_path):
    """QSettings redirected to a fresh folder, so tests never read or write the user's settings."""
    from PySide6.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    from ui.settings import Settings

    return Settings()


@pytest.fixture
def open_page(qtbot, session, studio_settings):
    """open_page(PageClass): a studio page on this test's session and settings, closed after the test."""
    def open_(page_class):
        page = page_class(session, studio_settings)
        qtbot.addWidget(page)
        return page

    return open_


@pytest.fixture
def quantize_page(open_page):
    """The Quantize page with a small calibration set (4 x 64 tokens), so a run takes a second or two."""
    from ui.pages.quantize import QuantizePage

    page = open_page(QuantizePage)
    page.samples.setValue(4)
    page.seq_len.setValue(64)
    return page


@pytest.fixture
def session(qtbot, demo_model):
    """A studio session holding the demo model."""
    from qt_helpers import studio_session

    yield from studio_session(demo_model)
