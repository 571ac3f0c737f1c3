"""The results: a side-by-side table on stdout, JSON, and a PNG chart."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

STEP_COLUMNS = [
    ("deliveries_per_s", "deliv/s", "{:.0f}"),
    ("server_cpu_us_per_delivery", "srv µs/d", "{:.1f}"),
    ("redis_cpu_us_per_delivery", "redis µs/d", "{:.1f}"),
    ("generator_cpu_us_per_delivery", "gen µs/d", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("max_ms", "max ms", "{:.0f}"),
    ("db_commit_max_ms", "db max ms", "{:.0f}"),
    ("lost", "lost", "{}"),
    ("late", "late", "{}"),
    ("duplicates", "dup", "{}"),
    ("out_of_order", "ooo", "{}"),
    ("errors", "err", "{}"),
    ("rss_mb", "RSS MB", "{:.0f}"),
]
IDLE_COLUMNS = [
    ("connections", "conns", "{}"),
    ("connections_per_s", "conns/s", "{:.0f}"),
    ("server_cpu_us_per_connection", "srv µs/conn", "{:.0f}"),
    ("rss_kb_per_connection", "KB/conn", "{:.1f}"),
    ("rss_mb", "RSS MB", "{:.0f}"),
]
SENDS_COLUMNS = [
    ("acked_sends_per_s", "acked/s", "{:.0f}"),
    ("server_cpu_us_per_send", "srv µs/send", "{:.0f}"),
    ("ack_p50_ms", "ack p50", "{:.1f}"),
    ("ack_p99_ms", "ack p99", "{:.1f}"),
    ("db_commit_max_ms", "db max ms", "{:.0f}"),
    ("deliveries_per_s", "deliv/s", "{:.0f}"),
    ("lost", "lost", "{}"),
    ("duplicates", "dup", "{}"),
    ("out_of_order", "ooo", "{}"),
    ("errors", "err", "{}"),
]


def _columns(scenario: str) -> list[tuple[str, str, str]]:
    if scenario == "idle":
        return IDLE_COLUMNS
    if scenario == "sends":
        return SENDS_COLUMNS
    return STEP_COLUMNS


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Rows grouped by scenario and step, the stacks side by side within each step."""
    out: list[str] = []
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_scenario[row["scenario"]].append(row)
    for scenario, scenario_rows in by_scenario.items():
        columns = _columns(scenario)
        header = ["step", "stack", *(title for _, title, _ in columns), "ok"]
        lines = [header]
        for row in scenario_rows:
            ok = {True: "yes", False: "NO"}.get(row.get("passed"), "")
            cells = [_cell(row, key, fmt) for key, _, fmt in columns]
            lines.append([row["step"], row["stack"], *cells, ok])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out.append(f"\n== {scenario} ==")
        for line in lines:
            out.append("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
    return "\n".join(out)


def summary_table(summary: list[dict[str, Any]]) -> str:
    lines = [["figure", *_stack_names(summary), "target", "met"]]
    names = lines[0][1:-2]
    for item in summary:
        values = [item["values"].get(name, "-") for name in names]
        met = {True: "yes", False: "NO"}.get(item.get("met"), "")
        lines.append([item["figure"], *(str(v) for v in values), item.get("target", ""), met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def _stack_names(summary: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for item in summary:
        for name in item["values"]:
            if name not in names:
                names.append(name)
    return names


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def chart(path: Path, rows: list[dict[str, Any]], saturation: dict[str, dict[str, int]]) -> bool:
    """Four panels: CPU per delivery and p99 against load, saturation, idle memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fanouts = sorted({r["scenario"] for r in rows if r["scenario"].startswith("fanout-")})
    stacks = list(dict.fromkeys(r["stack"] for r in rows))
    styles = ["-o", "--s", ":^", "-.d"]
    ax_cpu, ax_p99, ax_sat, ax_idle = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    for si, stack in enumerate(stacks):
        for fi, scenario in enumerate(fanouts):
            pts = [r for r in rows if r["scenario"] == scenario and r["stack"] == stack]
            if not pts:
                continue
            # Colour by stack (as in the bar charts), line style by room size.
            style = dict(fmt=styles[fi % len(styles)], color=f"C{si}", label=f"{stack} {scenario}")
            xs = [r["offered_per_s"] for r in pts]
            cpu = [r["server_cpu_us_per_delivery"] for r in pts]
            ax_cpu.plot(xs, cpu, style["fmt"], color=style["color"], label=style["label"])
            p99 = [max(r["p99_ms"], 0.1) for r in pts]
            ax_p99.plot(xs, p99, style["fmt"], color=style["color"], label=style["label"])
    ax_cpu.set(
        title="Fan-out: server CPU per delivery",
        xlabel="offered deliveries/s",
        ylabel="µs per delivery",
        xscale="log",
    )
    ax_p99.set(
        title="Fan-out: p99 latency",
        xlabel="offered deliveries/s",
        ylabel="ms",
        xscale="log",
        yscale="log",
    )
    ax_p99.axhline(250, color="grey", linewidth=0.8)
    for ax in (ax_cpu, ax_p99):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ran = [s for s in stacks if any(r["stack"] == s and r["scenario"] in fanouts for r in rows)]
    width = 0.8 / max(1, len(ran))
    for k, stack in enumerate(ran):
        values = [saturation.get(s, {}).get(stack, 0) for s in fanouts]
        xs = [i + k * width for i in range(len(fanouts))]
        bars = ax_sat.bar(xs, values, width, label=stack, color=f"C{stacks.index(stack)}")
        ax_sat.bar_label(bars, fontsize=7)
    ax_sat.set_xticks([i + width * (len(ran) - 1) / 2 for i in range(len(fanouts))], fanouts)
    ax_sat.set(title="Saturation: highest deliveries/s with p99 <= 250 ms, 0 lost")
    ax_sat.legend(fontsize=7)
    idle = [r for r in rows if r["scenario"] == "idle"]
    if idle:
        bars = ax_idle.bar(
            [r["stack"] for r in idle],
            [r["rss_kb_per_connection"] for r in idle],
            color=[f"C{stacks.index(r['stack'])}" for r in idle],
        )
        ax_idle.bar_label(bars, fmt="%.1f KB", fontsize=8)
        ax_idle.set(title="Idle: RSS per connection (KB)")
        twin = ax_idle.twinx()
        twin.plot(
            [r["stack"] for r in idle],
            [r["connections_per_s"] for r in idle],
            "ko-",
            label="conns/s",
        )
        twin.set_ylabel("connections/s (realtime, baseline: auth + join)")
        twin.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown(data: dict[str, Any]) -> str:
    """Markdown tables of a bench.json (for docs/performance.md)."""
    out: list[str] = []
    rows = data["rows"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    for scenario in scenarios:
        columns = _columns(scenario)
        out.append(f"\n**{scenario}**\n")
        out.append("| step | stack | " + " | ".join(t for _, t, _ in columns) + " | ok |")
        out.append("|---" * (len(columns) + 3) + "|")
        for row in (r for r in rows if r["scenario"] == scenario):
            ok = {True: "yes", False: "no"}.get(row.get("passed"), "")
            cells = " | ".join(_cell(row, key, fmt) for key, _, fmt in columns)
            out.append(f"| {row['step']} | {row['stack']} | {cells} | {ok} |")
    summary = data["summary"]
    names = _stack_names(summary)
    out.append("\n| figure | " + " | ".join(names) + " | target | met |")
    out.append("|---" * (len(names) + 3) + "|")
    for item in summary:
        values = " | ".join(str(item["values"].get(n, "-")) for n in names)
        met = {True: "yes", False: "no"}.get(item.get("met"), "")
        out.append(f"| {item['figure']} | {values} | {item['target']} | {met} |")
    for name, prof in data.get("profiles", {}).items():
        out.append(f"\n{name} (own samples, top 12 of {prof['samples']}):\n")
        out.append("| % | frame |")
        out.append("|---|---|")
        for entry in prof["own"][:12]:
            out.append(f"| {entry['percent']} | `{entry['frame']}` |")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
