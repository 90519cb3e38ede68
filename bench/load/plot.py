#!/usr/bin/env python3
"""Pictures of the load drivers' results: PNG files drawn with matplotlib (the ``bench`` extra:
``pip install -e '.[bench]'``; ``make compile`` installs it). The drivers call :func:`write_plot`
after they wrote their results file, so a run leaves its picture beside its JSON in
bench/results/; this script draws the same from files afterwards, or several files in one.

Kinds (one per option; the default is ``--ratios``):

``--ratios FILE[#KEY] ...``
    one row per results file (distributor.py, site_to_site.py, selected.py, run_load.py): each
    round's ratio a dot, the median a bar, the range a line. ``FILE#KEY`` takes that key of each
    round instead of ``ratio`` (selected.py's ``dispatched_broker_ratio``, run_load.py's
    ``ratio_strict``; a run_load.py file gives one row per scenario and connection count).
``--rtt FILE ...``
    site_to_site.py with several round-trip times: msg/s against the RTT, a line per kind (A→B,
    B's wrk ingest, JetStream), median with its min–max bar; several files, a line per kind and file.
``--load FILE``
    a run_load.py connection sweep (``-c 1,4,16,64,256``): req/s and p50/p99 latency against the
    connection count, for each server that ran (strict, bare, gwcore).
``--history [bench/history.json]``
    the receiver's ratio to a bare server through the project's history (the checked-in file).
``--timeline FILE``
    a failover.py run: answers per 100 ms through the load balancer, by the instance that gave
    them and refused ones apart, with the kills and handovers marked.

    .venv/bin/python bench/load/plot.py -o docs/img/distributor-ratios.png --target 0.8 \\
        bench/results/distributor-A.json bench/results/distributor-B.json --ref 0.478="before"
    .venv/bin/python bench/load/plot.py --rtt -o docs/img/s2s-rtt.png bench/results/s2s-<time>.json
    .venv/bin/python bench/load/plot.py --load -o docs/img/receiver-load.png bench/results/load-<time>.json
    .venv/bin/python bench/load/plot.py --history -o docs/img/receiver-history.png
    .venv/bin/python bench/load/plot.py --timeline -o docs/img/failover.png bench/results/failover-<time>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HISTORY = HERE.parent / "history.json"

#: series colours, the same server or kind in the same colour in every picture
COLOURS = {"gwcore": "#1f5fa8", "strict": "#c0571b", "bare": "#888888", "s2s": "#1f5fa8",
           "ingest": "#888888", "jetstream": "#c0571b"}
RTT_LABELS = {"s2s": "A→B", "ingest": "B ingest (wrk)", "jetstream": "JetStream"}
LINESTYLES = ["-", "--", ":", "-."]


class PlotError(ValueError):
    """A results file that does not hold what the picture needs (the message says what)."""


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or a one-line error naming the install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlotError(f"{path}: {exc}") from None


# -- what each picture shows, read from the results (no matplotlib needed) -------------------------

def rows(paths: list[Path | str]) -> list[tuple[str, list[float]]]:
    """``(label, [ratio of each round])`` per results file, or per scenario of a run_load.py file."""
    out = []
    for path in paths:
        name, _, key = str(path).partition("#")
        data = _read(Path(name))
        label = " ".join(data.get("argv") or []) or Path(name).stem
        key = key or "ratio"
        if "scenarios" in data:  # run_load.py: a row per scenario (and connection count)
            for sc in data["scenarios"]:
                values = [r[key] for r in sc["rounds"] if key in r]
                if values:
                    load = sc["params"].get("connections")
                    base = {"ratio": "÷ bare", "ratio_strict": "÷ strict"}.get(key, key)
                    out.append((f"{sc['name']} c{load} {base}" if isinstance(load, int) else f"{sc['name']} {base}",
                                values))
            continue
        try:
            out.append((key if key != "ratio" else label, [r[key] for r in data["rounds"]]))
        except KeyError:
            raise PlotError(f"{name}: a round without {key!r}") from None
    if not out:
        raise PlotError("no ratios in " + ", ".join(map(str, paths)))
    return out


def rtt_series(path: Path) -> dict[str, list[tuple[float, list[float]]]]:
    """{kind: [(rtt ms, [msg/s of each round])]} from one site_to_site.py results file; a file from
    before --rtt counts as RTT 0."""
    data = _read(path)
    rounds = data["rounds"]
    rtts = [float(k) for k in (rounds[0].get("s2s_by_rtt") or {"0": None})]
    out: dict[str, list[tuple[float, list[float]]]] = {"s2s": [], "ingest": []}
    for rtt in rtts:
        key = f"{rtt:g}"
        out["s2s"].append((rtt, [(r.get("s2s_by_rtt") or {key: r["s2s"]})[key]["rps"] for r in rounds]))
        out["ingest"].append((rtt, [r["ingest"]["rps"] for r in rounds]))
        if all("jetstream" in r for r in rounds):
            out.setdefault("jetstream", []).append((rtt, [r["jetstream"]["rps"] for r in rounds]))
    return out


def load_series(path: Path, scenario: str = "unique") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{server: {"rps" | "p50_ms" | "p99_ms": [(connections, median over the rounds)]}} of a
    run_load.py sweep, sorted by connections."""
    data = _read(path)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for sc in data.get("scenarios", []):
        conns = sc["params"].get("connections")
        if sc["name"] != scenario or not isinstance(conns, int):
            continue
        for server in ("strict", "bare", "gwcore"):
            runs = [r[server] for r in sc["rounds"] if server in r]
            if not runs:
                continue
            series = out.setdefault(server, {"rps": [], "p50_ms": [], "p99_ms": []})
            for metric, points in series.items():
                values = [run[metric] for run in runs if run.get(metric) is not None]
                if values:
                    points.append((conns, statistics.median(values)))
    for series in out.values():
        for points in series.values():
            points.sort()
    if not out or max(len(s["rps"]) for s in out.values()) < 2:
        raise PlotError(f"{path}: not a connection sweep of {scenario!r} (run_load.py -c 1,4,16,64,256)")
    return out


