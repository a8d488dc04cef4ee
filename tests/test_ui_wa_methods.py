"""The Quantize page's weight-and-activation methods: pickers read from the method table, the kernel note, and the
Transforms view filled from the engine's LayerTransformed events."""

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def page(quantize_page):
    return quantize_page


def choose(page, method, wbits=None, abits=None):
    from ui.pages.quantize import ABITS_ROLE

    page.method.setCurrentIndex(page.method.findData(method))
    if wbits is not None:
        index = next(i for i in range(page.bits.count())
                     if (page.bits.itemData(i), page.bits.itemData(i, ABITS_ROLE)) == (wbits, abits))
        page.bits.setCurrentIndex(index)


def offered(page):
    from ui.pages.quantize import ABITS_ROLE

    return [(page.bits.itemData(i), page.bits.itemData(i, ABITS_ROLE)) for i in range(page.bits.count())]


def installed():
    """The methods that can run here: their library installed, their module written (some are still in progress
    on other branches; once merged, they are covered too)."""
    from dllm_studio.quant import runtimes
    from dllm_studio.quant.methods import METHODS

    def importable(spec):
        try:
            return spec.implementation() is not None
        except ModuleNotFoundError:
            return False

    return [name for name, spec in METHODS.items() if runtimes.unavailable(name) is None and importable(spec)]


def test_every_method_is_listed_and_its_settings_offered_exactly(page):
    from dllm_studio.quant.methods import METHODS

    assert [page.method.itemData(i) for i in range(page.method.count())] == list(METHODS)
    for name in installed():
        choose(page, name)
        assert offered(page) == list(METHODS[name].settings)
    choose(page, "smoothquant")
    assert [page.bits.itemText(i) for i in range(page.bits.count())] == [
        "W8A8 (8-bit weights, 8-bit activations)",
        "W4A8 (4-bit weights, 8-bit activations) (beyond the seed study)",
        "W4A4 (4-bit weights, 4-bit activations)"]


def test_alpha_and_clip_are_enabled_exactly_where_the_method_reads_them(page):
    from dllm_studio.quant.methods import METHODS

    for name in installed():
        spec = METHODS[name]
        for i, (w, a) in enumerate(spec.settings):
            choose(page, name, w, a)
            assert page.alpha.isEnabled() == ("alpha" in spec.options), (name, w, a)
            assert page.clip.isEnabled() == ("clip" in spec.options and a < 16), (name, w, a)
            grid = spec.layout == "grid" and a == 16
            assert page.group.isEnabled() == grid and page.symmetric.isEnabled() == grid, (name, w, a)
            assert grid or "does not apply" in page.group.toolTip()
    if "duquant" in installed():
        choose(page, "duquant", 4, 4)
        assert (page.alpha.value(), page.clip.value()) == (0.5, 0.9)  # the method's defaults, shown
        choose(page, "duquant", 8, 8)
        assert page.clip.value() == 1.0 and page.recipe().activation_clip == 1.0  # 8-bit activations: full range
    choose(page, "smoothquant", 8, 8)
    assert (page.alpha.value(), page.clip.value()) == (0.5, 1.0)


def test_every_offered_combination_validates_and_changed_options_reach_the_recipe(page):
    from dllm_studio.quant.methods import METHODS

    page.group.setCurrentIndex(page.group.findData(32))  # refused by W-A and codebook settings: must not leak in
    page.symmetric.setChecked(True)
    checked = 0
    for name in installed():
        for w, a in METHODS[name].settings:
            choose(page, name, w, a)
            for alpha, clip in ((page.alpha.value(), page.clip.value()), (0.8, 0.75)):
                page.alpha.setValue(alpha)
                page.clip.setValue(clip)
                recipe = page.recipe().validate()
                assert (recipe.method, recipe.wbits, recipe.abits) == (name, w, a)
                checked += 1
    assert checked == 2 * sum(len(METHODS[n].settings) for n in installed())

    choose(page, "smoothquant", 4, 4)
    assert (page.recipe().alpha, page.recipe().clip) == (None, None)  # defaults left to the engine
    page.alpha.setValue(0.8)
    page.clip.setValue(0.85)
    recipe = page.recipe()
    assert (recipe.alpha, recipe.clip, recipe.migration, recipe.activation_clip) == (0.8, 0.85, 0.8, 0.85)
    assert (recipe.group_size, recipe.symmetric, recipe.per_channel) == (128, False, True)
    choose(page, "rtn", 4, 16)
    assert (page.recipe().group_size, page.recipe().symmetric, page.recipe().clip) == (32, True, None)


def test_choices_persist(page, open_page, studio_settings):
    from ui.pages.quantize import QuantizePage

    choose(page, "smoothquant", 4, 8)
    page.alpha.setValue(0.7)
    page.clip.setValue(0.95)
    again = open_page(QuantizePage)
    recipe = again.recipe()
    assert (recipe.method, recipe.wbits, recipe.abits, recipe.alpha, recipe.clip) == ("smoothquant", 4, 8, 0.7, 0.95)


