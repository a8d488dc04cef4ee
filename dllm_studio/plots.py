"""Self-contained SVG charts for the compare and study reports and the GUI's Compare page.

One string serves both faces: inlined into report.html and drawn by Qt's QSvgRenderer. So the output keeps
to SVG 1.1 Tiny features with plain presentation attributes (no <style>, CSS variables, filters or
foreignObject), and the module needs nothing beyond the standard library.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

# Okabe–Ito: distinguishable under the common colour-vision deficiencies; yellow last as it is faint on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
_INK, _MUTED, _GRID = "#222222", "#777777", "#DDDDDD"
_CHAR_W = 6.5  # mean glyph width at font-size 11: text is laid out without measuring it


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (x no larger and y no smaller, one of them strictly),
    ordered by rising x. Of exact duplicates only the first is kept."""
    for i, point in enumerate(points):
        _finite(f"point {i}", point)
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:  # every earlier point has x <= this one's, so only a strictly higher y escapes domination
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front


def _number(value: float) -> str:
    return f"{value:.6g}"


def _esc(text: object) -> str:
    # XML 1.0 forbids most control characters even as references: drop them so the SVG always parses
    return html.escape(re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", str(text)), quote=True)


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _finite(name: str, values: Sequence[float | None]) -> None:
    bad = next((v for v in values if v is not None and not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"Series {name!r} holds {bad}; a chart can only show finite numbers.")


def _positive(name: str, values: Sequence[float | None]) -> None:
    if any(v is not None and v <= 0 for v in values):
        raise ValueError(f"Series {name!r} holds a value <= 0, which a logarithmic axis cannot show.")


def _same_length(name: str, values: Sequence, count: int, what: str) -> None:
    if len(values) != count:
        raise ValueError(f"Series {name!r} has {len(values)} values for {count} {what}.")


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Multiples of a 1, 2 or 5 × 10^k step covering [lo, hi] in about `count` steps."""
    if lo == hi:  # a single value, or all equal: give it room on both sides
        pad = abs(lo) / 10 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]  # round: 3 * 0.1 should read 0.3


@dataclass(frozen=True)
class _Axis:
    """Maps data values onto pixels from `start` to `end` (end < start for y, which grows downward)."""

    lo: float
    hi: float
    start: float
    end: float
    ticks: tuple[float, ...] = ()
    log: bool = False

    def __call__(self, value: float) -> float:
        f = math.log10 if self.log else float
        return self.start + (f(value) - f(self.lo)) / (f(self.hi) - f(self.lo)) * (self.end - self.start)


def _axis(values: Sequence[float], start: float, end: float, *, log: bool = False, hi: float | None = None) -> _Axis:
    """An axis over `values` with nice bounds and ticks; `hi` pins the top (accuracy ends at 1)."""
    if log:
        return _log_axis(min(values), max(values), start, end)
    ticks = _nice_ticks(min(values), max(values) if hi is None else hi)
    top = ticks[-1] if hi is None else hi
    return _Axis(ticks[0], top, start, end, tuple(t for t in ticks if t <= top + 1e-9 * abs(top)))


def _log_axis(lo: float, hi: float, start: float, end: float) -> _Axis:
    """Bounds and ticks at powers of ten; within two decades at 1, 2 and 5 × 10^k, so a range such as
    2–16 GB fills the plot instead of a tenth of it."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b - a > 2:
        every = math.ceil((b - a) / 6)  # label at most ~7 decades
        return _Axis(10.0**a, 10.0**b, start, end, tuple(10.0**e for e in range(a, b + 1, every)), log=True)
    marks = [m * 10.0**e for e in range(a - 1, b + 1) for m in (1, 2, 5)]
    i, j = max(k for k, t in enumerate(marks) if t <= lo), min(k for k, t in enumerate(marks) if t >= hi)
    i, j = (i - 1, j + 1) if i == j else (i, j)  # one value on a mark: a mark either side
    return _Axis(marks[i], marks[j], start, end, tuple(marks[i:j + 1]), log=True)


def _svg(title: str, width: int, height: int, body: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" baseProfile="tiny" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="11">')
    return "\n".join([head, f"<title>{_esc(title)}</title>",
                      f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#FFFFFF"/>',
                      f'<text x="12" y="20" font-size="14" font-weight="bold" fill="{_INK}">{_esc(title)}</text>',
                      *body, "</svg>"])


def _empty(title: str, width: int, height: int, message: str) -> str:
    return _svg(title, width, height, [f'<text class="empty" x="{width / 2:.1f}" y="{height / 2:.1f}" '
                                       f'text-anchor="middle" fill="{_MUTED}">{_esc(message)}</text>'])


def _legend(names: Sequence[str], width: int) -> tuple[list[str], float]:
    """A swatch and name per series in rows under the title; returns the elements and the rows' height."""
    out, x, y = [], 60.0, 40.0
    for i, name in enumerate(names):
        span = 14 + _CHAR_W * len(name) + 16
        if x > 60 and x + span > width - 16:
            x, y = 60.0, y + 16
        out += [f'<rect class="swatch" x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{_colour(i)}"/>',
                f'<text x="{x + 14:.1f}" y="{y:.1f}" fill="{_INK}">{_esc(name)}</text>']
        x += span
    return out, (y - 24 if names else 0.0)


def _box(width: int, height: int, legend_height: float = 0.0) -> tuple[float, float, float, float]:
    return 60.0, 36.0 + legend_height, width - 16.0, height - 44.0  # left, top, right, bottom of the plot area


def _axes(box: tuple[float, float, float, float], x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]],
          x_label: str, y_label: str) -> list[str]:
    """Grid lines at the y ticks, the two axis lines, tick labels and the axis titles."""
    left, top, right, bottom = box
    out = []
    for py, text in y_ticks:
        out += [f'<line x1="{left:.1f}" y1="{py:.1f}" x2="{right:.1f}" y2="{py:.1f}" stroke="{_GRID}"/>',
                f'<text x="{left - 6:.1f}" y="{py + 4:.1f}" text-anchor="end" fill="{_INK}">{_esc(text)}</text>']
    for px, text in x_ticks:
        out += [f'<line x1="{px:.1f}" y1="{bottom:.1f}" x2="{px:.1f}" y2="{bottom + 4:.1f}" stroke="{_INK}"/>',
                f'<text x="{px:.1f}" y="{bottom + 16:.1f}" text-anchor="middle" fill="{_INK}">{_esc(text)}</text>']
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    return out + [
        f'<path d="M{left:.1f} {top:.1f} V{bottom:.1f} H{right:.1f}" fill="none" stroke="{_INK}"/>',
        f'<text x="{mid_x:.1f}" y="{bottom + 36:.1f}" text-anchor="middle" fill="{_INK}">{_esc(x_label)}</text>',
        f'<text x="14" y="{mid_y:.1f}" transform="rotate(-90 14 {mid_y:.1f})" text-anchor="middle" '
        f'fill="{_INK}">{_esc(y_label)}</text>']


def _fit(text: str, pixels: float) -> str:
    """`text` shortened with an ellipsis to about `pixels` wide, so neighbouring labels do not overlap."""
    chars = max(1, int(pixels / _CHAR_W))
    return text if len(text) <= chars else text[:chars - 1] + "…"


def bars(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *, y_label: str,
         y_max: float | None = None, errors: Mapping[str, Sequence[tuple[float, float] | None]] | None = None,
         width: int = 640, height: int = 320, empty: str = "No data", missing: str = "n/a") -> str:
    """Grouped bars: a group per category, a bar per series (in legend order), optional (low, high) error
    bars such as 95 % intervals; a None value shows as `missing` where its bar would stand ("": a gap, where
    many are missing by design and the title says why)."""
    errors = errors or {}
    for name, values in series.items():
        _same_length(name, values, len(categories), "categories")
        _finite(name, values)
    for name, bounds in errors.items():
        if name not in series:
            raise ValueError(f"Error bars are given for {name!r}, which is not one of the series.")
        _same_length(name, bounds, len(categories), "categories")
        _finite(name, [v for pair in bounds if pair is not None for v in pair])
    values = [v for vs in series.values() for v in vs if v is not None]
    if not categories or not values:
        return _empty(title, width, height, empty)
    legend, legend_height = _legend(list(series), width)
    left, top, right, bottom = box = _box(width, height, legend_height)
    spread = values + [v for pairs in errors.values() for pair in pairs if pair for v in pair]
    if y_max is not None and y_max <= min(0.0, *spread):
        raise ValueError(f"y_max {y_max} leaves no room above the lowest value, {min(0.0, *spread)}.")
    y = _axis([*spread, 0.0], bottom, top, hi=y_max)  # bars grow from zero, so zero is always in range
    clamp = lambda py: min(max(py, top), bottom)  # noqa: E731  (a value above y_max is cut at the top)
    group = (right - left) / len(categories)
    slot = group * 0.8 / len(series)
    x_ticks = [(left + (i + 0.5) * group, _fit(c, group)) for i, c in enumerate(categories)]
    out = legend + _axes(box, x_ticks, [(y(t), _number(t)) for t in y.ticks], "", y_label)
    for j, (name, vals) in enumerate(series.items()):
        for i, value in enumerate(vals):
            cx = left + i * group + group * 0.1 + (j + 0.5) * slot
            if value is None:
                if missing:
                    out.append(f'<text class="na" x="{cx:.1f}" y="{clamp(y(0)) - 3:.1f}" text-anchor="middle" '
                               f'font-size="9" fill="{_MUTED}">{_esc(missing)}</text>')
                continue
            y0, y1 = sorted((clamp(y(value)), clamp(y(0))))
            out.append(f'<rect class="bar" x="{cx - slot / 2:.1f}" y="{y0:.1f}" width="{slot:.1f}" '
                       f'height="{y1 - y0:.1f}" fill="{_colour(j)}"><title>{_esc(name)}, {_esc(categories[i])}: '
                       f'{_number(value)}</title></rect>')
            pair = errors.get(name, [None] * len(categories))[i]
            if pair is not None:
                lo, hi, cap = clamp(y(pair[0])), clamp(y(pair[1])), min(slot / 4, 4.0)
                out.append(f'<path class="error" d="M{cx - cap:.1f} {lo:.1f} H{cx + cap:.1f} M{cx:.1f} {lo:.1f} '
                           f'V{hi:.1f} M{cx - cap:.1f} {hi:.1f} H{cx + cap:.1f}" fill="none" stroke="{_INK}"/>')
    return _svg(title, width, height, out)


def scatter(title: str, points: Sequence[tuple[str, float, float]], *, x_label: str, y_label: str,
            log_x: bool = False, front: bool = False, x_format: Callable[[float], str] = _number,
            front_labels_only: bool = False, width: int = 640, height: int = 320, empty: str = "No data") -> str:
    """Labelled points; `front` joins the Pareto front (smaller x, larger y is better) with a staircase and
    emphasises its points. `x_format` writes the x ticks, e.g. bytes as "1.5 MB". `front_labels_only`: name only
    the front's points (a crowd of labels is unreadable; every point keeps its name as a tooltip)."""
    for label, x, y in points:
        _finite(label, (x, y))
        if log_x:
            _positive(label, (x,))
    if not points:
        return _empty(title, width, height, empty)
    left, top, right, bottom = box = _box(width, height)
    xa = _axis([p[1] for p in points], left, right, log=log_x)
    ya = _axis([p[2] for p in points], bottom, top)
    out = _axes(box, [(xa(t), x_format(t)) for t in xa.ticks], [(ya(t), _number(t)) for t in ya.ticks],
                x_label, y_label)
    best = pareto_front([(x, y) for _, x, y in points]) if front else []
    if best:  # the staircase bounds what the front attains: right along its y, then up to the next point
        xy = [(xa(points[i][1]), ya(points[i][2])) for i in best]
        steps = [c for (x0, y0), (x1, _) in zip(xy, xy[1:]) for c in ((x0, y0), (x1, y0))] + [xy[-1]]
        out.append(f'<polyline class="front" points="{" ".join(f"{px:.1f},{py:.1f}" for px, py in steps)}" '
                   f'fill="none" stroke="{PALETTE[3]}" stroke-width="1.5"/>')
    for i, (label, x, y) in enumerate(points):
        px, py, on_front = xa(x), ya(y), i in best
        anchor, tx = ("end", px - 7) if px > (left + right) / 2 else ("start", px + 7)  # stay inside the plot
        weight = ' font-weight="bold"' if on_front else ""
        out.append(f'<circle class="{"point front" if on_front else "point"}" cx="{px:.1f}" cy="{py:.1f}" '
                   f'r="{5 if on_front else 3.5}" fill="{PALETTE[3] if on_front else PALETTE[0]}" stroke="{_INK}" '
                   f'stroke-width="{1 if on_front else 0}"><title>{_esc(label)}: {_esc(x_format(x))}, '
                   f'{_number(y)}</title></circle>')
        if on_front or not front_labels_only:
            # Neighbours on the front sit close together: their labels go above and below by turns.
            ty = py + 14 if on_front and best.index(i) % 2 else py - 6
            out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" fill="{_INK}"{weight}>'
                       f'{_esc(label)}</text>')
    return _svg(title, width, height, out)


