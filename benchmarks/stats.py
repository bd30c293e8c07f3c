"""The benchmark's data model and its arithmetic: samples, medians, ratios, targets, verdicts.

Pure: no processes, no files. Everything the report shows is computed here from the samples a
row collected, so the smoke test can check it with made-up numbers.

A *metric* is one line of SPEC's target list (say "4 KiB random read IOPS"). It holds several
*figures* (fuseclone, qemu-storage-daemon, the raw loop device, ...), each a list of samples
from repeated runs, and *targets*: a comparison of a ratio of figure medians, or of one median,
against a threshold. A figure that could not be measured has no samples and a note; every ratio
and verdict that needs it is then None ("skipped"), never a made-up number.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass
class Figure:
    """Repeated measurements of one thing, in the metric's unit."""

    name: str
    samples: list[float] = field(default_factory=list)
    note: str = ""  # why it is missing, or how it was measured (e.g. "loop dio=on")
    details: list[dict] = field(default_factory=list)  # per-sample extras, kept in the JSON

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def spread(self) -> float | None:
        """Half the min..max range relative to the median (0.05 = ±5 %)."""
        med = self.median
        if not med or len(self.samples) < 2:
            return None
        return (max(self.samples) - min(self.samples)) / 2 / abs(med)

    def add(self, value: float, **details) -> None:
        self.samples.append(float(value))
        if details:
            self.details.append(details)

    def to_dict(self) -> dict:
        return {"name": self.name, "samples": self.samples, "median": self.median,
                "spread": self.spread, "n": len(self.samples), "note": self.note,
                "details": self.details}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def best(figures: Iterable[Figure], higher_is_better: bool = True) -> Figure | None:
    """The figure with the best median among those measured (None if none was)."""
    measured = [f for f in figures if f.ok]
    if not measured:
        return None
    pick = max if higher_is_better else min
    return pick(measured, key=lambda f: f.median)


OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
       ">": lambda a, b: a > b}


@dataclass
class Target:
    """`value(numerator) / value(denominator) OP threshold`, or `value(numerator) OP threshold`
    when there is no denominator. Each side names one or more figures; with several, the best
    median is used (e.g. the best loop-device mode of each contender)."""

    label: str  # short text for the table and the chart, e.g. "≥ 2× qsd"
    numerator: Sequence[str]
    op: str
    threshold: float
    denominator: Sequence[str] = ()
    info: bool = False  # shown, but not one of SPEC's targets

    def evaluate(self, metric: "Metric") -> "Verdict":
        num = best(metric.figures_named(self.numerator), metric.higher_is_better)
        den = best(metric.figures_named(self.denominator), metric.higher_is_better) if self.denominator else None
        if num is None or (self.denominator and den is None):
            missing = [n for n in [*self.numerator, *self.denominator] if not metric.figure(n).ok]
            return Verdict(self, None, None, num, den, f"skipped: {', '.join(missing)} not measured")
        value = ratio(num.median, den.median) if den is not None else num.median
        if value is None:
            return Verdict(self, None, None, num, den, "skipped: zero denominator")
        return Verdict(self, value, OPS[self.op](value, self.threshold), num, den, "")


@dataclass
class Verdict:
    target: Target
    value: float | None  # the ratio (or the median, for an absolute target)
    met: bool | None  # None: could not be evaluated
    numerator: Figure | None
    denominator: Figure | None
    note: str

    @property
    def word(self) -> str:
        if self.met is None:
            return "skipped"
        if self.target.info:
            return "info"
        return "MET" if self.met else "NOT MET"

    def to_dict(self) -> dict:
        return {"target": self.target.label, "op": self.target.op, "threshold": self.target.threshold,
                "numerator": self.numerator.name if self.numerator else list(self.target.numerator),
                "denominator": (self.denominator.name if self.denominator else list(self.target.denominator)) or None,
                "value": self.value, "met": self.met, "verdict": self.word, "info": self.target.info,
                "note": self.note}


@dataclass
class Metric:
    row: int
    key: str  # stable id, e.g. "r1.randread4k"
    label: str
    unit: str
    higher_is_better: bool = True
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, name: str) -> Figure:
        """The figure called NAME, created empty on first use."""
        for f in self.figures:
            if f.name == name:
                return f
        f = Figure(name)
        self.figures.append(f)
        return f

    def figures_named(self, names: Iterable[str]) -> list[Figure]:
        return [self.figure(n) for n in names]

    def skip(self, names: Iterable[str], note: str) -> None:
        for n in names:
            f = self.figure(n)
            if not f.ok:
                f.note = note

    def verdicts(self) -> list[Verdict]:
        return [t.evaluate(self) for t in self.targets]

    def to_dict(self) -> dict:
        return {"row": self.row, "key": self.key, "label": self.label, "unit": self.unit,
                "higher_is_better": self.higher_is_better,
                "figures": [f.to_dict() for f in self.figures],
                "verdicts": [v.to_dict() for v in self.verdicts()], "notes": self.notes}


def human(value: float | None, unit: str = "") -> str:
    """12345 -> '12.3k', 0.00123 -> '1.23m' (for table cells); None -> '—'."""
    if value is None:
        return "—"
    av = abs(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if av >= scale * 0.9995 and unit not in ("MiB", "MB/s", "µs", "s"):
            return f"{value / scale:.3g}{suffix}"
    if av >= 100:
        return f"{value:.0f}"
    if av >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"