def history_points(path: Path = HISTORY) -> list[dict[str, Any]]:
    """The entries of bench/history.json, oldest first: ``when``, ``change``, ``baseline`` and the
    ratio's ``min``/``max`` (and ``median`` where one was measured)."""
    entries = _read(path)["entries"]
    for e in entries:
        if not {"when", "change", "baseline", "min", "max"} <= set(e):
            raise PlotError(f"{path}: an entry without when/change/baseline/min/max: {e}")
    return entries


def timeline_bins(path: Path, width_s: float = 0.1) -> dict[str, Any]:
    """A failover.py run in bins of *width_s*: ``{"t": [bin start, s], "ok": {instance: [200s]},
    "refused": [other answers], "events": [(s, what)]}``, time from the first answer."""
    data = _read(path)
    answers = data.get("answers") or []
    if not answers:
        raise PlotError(f"{path}: no answers recorded")
    t0 = min(t for t, _s, _n in answers)
    n = int((max(t for t, _s, _n in answers) - t0) / width_s) + 1
    names = data.get("instances", {})
    ok: dict[str, list[int]] = {}
    refused = [0] * n
    for t, status, node in answers:
        i = int((t - t0) / width_s)
        if status == 200:
            ok.setdefault(names.get(node, node), [0] * n)[i] += 1
        else:
            refused[i] += 1
    return {"t": [i * width_s for i in range(n)], "width": width_s, "ok": dict(sorted(ok.items())),
            "refused": refused, "events": [(e["t"] - t0, e["what"]) for e in data.get("events", [])]}


# -- the pictures ----------------------------------------------------------------------------------

def fig_ratios(data: list[tuple[str, list[float]]], title: str, target: float | None = None,
               refs: list[tuple[float, str]] = ()) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(data)))
    ys = list(range(len(data)))[::-1]
    for y, (_label, values) in zip(ys, data):
        med = statistics.median(values)
        ax.barh(y, med, height=0.5, color="#8ab4e8")
        ax.plot([min(values), max(values)], [y, y], color="#223344", lw=2)
        ax.plot(values, [y] * len(values), "o", color="#223344", ms=4)
        ax.annotate(f"{med:.3f} ({min(values):.3f}–{max(values):.3f})", (max(values), y),
                    xytext=(6, -3), textcoords="offset points", fontsize=8)
    for value, text in refs:
        ax.axvline(value, color="#888888", ls="--", lw=1)
        ax.annotate(f"{text} {value:.3f}", (value, len(data) - 0.5), fontsize=8, color="#555555")
    if target is not None:
        ax.axvline(target, color="#cc3333", lw=1.5)
        ax.annotate(f"target {target:g}", (target, -0.6), fontsize=8, color="#cc3333")
    ax.set_yticks(ys, [label for label, _v in data], fontsize=8)
    ax.set_xlim(0, max([1.0] + [max(v) for _l, v in data]) * 1.15)
    ax.set_xlabel("ratio (dots: rounds, bar: median, line: range)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", color="#dddddd")
    fig.tight_layout()
    return fig