def _runs(xs: Sequence[float], ys: Sequence[float | None]) -> Iterator[list[tuple[float, float]]]:
    """Consecutive points that have values; a None ends a run, so the line shows a gap there."""
    run: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):
        if y is None:
            if run:
                yield run
            run = []
        else:
            run.append((x, y))
    if run:
        yield run


def lines(title: str, x: Sequence[str] | Sequence[float], series: Mapping[str, Sequence[float | None]], *,
          y_label: str, x_label: str = "", log_y: bool = False, width: int = 640, height: int = 320,
          empty: str = "No data") -> str:
    """A line per series over `x` (names, e.g. layers, spaced evenly; or numbers, placed by value), with gaps
    at None. Name labels are thinned so hundreds of layers stay legible."""
    for name, values in series.items():
        _same_length(name, values, len(x), "x values")
        _finite(name, values)
        if log_y:
            _positive(name, values)
    values = [v for vs in series.values() for v in vs if v is not None]
    if not x or not values:
        return _empty(title, width, height, empty)
    legend, legend_height = _legend(list(series), width)
    left, top, right, bottom = box = _box(width, height, legend_height)
    if any(isinstance(v, str) for v in x):
        xa, positions = _Axis(-0.5, len(x) - 0.5, left, right), range(len(x))
        every = math.ceil(len(x) * (max(len(str(v)) for v in x) * _CHAR_W + 8) / (right - left))
        x_ticks = [(xa(i), str(x[i])) for i in range(0, len(x), every)]
    else:
        _finite("x", x)
        xa, positions = _axis(x, left, right), x
        x_ticks = [(xa(t), _number(t)) for t in xa.ticks]
    ya = _axis(values, bottom, top, log=log_y)
    out = legend + _axes(box, x_ticks, [(ya(t), _number(t)) for t in ya.ticks], x_label, y_label)
    for j, (name, vals) in enumerate(series.items()):
        for run in _runs(positions, vals):
            xy = [(xa(px), ya(py)) for px, py in run]
            if len(xy) == 1:  # a lone value between gaps would be invisible as a line
                (cx, cy), = xy
                out.append(f'<circle class="line" cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{_colour(j)}"/>')
            else:
                out.append(f'<polyline class="line" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}" '
                           f'fill="none" stroke="{_colour(j)}" stroke-width="1.5" stroke-linejoin="round"/>')
    return _svg(title, width, height, out)