def test_the_kernel_note_says_which_settings_are_accuracy_only(page):
    from dllm_studio.quant.kernels import SIMULATED_NOTE
    from dllm_studio.quant.methods import QUANTIZED_TENSORS

    choose(page, "rtn", 4, 4)
    note = page.kernel_note.text()
    assert page.kernel_note.isVisibleTo(page) and f"W4A4: {SIMULATED_NOTE}" in note
    assert QUANTIZED_TENSORS[1:] in note
    if "ars" in installed():
        choose(page, "ars", 4, 8)  # twin-log codebooks: no integer product at any activation width
        assert SIMULATED_NOTE in page.kernel_note.text()
    choose(page, "rtn", 8, 8)
    assert SIMULATED_NOTE not in page.kernel_note.text() and "torch._int_mm" in page.kernel_note.text()
    choose(page, "rtn", 4, 16)
    assert not page.kernel_note.isVisibleTo(page)
    assert page.start_button.isEnabled()  # preflight passed all along


def test_method_tooltips_cover_the_new_methods(page):
    from ui.pages.quantize import FINDINGS, method_tooltip

    assert "collapses at W4A4" in method_tooltip("smoothquant") and "holds up at W4A4" in method_tooltip("quarot")
    assert "recommendation for weight-and-activation" in method_tooltip("duquant")
    assert all("dLLM Studio is first to try it" in FINDINGS[m] for m in ("tlq", "ars"))


def run(qtbot, page, session):
    """Quantize with what the page shows; (the engine's events as the job emitted them, the variant)."""
    events = []
    with qtbot.waitSignal(page.finished, timeout=120_000) as done:
        page.start_button.click()
        page.job.event.connect(events.append)
    return events, done.args[0]


def test_smoothquant_fills_the_transforms_table_with_the_engines_numbers(qtbot, page, session):
    from dllm_studio.events import LayerQuantized, LayerTransformed
    from dllm_studio.quant import kernels
    from ui.pages.quantize import SORT_ROLE

    choose(page, "smoothquant", 8, 8)
    assert not page.transforms_table.isHidden() and "SMOOTHQUANT's transform" in page.transforms_hint.text()
    events, variant = run(qtbot, page, session)
    transformed = [e for e in events if isinstance(e, LayerTransformed)]
    quantized = [e for e in events if isinstance(e, LayerQuantized)]
    table = page.transforms_table
    assert page.transformed == transformed and len(transformed) == len(quantized) == table.rowCount() > 0
    table.sortItems(0)  # the layer column sorts back into quantization order
    for row, event in enumerate(transformed):
        assert table.item(row, 0).toolTip() == event.name and table.item(row, 1).text() == event.role
        assert table.item(row, 2).text() == event.transform
        assert table.item(row, 3).text() == f"{event.kurtosis_before:.3g} → {event.kurtosis_after:.3g}"
        assert table.item(row, 4).text() == f"{event.outlier_ratio_before:.3g} → {event.outlier_ratio_after:.3g}"
        assert table.item(row, 3).font().bold() == (event.kurtosis_after < event.kurtosis_before)
    assert any(table.item(r, 3).font().bold() for r in range(table.rowCount()))  # smoothing evens channels out
    table.sortItems(3)  # by kurtosis after
    after = [table.item(r, 3).data(SORT_ROLE) for r in range(table.rowCount())]
    assert after == sorted(e.kurtosis_after for e in transformed)
    card = page.result.text()
    assert variant.name in card and "activations: <b>A8</b> per token" in card
    assert "attention's queries, keys, values and softmax stay in full precision" in card
    # The kernels measured at load decide: on the tiny demo, dequant may beat int8 x int8 and simulate.
    plan = kernels.plan(variant.model.module, variant.model.device, variant.model.dtype)
    simulated = any(row["simulated"] for row in plan)
    assert (kernels.SIMULATED_NOTE in card) == simulated and ("torch._int_mm" in card) == (not simulated)


def test_rtn_w4a4_is_marked_accuracy_only_and_shows_no_transforms(qtbot, page, session):
    from dllm_studio.quant.kernels import SIMULATED_NOTE

    choose(page, "rtn", 4, 4)
    assert page.transforms_table.isHidden() and "nothing to show" in page.transforms_hint.text()
    events, _ = run(qtbot, page, session)
    assert page.transforms_table.rowCount() == 0
    assert "activations: <b>A4</b>" in page.result.text() and SIMULATED_NOTE in page.result.text()


def test_activation_kernel_names_the_integer_kernel_or_says_accuracy_only():
    from dllm_studio.quant import kernels
    from dllm_studio.quant.kernels.int8 import W8A8
    from dllm_studio.quant.recipe import QuantRecipe

    def how(method, wbits, abits):
        return kernels.activation_kernel(QuantRecipe(method=method, wbits=wbits, abits=abits))

    assert how("rtn", 8, 8) == how("smoothquant", 4, 8) == W8A8.label
    assert how("rtn", 4, 4) == how("ars", 4, 8) == how("ars", 3, 4) == kernels.SIMULATED_NOTE
    assert how("rtn", 4, 16) == how("tlq", 4, 16) == ""


def test_compare_says_a_simulated_variants_step_time_is_accuracy_only():
    from dllm_studio.quant.kernels import SIMULATED_NOTE
    from ui.pages.compare import _ms_q

    base = {"ms_per_step": 10.0}
    row = {"ms_per_step": 25.0, "kernels": {f"dequant ({SIMULATED_NOTE})": 28}}
    assert _ms_q(base, row) == "25.0\naccuracy-only"
    assert _ms_q(base, {**row, "kernels": {"w8a8": 28}}) == "25.0\n2.50× FP"
