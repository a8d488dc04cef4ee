"""The double-click app: launchers, the desktop entry, the icon, `--smoke`, and a frozen build that runs."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESKTOP = ROOT / "packaging" / "linux" / "dllm-studio.desktop"
ICONS = ROOT / "resources" / "icons"


def distinct_colours(png: Path) -> int:
    """How many different colours a 40x40 grid of samples of `png` holds (1 for a blank image)."""
    from PySide6.QtGui import QImage

    image = QImage(str(png))
    assert not image.isNull(), f"{png} is not a readable image"
    return len({image.pixel(image.width() * i // 40, image.height() * j // 40) for i in range(40) for j in range(40)})


def test_desktop_entry_matches_the_app():
    from ui.settings import APPLICATION

    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str
    entry.read(DESKTOP)
    fields = entry["Desktop Entry"]
    assert fields["StartupWMClass"] == APPLICATION  # the WM class Qt sets from setApplicationName
    assert fields["Type"] == "Application" and fields["Terminal"] == "false"
    assert fields["Icon"] == "dllm-studio" and fields["Exec"].split()[0] == "dllm-studio-gui"
    if shutil.which("desktop-file-validate") is None:
        pytest.skip("desktop-file-validate (Debian desktop-file-utils) is not installed")
    result = subprocess.run(["desktop-file-validate", str(DESKTOP)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("size", [16, 24, 32, 48, 64, 128, 256, 512])
def test_icon_pngs_at_standard_sizes(size):
    from PySide6.QtGui import QImage

    png = ICONS / f"dllm-studio-{size}.png"
    assert QImage(str(png)).size().toTuple() == (size, size)
    assert distinct_colours(png) > 3


def test_the_window_icon_is_the_app_icon(qtbot):
    from ui.app import app_icon

    sizes = {s.width() for s in app_icon().availableSizes()}
    assert {16, 32, 48, 256} <= sizes


def test_dllm_studio_with_no_command_opens_the_registered_window(monkeypatch):
    import ui.app
    from dllm_studio import cli

    opened = []
    monkeypatch.setattr(ui.app, "main", lambda argv: opened.append(argv) or 0)
    assert cli.main([]) == 0 and opened == [[]]


def test_user_files_go_to_the_platform_data_folder():
    from ui.paths import conversations_dir, data_dir, models_dir

    assert models_dir().parent == data_dir() == conversations_dir().parent
    assert ROOT not in data_dir().parents  # never inside the install or the bundle


def smoke(command: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 300) -> str:
    png = tmp_path / "smoke.png"
    result = subprocess.run([*command, "--smoke", str(png)], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: ok" in result.stdout and "-> 'Paris'" in result.stdout
    assert distinct_colours(png) > 10  # a drawn window, not a blank one
    return result.stdout


@pytest.mark.parametrize("launcher", [["main.py"], ["-m", "dllm_studio"]], ids=["main.py", "python -m dllm_studio"])
def test_smoke_from_a_checkout(tmp_path, launcher):
    out = smoke([sys.executable, *launcher], tmp_path, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert "torch 2." in out


@pytest.mark.slow
def test_frozen_bundle_builds_and_runs_in_a_clean_environment(tmp_path):
    """The PyInstaller one-folder build from packaging/dllm_studio.spec (about 5 minutes on 2 cores)."""
    pytest.importorskip("PyInstaller")
    dist, work = tmp_path / "dist", tmp_path / "build"
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "ERROR", "--distpath",
                    str(dist), "--workpath", str(work), str(ROOT / "packaging" / "dllm_studio.spec")],
                   check=True, cwd=ROOT, timeout=1500)
    shutil.rmtree(work)  # about a gigabyte of intermediate files
    exe = dist / "dllm-studio" / "dllm-studio"
    home = tmp_path / "home"
    home.mkdir()
    # As a double-click would: nothing from this shell, this virtual environment or the checkout.
    out = smoke([str(exe)], tmp_path, env={"HOME": str(home), "QT_QPA_PLATFORM": "offscreen"})
    assert "(frozen)" in out


def test_in_a_frozen_build_the_code_suite_is_offered_disabled_with_the_reason(open_page, monkeypatch):
    from ui.pages.compare import ComparePage

    monkeypatch.setattr(sys, "frozen", True, raising=False)  # as in the bundle: sys.executable is the app
    page = open_page(ComparePage)
    code = page.suite_boxes["code"]
    assert not code.isEnabled() and not code.isChecked() and "bundles none" in code.toolTip()
    assert page.suite_boxes["qa"].isEnabled() and page.suite_boxes["qa"].isChecked()
