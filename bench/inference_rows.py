"""The closing table of :mod:`bench.inference`: each figure beside its same-run baseline and
its goal, and the percentiles the rows are made of."""

from __future__ import annotations

from dataclasses import dataclass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


def p50_p99(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1000:.2f} ms, p99 {percentile(values, 99) * 1000:.2f} ms"


@dataclass(frozen=True)
class Row:
    """One line of the closing table: what, on which database, the figure, its baseline (from
    the same run) and the goal."""

    what: str
    db: str
    figure: str
    baseline: str
    goal: str


ROWS: list[Row] = []


def row(what: str, db: str, figure: str, baseline: str, goal: str) -> None:
    ROWS.append(Row(what, db, figure, baseline, goal))


def print_table(load: str) -> None:
    print(f"\n== the table (machine load average at the start: {load})")
    print("| what | db | now | baseline, same run | goal |")
    print("| --- | --- | --- | --- | --- |")
    for r in ROWS:
        print(f"| {r.what} | {r.db} | {r.figure} | {r.baseline} | {r.goal} |")
    for what, command, goal in MEASURED_ELSEWHERE:
        print(f"| {what} | - | measured by `{command}` | - | {goal} |")


MEASURED_ELSEWHERE = [  # rows of issue 19's table that a benchmark of their own prints
    (
        "watcher crediting a 10,000-transaction backlog (local TON Center)",
        "python -m bench.watcher",
        "<= 10 s on PostgreSQL",
    ),
    (
        "1,000 simultaneous bot chats through the webhook, p99 handler time excl. inference",
        "python -m bench.bot_load",
        "<= 50 ms, no flood-limit breach",
    ),
]