def fig_rtt(files: list[tuple[str, dict[str, list[tuple[float, list[float]]]]]], title: str) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for fi, (name, series) in enumerate(files):
        for kind, pts in series.items():
            xs = [x for x, _v in pts]
            meds = [statistics.median(v) for _x, v in pts]
            lows = [m - min(v) for m, (_x, v) in zip(meds, pts)]
            highs = [max(v) - m for m, (_x, v) in zip(meds, pts)]
            label = RTT_LABELS[kind] if len(files) == 1 else f"{RTT_LABELS[kind]}, {name}"
            ax.errorbar(xs, meds, yerr=[lows, highs], color=COLOURS[kind], ls=LINESTYLES[fi % len(LINESTYLES)],
                        marker="o", ms=4, capsize=3, label=label)
    ax.set_xlabel("round-trip time A↔B, ms")
    ax.set_ylabel("msg/s (median, min–max bar)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(color="#dddddd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_load(series: dict[str, dict[str, list[tuple[int, float]]]], title: str) -> Any:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for server, s in series.items():
        colour = COLOURS.get(server, "black")
        top.plot(*zip(*s["rps"]), "o-", color=colour, label=server)
        if s["p50_ms"]:
            bottom.plot(*zip(*s["p50_ms"]), "o-", color=colour, label=f"{server} p50")
        if s["p99_ms"]:
            bottom.plot(*zip(*s["p99_ms"]), "s--", color=colour, ms=4, label=f"{server} p99")
    top.set_ylabel("req/s (median over rounds)")
    top.set_ylim(bottom=0)
    top.set_title(title, fontsize=10)
    bottom.set_ylabel("latency, ms")
    bottom.set_yscale("log")
    bottom.set_xscale("log", base=2)
    bottom.set_xlabel("wrk connections")
    conns = sorted({c for s in series.values() for c, _v in s["rps"]})
    bottom.set_xticks(conns, [str(c) for c in conns])
    for ax in (top, bottom):
        ax.grid(color="#dddddd", which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_history(entries: list[dict[str, Any]], title: str, target: float | None = None) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    xs = range(len(entries))
    for baseline, marker in (("bare", "o"), ("strict", "s")):
        points = [(x, e) for x, e in zip(xs, entries) if e["baseline"] == baseline]
        if not points:
            continue
        mids = [e.get("median", (e["min"] + e["max"]) / 2) for _x, e in points]
        ax.errorbar([x for x, _e in points], mids,
                    yerr=[[m - e["min"] for m, (_x, e) in zip(mids, points)],
                          [e["max"] - m for m, (_x, e) in zip(mids, points)]],
                    fmt=marker, color=COLOURS["gwcore" if baseline == "bare" else "strict"], capsize=3,
                    label=f"gwcore ÷ {baseline} server")
    if target is not None:
        ax.axhline(target, color="#cc3333", lw=1)
        ax.annotate(f"target {target:g}", (0, target), xytext=(0, 3), textcoords="offset points",
                    fontsize=8, color="#cc3333")
    ax.set_xticks(list(xs), [f"{e['when']}\n{e['change']}" for e in entries], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("gwcore req/s ÷ baseline req/s")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", color="#dddddd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_timeline(tl: dict[str, Any], title: str) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    bottom = [0] * len(tl["t"])
    palette = ["#1f5fa8", "#3c9a5f", "#8c5fb0", "#b08a1f"]
    per_s = 1 / tl["width"]
    for i, (name, counts) in enumerate(tl["ok"].items()):
        ax.bar(tl["t"], [c * per_s for c in counts], width=tl["width"], align="edge",
               bottom=[b * per_s for b in bottom], color=palette[i % len(palette)], label=f"200 from {name}")
        bottom = [b + c for b, c in zip(bottom, counts)]
    if any(tl["refused"]):
        ax.bar(tl["t"], [c * per_s for c in tl["refused"]], width=tl["width"], align="edge",
               bottom=[b * per_s for b in bottom], color="#cc3333", label="not 200")
    top = max(1, max(b + r for b, r in zip(bottom, tl["refused"]))) * per_s
    for t, what in tl["events"]:
        ax.axvline(t, color="black", ls="--", lw=1)
        ax.annotate(what, (t, top), xytext=(3, -10), textcoords="offset points", fontsize=8, rotation=0)
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"answers/s through the load balancer ({tl['width'] * 1000:.0f} ms bins)")
    ax.set_ylim(0, top * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def write_plot(kind: str, results: Path, keys: tuple[str, ...] = (), log: Any = print) -> Path | None:
    """For the drivers: draw *kind* (``ratios`` of the rounds' *keys*, default ``ratio``; ``rtt``,
    ``load``, ``timeline``) from the results file just written, as ``<results>.png`` beside it.
    Without matplotlib (the bench extra) the run is not failed: it says how to get the picture
    and returns None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"no picture of {results.name}: matplotlib is missing (.venv/bin/pip install -e '.[bench]')")
        return None
    results = Path(results)
    try:
        fig = _driver_figure(kind, results, keys)
    except PlotError as exc:
        log(f"no picture of {results.name}: {exc}")
        return None
    out = save(fig, results.with_suffix(".png"))
    log(f"wrote {out}")
    return out


def _driver_figure(kind: str, results: Path, keys: tuple[str, ...]) -> Any:
    if kind == "ratios":
        fig = fig_ratios(rows([f"{results}#{k}" for k in keys] or [results]), f"per round ({results.stem})")
    elif kind == "rtt":
        fig = fig_rtt([(results.stem, rtt_series(results))], "site to site: msg/s against round-trip time")
    elif kind == "load":
        fig = fig_load(load_series(results), "receiver: req/s and latency against connections (unique ids)")
    elif kind == "timeline":
        fig = fig_timeline(timeline_bins(results), f"through the load balancer ({results.stem})")
    else:
        raise ValueError(f"no picture kind {kind!r}")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    kind = p.add_mutually_exclusive_group()
    for name in ("ratios", "rtt", "load", "history", "timeline"):
        kind.add_argument(f"--{name}", action="store_const", const=name, dest="kind")
    p.add_argument("--title")
    p.add_argument("--target", type=float, help="--ratios, --history: the target line")
    p.add_argument("--ref", action="append", default=[], metavar="VALUE=TEXT", help="--ratios: a dashed line")
    p.add_argument("--labels", help="--rtt with several files: their legend names, comma-separated")
    cfg = p.parse_args(argv)
    kind = cfg.kind or "ratios"
    if kind != "history" and not cfg.results:
        p.error(f"--{kind}: at least one results file")
    try:
        if kind == "rtt":
            names = cfg.labels.split(",") if cfg.labels else [path.stem for path in cfg.results]
            if len(names) != len(cfg.results):
                p.error("--labels: one per results file")
            fig = fig_rtt([(n, rtt_series(path)) for n, path in zip(names, cfg.results)],
                          cfg.title or "site to site: msg/s against round-trip time")
        elif kind == "load":
            fig = fig_load(load_series(cfg.results[0]),
                           cfg.title or "receiver: req/s and latency against connections (unique ids)")
        elif kind == "history":
            fig = fig_history(history_points(cfg.results[0] if cfg.results else HISTORY),
                              cfg.title or "receiver, unique ids: gwcore ÷ a bare server through the history",
                              cfg.target)
        elif kind == "timeline":
            fig = fig_timeline(timeline_bins(cfg.results[0]), cfg.title or "failover through the load balancer")
        else:
            refs = [(float(v), t) for v, _, t in (r.partition("=") for r in cfg.ref)]
            fig = fig_ratios(rows(cfg.results), cfg.title or "gwcore ÷ baseline per round", cfg.target, refs)
    except PlotError as exc:
        raise SystemExit(f"plot.py: {exc}") from None
    save(fig, cfg.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
