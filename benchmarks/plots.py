"""PNG plots of the results, with matplotlib when it is installed (the ``bench`` extra)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import MANY_MODES, Results, median, percentile, row_label
from .report import METRICS

SCALE = {"ns": (1e6, "ms"), "per_s": (1.0, "per second"), "bytes": (1.0, "bytes")}
COLORS = {
    "perkey": "#1f77b4",
    "perkey-once": "#6baed6",
    "perkey-tracked": "#9ecae1",
    "redis": "#d62728",
    "rpc": "#ff7f0e",
    "sqlite": "#7f7f7f",
    "raw": "#2ca02c",
    "perkey-mux": "#17becf",
    "perkey-aio": "#9467bd",
    "many-aio": "#9467bd",
    "many-gevent": "#1f77b4",
    "many-threads-mux": "#17becf",
    "many-threads": "#6baed6",
    "many-redis-threads": "#d62728",
    "many-redis-gevent": "#ff7f0e",
    "many-poll": "#7f7f7f",
}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _bars(ax: Any, results: Results, metric: str, title: str, log: bool) -> bool:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    backends = results.backends_for(metric)
    if not backends:
        ax.set_visible(False)
        return False
    unit = METRICS[metric].unit
    factor, axis_label = SCALE.get(unit, (1.0, ""))
    medians, lows, highs = [], [], []
    for backend in backends:
        values = [v / factor for v in results.get(metric, backend)]
        mid = median(values)
        medians.append(mid)
        lows.append(mid - min(values))
        highs.append(max(values) - mid)
    positions = range(len(backends))
    ax.barh(
        list(positions),
        medians,
        xerr=[lows, highs],
        color=[COLORS.get(b, "#333333") for b in backends],
        capsize=3,
    )
    ax.set_yticks(list(positions), [row_label(b) for b in backends], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(axis_label, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _number(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for pos, value, high in zip(positions, medians, highs, strict=True):
        ax.annotate(
            _number(value), (value + high, pos), xytext=(5, 0), textcoords="offset points",
            va="center", fontsize=7,
        )  # fmt: skip
    ax.margins(x=0.12)
    return True


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _panel(
    path: Path, results: Results, panels: Sequence[tuple[str, str, bool]], title: str
) -> Path | None:
    import matplotlib.pyplot as plt

    present = [p for p in panels if results.backends_for(p[0])]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(8, 2.2 + 1.9 * len(present)))
    axes = axes if len(present) > 1 else [axes]
    for ax, (metric, sub, log) in zip(axes, present, strict=True):
        _bars(ax, results, metric, sub, log)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wake_cdf(path: Path, results: Results) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series = {b: s for (m, b), s in results.samples.items() if m == "wake" and s}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for backend in results.backends_for("wake_p50"):
        samples = sorted(v / 1e6 for v in series.get(backend, []))
        if not samples:
            continue
        fractions = [(i + 1) / len(samples) for i in range(len(samples))]
        p99 = percentile(samples, 99)
        ax.step(
            samples, fractions, where="post", color=COLORS.get(backend, "#333333"),
            label=f"{row_label(backend)} (p99 {p99:.3g} ms)",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("ms from the store being issued (another process) to get() returning")
    ax.set_ylabel("fraction of wake-ups")
    ax.set_title("Wake latency, all rounds pooled", fontsize=11)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _number(v)))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _many(path: Path, results: Results) -> Path | None:
    """Figure 11: each mode's medians against the number of waits, log-scaled."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def series(
        metric: str, mode: str, scale: float = 1.0, per_wait: bool = False
    ) -> tuple[list[int], list[float]]:
        """(waits, median / scale [/ waits]) of ``mode``'s rows, by number of waits."""
        points = []
        for backend in results.backends_for(metric):
            name, _, waits = backend.partition("@")
            if name == mode:
                value = median(results.get(metric, backend)) / scale
                points.append((int(waits), value / int(waits) if per_wait else value))
        points.sort()
        return [n for n, _ in points], [v for _, v in points]

    modes = [m for m in MANY_MODES if series("many_store", m)[0]]
    if not modes:
        return None
    panels = [  # metric, title, scale, per wait, log
        ("many_connections", "connections held at the server", 1.0, False, True),
        ("many_ratio", "first store → last delivery / the stores' time", 1.0, False, False),
        ("many_wake_p50", "wake p50 (ms); dashed: p99", 1e6, False, True),
        ("many_cpu", "client CPU per wait, launch → last delivery (µs)", 1e3, True, True),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (metric, title, scale, per_wait, log) in zip(axes.flat, panels, strict=True):
        for mode in modes:
            color = COLORS.get(mode, "#333333")
            xs, ys = series(metric, mode, scale, per_wait)
            if xs:
                ax.plot(xs, ys, marker="o", color=color, label=MANY_MODES[mode])
            if metric == "many_wake_p50":
                xs, ys = series("many_wake_p99", mode, scale)
                if xs:
                    ax.plot(xs, ys, marker=".", linestyle="--", color=color, alpha=0.6)
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _number(v)))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({n for m in modes for n in series("many_store", m)[0]}))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrent waits in one process", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle("Many waiters: N waits in one process, N results stored back to back "
                 "(medians of rounds)", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: Path, results: Results) -> list[Path]:
    """Write every plot there is data for; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    made = [
        _panel(
            out / "latency.png",
            results,
            [
                ("store", "store_result() (ms, log)", True),
                ("read", "ready read: AsyncResult(id).get() (ms, log)", True),
                ("wake_p50", "wake p50 (ms, log)", True),
                ("wake_p99", "wake p99 (ms, log)", True),
            ],
            "Per-call latency: median of rounds, bars span min-max",
        ),
        _wake_cdf(out / "wake_cdf.png", results),
        _panel(
            out / "join.png",
            results,
            [
                ("join_stored", "GroupResult.get(), all stored (ms, log)", True),
                ("join_arriving_tail", "arriving: last store to return (ms, log)", True),
            ],
            "Join of a group",
        ),
        _panel(
            out / "throughput.png",
            results,
            [
                ("publish", "apply_async publish rate (tasks/s)", False),
                ("e2e_burst", "end-to-end burst through a worker (tasks/s)", False),
                ("e2e_sequential", "sequential delay().get() (ms, log)", True),
            ],
            "Throughput",
        ),
        _panel(
            out / "memory.png",
            results,
            [
                ("mem_result@redis7", "Redis 7.0: used_memory per result (bytes)", False),
                ("mem_result@valkey8", "Valkey 8: used_memory per result (bytes)", False),
            ],
            "Server memory per stored result",
        ),
        _many(out / "many.png", results),
    ]
    return [path for path in made if path is not None]
