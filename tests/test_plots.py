"""SVG charts: valid XML with the marks the data calls for, placed where the axes say, and drawable by Qt."""

import importlib.util
import math
import re
import xml.etree.ElementTree as ET

import pytest

from dllm_studio.plots import PALETTE, bars, lines, pareto_front, scatter

NS = "{http://www.w3.org/2000/svg}"
NASTY = 'a<b & "c" \'d\''


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg" and root.get("role") == "img" and root[0].tag == f"{NS}title"
    return root


def marks(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{NS}{tag}") if e.get("class") == cls]


def texts(root: ET.Element) -> list[str]:
    return [e.text for e in root.iter(f"{NS}text")]


def coords(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def some_charts() -> list[str]:
    return [
        bars("Accuracy", ["gsm8k", "arc"], {"fp16": [0.8, 0.6], "w4": [0.7, None]}, y_label="accuracy",
             y_max=1.0, errors={"fp16": [(0.75, 0.85), None]}),
        scatter("Size vs accuracy", [("fp16", 16e9, 0.8), ("w4", 4e9, 0.7), ("w3", 3e9, 0.5)],
                x_label="bytes", y_label="accuracy", log_x=True, front=True),
        lines("Outliers", [f"layer {i}" for i in range(5)], {"ratio": [1e-3, 2e-2, None, 5e-1, 1.0]},
              y_label="ratio", log_y=True),
        bars("Nothing", [], {}, y_label="accuracy"),
    ]


# ---- the Pareto front --------------------------------------------------------------------------

def test_pareto_front_keeps_the_undominated_points_in_x_order():
    points = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.7), (0.5, 0.2), (1, 0.5), (4, 0.9), (5, 0.9)]
    # (2, 0.6) loses to (2, 0.7) at equal x, (3, 0.7) and (5, 0.9) to a smaller x at equal y; the second (1, 0.5)
    # duplicates the first
    assert pareto_front(points) == [4, 0, 1, 6]


def test_pareto_front_of_one_point_and_of_none():
    assert pareto_front([(3.0, 1.0)]) == [0]
    assert pareto_front([(2, 1), (2, 1), (2, 1)]) == [0]
    assert pareto_front([]) == []


def test_pareto_front_rejects_nan():
    with pytest.raises(ValueError, match="point 1"):
        pareto_front([(1, 1), (2, math.nan)])


# ---- bars --------------------------------------------------------------------------------------

def test_bars_draw_one_rect_per_value_and_mark_missing_ones():
    root = parse(bars("Accuracy", ["gsm8k", "arc", "mmlu"], {"fp16": [0.8, 0.6, 0.4], "w4": [0.7, None, 0.2]},
                      y_label="accuracy", y_max=1.0))
    assert len(marks(root, "rect", "bar")) == 5
    assert len(marks(root, "text", "na")) == 1
    assert [r.get("fill") for r in marks(root, "rect", "bar")] == [PALETTE[0]] * 3 + [PALETTE[1]] * 2
    assert [r.get("fill") for r in marks(root, "rect", "swatch")] == [PALETTE[0], PALETTE[1]]


def test_bar_heights_follow_the_values_against_a_pinned_top():
    root = parse(bars("A", ["x"], {"s": [1.0], "t": [0.5], "u": [0.25]}, y_label="accuracy", y_max=1.0))
    heights = [float(r.get("height")) for r in marks(root, "rect", "bar")]
    assert heights[1] == pytest.approx(heights[0] / 2, abs=0.1)
    assert heights[2] == pytest.approx(heights[0] / 4, abs=0.1)
    assert [t for t in texts(root) if t and t[0].isdigit()] == ["0", "0.2", "0.4", "0.6", "0.8", "1"]


def test_error_bars_span_their_interval():
    root = parse(bars("A", ["x", "y"], {"s": [0.5, 0.8]}, y_label="acc", y_max=1.0,
                      errors={"s": [(0.4, 0.6), None]}))
    (error,) = marks(root, "path", "error")
    rect = marks(root, "rect", "bar")[0]
    top, height = float(rect.get("y")), float(rect.get("height"))  # the bar spans 0 .. 0.5
    ys = sorted({float(y) for y in re.findall(r"M[\d.]+ ([\d.]+)", error.get("d"))})  # where the caps start
    assert ys == pytest.approx([top - height / 5, top + height / 5], abs=0.15)


