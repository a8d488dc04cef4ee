"""How far a quantization run is, measured in work rather than in counts, and how long the rest will take.

A run is planned up front as units, each with a cost estimated from shapes (multiply-adds of a blocked matmul):
a block's calibration forwards (`forward_cost`), the method's prepare (its searches: `Method.search_cost`) and
each linear's rounding (`Method.round_cost`, GPTQ's solver for instance, and the error report). The
seconds a unit of cost takes (its rate) are learned from the measured time of finished units alike: the same
kind and role first (GPTQ's down projections from down projections), then the same kind, then every unit. So
an 8 s attention layer and a 66 s MLP layer weigh what they take, and the estimate sharpens as kinds finish.

    meter = WorkMeter(units, skipped=done_before)
    yield meter.start(key); ...work...; yield meter.finish(key)  # a Progress event each
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from dllm_studio.events import Progress


@dataclass(frozen=True)
class Unit:
    key: Hashable  # how the pipeline names it, e.g. (block, "round", "mlp.down_proj")
    kind: str  # "forward", "prepare" or "round"
    role: str  # what makes units of a kind alike: a forward's stage, a linear's role
    cost: float
    doing: str  # what the run is doing during it, in words ("block 1: rounding mlp.down_proj")


def forward_cost(tokens: int, block_params: int, seq_len: int, hidden: int, hessians: list[int] = ()) -> float:
    """One calibration pass through a block: every token meets every weight, and attention's scores and mix
    (seq_len x hidden a token); each Hessian the pass accumulates adds in² a token (X^T X)."""
    return tokens * (block_params + 2 * seq_len * hidden + sum(n * n for n in hessians))


def error_report_cost(n_in: int, n_out: int, rows: int) -> float:
    """The error report after a linear is rounded: the sampled rows through the reference and the rounded layer."""
    return 2 * rows * n_in * n_out


class WorkMeter:
    """Fraction done and time left over planned units, at rates measured on the units that finished.

    A unit's measured time runs from the end of the one before (the first: from the meter's creation), so the
    events and bookkeeping between units count too. `skipped` leading units (blocks a resumed run found done)
    count as done, at the rates this run measures."""

    def __init__(self, units: list[Unit], *, skipped: int = 0, started: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.units = {u.key: u for u in units}
        if len(self.units) != len(units):
            raise ValueError("units must have distinct keys")
        self.clock = clock
        self.last_end = clock()
        self.started = self.last_end if started is None else started  # what elapsed_s counts from
        self.skipped = units[:skipped]
        self.finished = set(u.key for u in self.skipped)
        self.remaining: dict[tuple[str, str], float] = {}  # (kind, role) -> cost not started yet
        for u in units[skipped:]:
            self.remaining[u.kind, u.role] = self.remaining.get((u.kind, u.role), 0.0) + u.cost
        self.measured: dict[tuple[str, str], list[float]] = {}  # (kind, role) -> [seconds, cost] of finished units
        self.current: Unit | None = None
        self.fraction = 0.0  # the last one reported: it never goes back

    def start(self, key: Hashable) -> Progress:
        unit = self.units[key]
        self.remaining[unit.kind, unit.role] -= unit.cost
        self.current = unit
        return self._report(unit.doing)

    def finish(self, key: Hashable) -> Progress:
        unit, now = self.units[key], self.clock()
        if self.current is not unit:
            raise ValueError(f"unit {key!r} finished without being started")
        seconds_cost = self.measured.setdefault((unit.kind, unit.role), [0.0, 0.0])
        seconds_cost[0] += now - self.last_end
        seconds_cost[1] += unit.cost
        self.last_end, self.current = now, None
        self.finished.add(key)
        return self._report(unit.doing)

    def count(self, kind: str) -> tuple[int, int]:
        """(units of `kind` done, skipped ones included; of how many)."""
        of_kind = [k for k, u in self.units.items() if u.kind == kind]
        return sum(k in self.finished for k in of_kind), len(of_kind)

    def rate(self, kind: str, role: str) -> float | None:
        """Seconds per unit of cost for units like (kind, role): measured on the most alike finished ones."""
        for alike in ((kind, role),), [k for k in self.measured if k[0] == kind], list(self.measured):
            seconds = sum(self.measured[k][0] for k in alike if k in self.measured)
            cost = sum(self.measured[k][1] for k in alike if k in self.measured)
            if cost > 0:
                return seconds / cost
        return None

    def eta(self) -> float | None:
        """Seconds left: the units not started at their rates, and what the one in flight still needs."""
        if not self.measured:
            return None
        left = sum(cost * self.rate(*like) for like, cost in self.remaining.items() if cost > 0)
        return left + self._in_flight_left()

    def _in_flight_left(self) -> float:
        unit = self.current
        if unit is None:
            return 0.0
        return max(unit.cost * self.rate(unit.kind, unit.role) - (self.clock() - self.last_end), 0.0)

    def _report(self, doing: str) -> Progress:
        now, eta = self.clock(), self.eta()
        elapsed = now - self.started
        if eta is None:  # nothing measured yet: the shape estimate alone
            total = sum(u.cost for u in self.units.values())
            done = sum(self.units[k].cost for k in self.finished)
            fraction = until = done / total
        else:  # in seconds: the time spent, the skipped blocks as long as this run says they take, and the rest
            done = elapsed + sum(u.cost * self.rate(u.kind, u.role) for u in self.skipped)
            total = done + eta
            fraction = done / total if total > 0 else 1.0
            until = (done + self._in_flight_left()) / total if total > 0 else 1.0
        self.fraction = max(self.fraction, fraction)
        shown = 1.0 if len(self.finished) == len(self.units) else min(round(self.fraction, 4), 0.9999)  # 1.0: all done
        return Progress(shown, round(min(max(until, self.fraction), 1.0), 4), round(elapsed, 2),
                        None if eta is None else round(eta, 1), doing)
