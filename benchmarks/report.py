"""The benchmark's three outputs: a rich table on the terminal, `latest.json`, `latest.png`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Iterable

from rich.console import Console
from rich.table import Table

from .stats import Metric, Verdict, human

VERDICT_STYLE = {"MET": "bold green", "NOT MET": "bold red", "skipped": "yellow", "info": "dim"}


def figure_cell(metric: Metric, footnotes: list[str]) -> str:
    """One line per figure; why a figure is missing goes to a numbered footnote (shared by
    every figure missing for the same reason)."""
    lines = []
    for f in metric.figures:
        if f.ok:
            spread = f" ±{f.spread:.0%}" if f.spread is not None else ""
            lines.append(f"{f.name}: [bold]{human(f.median, metric.unit)}[/]{spread} [dim](n={len(f.samples)})[/]")
        else:
            note = " ".join((f.note or "not measured").split())
            if note not in footnotes:
                footnotes.append(note)
            lines.append(f"{f.name}: [yellow]— [{footnotes.index(note) + 1}][/]")
    return "\n".join(lines)


def short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def value_text(v: Verdict, unit: str) -> str:
    if v.value is None:
        return "—"
    if v.target.denominator:
        return f"{v.value:.2f}×" if v.value < 100 else f"{v.value:.0f}×"
    return f"{human(v.value, unit)} {unit}"


def verdict_lines(metric: Metric) -> tuple[str, str, str]:
    targets, values, words = [], [], []
    for v in metric.verdicts():
        label = v.target.label
        if v.numerator is not None and v.denominator is not None and len(v.target.numerator) > 1:
            label += f" [dim]({v.numerator.name} vs {v.denominator.name})[/]"
        targets.append(label)
        values.append(value_text(v, metric.unit))
        words.append(f"[{VERDICT_STYLE[v.word]}]{v.word}[/]")
    return "\n".join(targets), "\n".join(values), "\n".join(words)


def render_table(metrics: list[Metric], title: str, footnotes: list[str] | None = None) -> Table:
    footnotes = [] if footnotes is None else footnotes
    table = Table(title=title, show_lines=True, expand=False)
    table.add_column("row", justify="right")
    table.add_column("metric")
    table.add_column("figures (median, ±half-range)")
    table.add_column("target")
    table.add_column("ratio / value", justify="right")
    table.add_column("verdict")
    for m in metrics:
        t, v, w = verdict_lines(m)
        table.add_row(str(m.row), f"{m.label}\n[dim]{m.unit}[/]", figure_cell(m, footnotes), t, v, w)
    return table


def print_report(console: Console, metrics: list[Metric], title: str, commands: dict[str, str]) -> None:
    footnotes: list[str] = []
    console.print(render_table(metrics, title, footnotes))
    for i, note in enumerate(footnotes, 1):
        console.print(f"[yellow][{i}][/] {note}", highlight=False)
    for m in metrics:
        for note in m.notes:
            console.print(f"[dim]row {m.row} {m.key}: {note}[/]")
    console.print("\n[bold]Command lines used[/]")
    for name, cmd in commands.items():
        console.print(f"  {name}: [cyan]{cmd}[/]", soft_wrap=True, highlight=False)


def summary(metrics: Iterable[Metric]) -> list[dict]:
    out = []
    for m in metrics:
        for v in m.verdicts():
            if not v.target.info:
                out.append({"row": m.row, "metric": m.key, **v.to_dict()})
    return out


def machine() -> dict:
    info = {"hostname": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                     text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        pass
    return info


def write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def chart_points(metrics: Iterable[Metric]) -> list[dict]:
    """One bar per SPEC target: ratio targets as the ratio with the threshold as the target line;
    absolute targets as value ÷ limit with the line at 1."""
    points = []
    for m in metrics:
        for v in m.verdicts():
            if v.target.info:
                continue
            t = v.target
            if t.denominator:
                value, line, axis = v.value, t.threshold, t.label
            else:
                value = None if v.value is None else v.value / t.threshold
                line, axis = 1.0, f"{t.label} (÷ {t.threshold:g} {m.unit})"
            points.append({"label": f"{m.row}. {short(m.label, 38)}\n{short(axis, 44)}",
                           "value": value, "line": line, "met": v.met,
                           "lower_is_better": t.op in ("<", "<=")})
    return points


def write_chart(path: str, metrics: list[Metric], title: str) -> str | None:
    """Bar chart of ratios against their target lines. Returns None, or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (.venv/bin/pip install matplotlib)"
    points = chart_points(metrics)
    if not points:
        return "nothing to chart"
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(points) + 2), 6.5))
    xs = range(len(points))
    measured = [p["value"] for p in points if p["value"]]
    floor = min([*measured, *(p["line"] for p in points)]) / 3
    for x, p in zip(xs, points):
        if p["value"] is None:
            ax.bar(x, p["line"], color="none", edgecolor="grey", hatch="//", linewidth=1)
            ax.text(x, p["line"] * 1.05, "skipped", ha="center", va="bottom", fontsize=8, color="grey")
        else:
            color = "tab:green" if p["met"] else "tab:red"
            ax.bar(x, p["value"], color=color, alpha=0.8)
            ax.text(x, p["value"] * 1.05, f"{p['value']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.hlines(p["line"], x - 0.45, x + 0.45, colors="black", linestyles="--", linewidth=1.5)
        arrow = "≤" if p["lower_is_better"] else "≥"
        ax.text(x + 0.46, p["line"], arrow, fontsize=8, va="center")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([p["label"] for p in points], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("ratio (dashed: target)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