def test_bars_reject_non_finite_values_naming_the_series():
    with pytest.raises(ValueError, match="'w4'"):
        bars("A", ["x"], {"fp16": [0.5], "w4": [math.inf]}, y_label="acc")
    with pytest.raises(ValueError, match="'fp16'"):
        bars("A", ["x"], {"fp16": [0.5]}, y_label="acc", errors={"fp16": [(math.nan, 0.6)]})
    with pytest.raises(ValueError, match="y_max -1 leaves no room"):
        bars("A", ["x"], {"fp16": [0.5]}, y_label="acc", y_max=-1)
    with pytest.raises(ValueError, match="'fp16' has 1 values for 2 categories"):
        bars("A", ["x", "y"], {"fp16": [0.5]}, y_label="acc")


# ---- scatter -----------------------------------------------------------------------------------

def test_a_log_axis_puts_each_decade_the_same_distance_further():
    root = parse(scatter("S", [("a", 1e3, 1.0), ("b", 1e4, 2.0), ("c", 1e5, 3.0)], x_label="bytes",
                         y_label="acc", log_x=True))
    a, b, c = (float(p.get("cx")) for p in marks(root, "circle", "point"))
    assert b - a == pytest.approx(c - b, abs=0.1) and b - a > 100


def test_a_short_log_range_gets_1_2_5_ticks_and_fills_the_plot():
    root = parse(scatter("S", [("w2", 2e9, 0.3), ("fp16", 16e9, 0.8)], x_label="bytes", y_label="acc", log_x=True,
                         x_format=lambda v: f"{v / 1e9:g} GB"))
    assert [t for t in texts(root) if t.endswith("GB")] == ["2 GB", "5 GB", "10 GB", "20 GB"]
    assert float(marks(root, "circle", "point")[0].get("cx")) == 60.0  # 2 GB is the left bound


def test_the_front_is_a_staircase_through_its_emphasised_points():
    points = [("fp16", 16e9, 0.80), ("w8", 8e9, 0.79), ("bad", 9e9, 0.60), ("w4", 4e9, 0.70), ("w2", 2e9, 0.30)]
    root = parse(scatter("S", points, x_label="bytes", y_label="acc", log_x=True, front=True))
    emphasised = [(float(p.get("cx")), float(p.get("cy"))) for p in marks(root, "circle", "point front")]
    assert len(emphasised) == 4 and len(marks(root, "circle", "point")) == 1
    (staircase,) = marks(root, "polyline", "front")
    by_x = [emphasised[i] for i in (3, 2, 1, 0)]  # w2, w4, w8, fp16
    assert coords(staircase)[::2] == by_x
    assert coords(staircase)[1::2] == [(x1, y0) for (_, y0), (x1, _) in zip(by_x, by_x[1:])]


def test_scatter_ticks_use_the_callers_formatter_and_a_lone_point_sits_centred():
    root = parse(scatter("S", [("only", 5.0, 5.0)], x_label="bytes", y_label="acc",
                         x_format=lambda v: f"{v:.1f} MB"))
    assert "5.0 MB" in texts(root)
    (point,) = marks(root, "circle", "point")
    assert float(point.get("cx")) == pytest.approx((60 + 640 - 16) / 2, abs=0.1)


def test_scatter_rejects_what_its_axes_cannot_show():
    with pytest.raises(ValueError, match="'w4'"):
        scatter("S", [("fp16", 1.0, 0.5), ("w4", math.nan, 0.5)], x_label="b", y_label="a")
    with pytest.raises(ValueError, match="'zero'.*logarithmic"):
        scatter("S", [("zero", 0.0, 0.5)], x_label="b", y_label="a", log_x=True)


# ---- lines -------------------------------------------------------------------------------------

def test_a_missing_value_breaks_the_line():
    root = parse(lines("L", ["a", "b", "c", "d", "e"], {"s": [1, 2, None, 3, 4]}, y_label="err"))
    before, after = (coords(p) for p in marks(root, "polyline", "line"))
    assert len(before) == len(after) == 2 and before[1][0] < after[0][0]
    root = parse(lines("L", ["a", "b", "c", "d"], {"s": [1, None, 3, 4]}, y_label="err"))
    assert len(marks(root, "polyline", "line")) == 1 and len(marks(root, "circle", "line")) == 1


def test_hundreds_of_layer_labels_are_thinned_so_they_do_not_overlap():
    names = [f"layers.{i}" for i in range(300)]
    root = parse(lines("L", names, {"s": [float(i) for i in range(300)]}, y_label="err"))
    shown = [e for e in root.iter(f"{NS}text") if e.text in names]
    xs = [float(e.get("x")) for e in shown]
    assert shown[0].text == "layers.0" and 5 < len(shown) < 60
    assert min(b - a for a, b in zip(xs, xs[1:])) >= len("layers.299") * 6.5
    (line,) = marks(root, "polyline", "line")
    assert len(coords(line)) == 300


