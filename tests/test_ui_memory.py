"""Memory in the window: one free-memory figure everywhere, a memory chart per run, and quitting during a job."""

import threading
import time

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def bare_window(qtbot, studio_settings):
    """The main window with nothing opened and no job running."""
    from ui.app import create_window

    w = create_window(None, studio_settings)
    qtbot.addWidget(w)
    w.show()
    return w


def test_status_bar_models_card_and_preflight_show_one_free_memory_figure(bare_window, demo_model, monkeypatch):
    from dllm_studio import memory
    from dllm_studio.memory import human

    w = bare_window
    w.session.set_model(demo_model)
    reads = []

    def changing_free(device="cpu"):  # a new value on every read: two reads could never show the same text
        reads.append(device)
        return (len(reads) + 2) * 1_000_000_000

    monkeypatch.setattr(memory, "available_bytes", changing_free)
    for expected in ("3.00 GB", "4.00 GB"):
        w.ram_timer.timeout.emit()  # one tick of the window's clock
        assert w.ram_label.text().endswith(f"· {expected} free")
        assert w.models.free_label.text().startswith(f"This machine has {expected} of memory free now.")
        assert f"{expected} free: " in w.quantize.preflight.text()
        assert w.models.memory_table.item(0, 2).toolTip().endswith(f"{expected} is free now.")
    assert reads == ["cpu", "cpu"]  # one read per tick, shared by every face
    assert human(w.session.free_memory) == "4.00 GB"


def test_the_memory_chart_and_its_peak_start_fresh_per_run(qtbot, quantize_page, session, monkeypatch):
    from dllm_studio import memory

    class Process:  # this process's memory as the kernel reports it; the high-water mark never goes down
        rss, mark = 300_000_000, 900_000_000  # an earlier job left the mark at 900 MB

        def rss_bytes(self):
            self.mark = max(self.mark, self.rss)
            return self.rss

        def peak_rss_bytes(self):
            return max(self.mark, self.rss)

    process = Process()
    monkeypatch.setattr(memory, "rss_bytes", process.rss_bytes)
    monkeypatch.setattr(memory, "peak_rss_bytes", process.peak_rss_bytes)
    page, chart = quantize_page, quantize_page.memory_chart
    page.method.setCurrentIndex(page.method.findData("rtn"))

    def run(rss):
        process.rss = rss
        with qtbot.waitSignal(session.busy_changed, timeout=60_000, check_params_cb=lambda busy, _t: not busy):
            page.start_button.click()
            started = list(chart.data)
        return started

    run(1_000_000_000)  # this run raises the mark to 1 GB: its own peak
    assert len(chart.data) >= 2 and {peak for _t, _rss, peak, _cuda in chart.data} == {1000.0}
    assert set(chart.peak.getData()[1]) == {1000.0}
    started = run(300_000_000)  # the mark stays at 1 GB, reached by the run before
    assert [(rss, peak) for _t, rss, peak, _cuda in started] == [(300.0, 300.0)]  # one point, no old peak
    assert {peak for _t, _rss, peak, _cuda in chart.data} == {300.0}
    assert set(chart.peak.getData()[1]) == {300.0}


def start_fake_job(session, work_loop):
    """Start a job that runs `work_loop(cancel)` between progress events; returns its thread and how it ended."""
    from dllm_studio.events import LoadProgress
    from ui.workers import stream

    ended = []

    def job(cancel):
        while not work_loop(cancel):
            yield LoadProgress("working")
        return "done"

    thread = session.start("A long job", stream(job), on_done=ended.append,
                           on_cancelled=lambda: ended.append("cancelled"))
    return thread, ended


def test_quitting_during_a_job_cancels_it_and_closes_at_once(qtbot, bare_window):
    w = bare_window

    def checks_every_50_ms(cancel):
        cancel.check()
        time.sleep(0.05)
        return False

    job, ended = start_fake_job(w.session, checks_every_50_ms)
    qtbot.waitUntil(job.isRunning)
    began = time.perf_counter()
    w.quit_action.trigger()
    assert time.perf_counter() - began < 0.5 and not w.isVisible()  # the job stopped at its next check
    assert job.token.cancelled and not job.isRunning()
    qtbot.waitUntil(lambda: ended == ["cancelled"])
    assert not w.session.busy and w.session.detached_jobs() == 0


def test_quitting_leaves_a_job_that_ignores_the_cancel_and_exits_without_it(qtbot, bare_window, monkeypatch):
    import ui.app

    w = bare_window
    op_returned = threading.Event()

    def one_long_torch_op(cancel):  # deaf to the cancel for up to 5 s, as a long matmul would be
        op_returned.wait(5)
        return True

    job, ended = start_fake_job(w.session, one_long_torch_op)
    qtbot.waitUntil(job.isRunning)
    began = time.perf_counter()
    w.quit_action.trigger()
    waited = time.perf_counter() - began
    assert 1.9 < waited < 2.5 and not w.isVisible()  # it gave the job its 2 s, then closed
    assert job.token.cancelled and job.isRunning() and w.session.detached_jobs() == 1
    exits = []
    monkeypatch.setattr(ui.app.os, "_exit", exits.append)
    assert ui.app.exit_status(0, w.session) == 0 and exits == [0]  # the process would not wait for it

    op_returned.set()
    qtbot.waitUntil(lambda: not job.isRunning() and w.session.detached_jobs() == 0)
    qtbot.wait(50)  # its result, had it still been connected, would arrive now
    assert ended == []  # nothing reached the closed window
    exits.clear()
    assert ui.app.exit_status(0, w.session) == 0 and exits == []