def test_numeric_x_is_placed_by_value_and_log_y_by_decade():
    root = parse(lines("L", [0.0, 1.0, 3.0], {"s": [1e-3, 1e-2, 1e-1]}, y_label="ratio", log_y=True))
    (xy,) = [coords(p) for p in marks(root, "polyline", "line")]
    assert xy[2][0] - xy[1][0] == pytest.approx(2 * (xy[1][0] - xy[0][0]), abs=0.1)
    assert xy[0][1] - xy[1][1] == pytest.approx(xy[1][1] - xy[2][1], abs=0.1)


def test_lines_reject_bad_series_by_name():
    with pytest.raises(ValueError, match="'ratio'"):
        lines("L", ["a"], {"ratio": [math.inf]}, y_label="r")
    with pytest.raises(ValueError, match="'ratio'.*logarithmic"):
        lines("L", ["a", "b"], {"ratio": [0.0, 1.0]}, y_label="r", log_y=True)
    with pytest.raises(ValueError, match="'ratio' has 1 values for 2 x values"):
        lines("L", ["a", "b"], {"ratio": [1.0]}, y_label="r")


# ---- all charts --------------------------------------------------------------------------------

def test_no_data_gives_a_valid_svg_saying_so():
    for svg in (bars("B", ["x"], {"s": [None]}, y_label="a"), scatter("S", [], x_label="x", y_label="y"),
                lines("L", [], {}, y_label="y")):
        assert [e.text for e in marks(parse(svg), "text", "empty")] == ["No data"]
    assert "Nothing yet" in texts(parse(lines("L", ["a"], {"s": [None]}, y_label="y", empty="Nothing yet")))


def test_labels_are_escaped_and_round_trip():
    charts = [bars(NASTY, [NASTY], {NASTY: [1.0]}, y_label=NASTY),
              scatter(NASTY, [(NASTY, 1.0, 2.0)], x_label=NASTY, y_label=NASTY),
              lines(NASTY, [NASTY], {NASTY: [1.0]}, y_label=NASTY)]
    for svg in charts:
        root = parse(svg)
        assert root[0].text == NASTY and texts(root).count(NASTY) >= 3


def test_charts_keep_to_features_qt_and_html_both_draw():
    for svg in some_charts():
        tags = {e.tag.removeprefix(NS) for e in parse(svg).iter()}
        assert tags <= {"svg", "title", "rect", "text", "line", "path", "polyline", "circle"}
        assert "var(" not in svg and "style" not in svg


@pytest.mark.skipif(importlib.util.find_spec("PySide6") is None, reason="PySide6 is not installed")
def test_qt_renders_every_chart(qapp):
    from PySide6.QtCore import QByteArray
    from PySide6.QtGui import QColor, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    for svg in some_charts():
        assert QSvgRenderer(QByteArray(svg.encode())).isValid()
    # and draws it: the centre of the first bar has the first series' colour
    svg = some_charts()[0]
    bar = marks(parse(svg), "rect", "bar")[0]
    image = QImage(640, 320, QImage.Format.Format_ARGB32)
    painter = QPainter(image)
    QSvgRenderer(QByteArray(svg.encode())).render(painter)
    painter.end()
    x, y = (float(bar.get(k)) + float(bar.get(d)) / 2 for k, d in (("x", "width"), ("y", "height")))
    assert image.pixelColor(int(x), int(y)) == QColor(PALETTE[0])


def test_a_gap_instead_of_na_where_many_values_are_missing_by_design():
    series = {"RTN": [80.0, 70.0], "GPTQ": [82.0, None]}
    assert len(marks(parse(bars("t", ["W4", "W8A8"], series, y_label="%")), "text", "na")) == 1
    gapped = parse(bars("t", ["W4", "W8A8"], series, y_label="%", missing=""))
    assert not marks(gapped, "text", "na") and len(marks(gapped, "rect", "bar")) == 3


def test_only_the_front_is_named_when_asked():
    points = [("small", 1.0, 50.0), ("best", 2.0, 90.0), ("dominated", 3.0, 60.0)]
    named = texts(parse(scatter("t", points, x_label="x", y_label="y", front=True, front_labels_only=True)))
    assert "small" in named and "best" in named and "dominated" not in named
    assert "dominated" in texts(parse(scatter("t", points, x_label="x", y_label="y", front=True)))
