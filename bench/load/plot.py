#!/usr/bin/env python3
"""A picture of load-driver results: one row per results file (bench/results/*.json, as
distributor.py and site_to_site.py write them), each round's ratio a dot, the median a bar, the
range a line. Plain SVG, no plotting library needed.

    .venv/bin/python bench/load/plot.py -o docs/img/distributor-ratios.svg \\
        bench/results/distributor-A.json bench/results/distributor-B.json --target 0.8 --ref 0.478="before"

With ``--rtt``, a site_to_site.py results file (``--rtt 0,10,50,150``) is drawn instead as msg/s
against the round-trip time: one line per kind (A→B, B's wrk ingest, JetStream when measured),
each point the median over the rounds with its min–max as a vertical bar. Several files give a
line per kind and file.

    .venv/bin/python bench/load/plot.py --rtt -o docs/img/s2s-rtt.svg bench/results/s2s-<time>.json

A results file named ``FILE#KEY`` gives the row of that ratio of each round instead of ``ratio``:

    .venv/bin/python bench/load/plot.py -o docs/img/selected-vs-rmqbench.svg --target 0.8 \
        bench/results/selected-<time>.json#dispatched_broker_ratio bench/results/selected-<time>.json#stored_broker_ratio
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from html import escape
from pathlib import Path

WIDTH, LEFT, RIGHT, ROW, TOP = 860, 330, 40, 34, 40


def rows(paths: list[Path]) -> list[tuple[str, list[float]]]:
    """A row per results file: each round's ``ratio``, or with ``FILE#KEY`` each round's ``KEY``
    (selected.py's ``dispatched_broker_ratio``, ``stored_broker_ratio``)."""
    out = []
    for path in paths:
        name, _, key = str(path).partition("#")
        data = json.loads(Path(name).read_text())
        label = " ".join(data.get("argv") or []) or Path(name).stem
        out.append((key or label, [r[key or "ratio"] for r in data["rounds"]]))
    return out


def svg(data: list[tuple[str, list[float]]], title: str, target: float | None,
        refs: list[tuple[float, str]]) -> str:
    top = max([1.0] + [max(r) for _l, r in data] + [v for v, _t in refs])
    scale = (WIDTH - LEFT - RIGHT) / top
    height = TOP + ROW * len(data) + 40

    def x(v: float) -> float:
        return LEFT + v * scale

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for tick in [i / 10 for i in range(0, int(top * 10) + 1, 2)]:
        out.append(f'<line x1="{x(tick):.1f}" y1="{TOP - 6}" x2="{x(tick):.1f}" y2="{height - 30}" stroke="#ddd"/>')
        out.append(f'<text x="{x(tick):.1f}" y="{height - 14}" text-anchor="middle">{tick:.1f}</text>')
    for value, text in refs:
        out.append(f'<line x1="{x(value):.1f}" y1="{TOP - 6}" x2="{x(value):.1f}" y2="{height - 30}" '
                   f'stroke="#888" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x(value) + 3:.1f}" y="{TOP - 10}" fill="#555">{escape(text)} {value:.3f}</text>')
    if target is not None:
        out.append(f'<line x1="{x(target):.1f}" y1="{TOP - 6}" x2="{x(target):.1f}" y2="{height - 30}" '
                   f'stroke="#c33" stroke-width="1.5"/>')
        out.append(f'<text x="{x(target) + 3:.1f}" y="{height - 34}" fill="#c33">target {target:g}</text>')
    for i, (label, ratios) in enumerate(data):
        y = TOP + ROW * i + ROW / 2
        med = statistics.median(ratios)
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{LEFT}" y="{y - 8:.1f}" width="{med * scale:.1f}" height="16" fill="#8ab4e8"/>')
        out.append(f'<line x1="{x(min(ratios)):.1f}" y1="{y:.1f}" x2="{x(max(ratios)):.1f}" y2="{y:.1f}" '
                   f'stroke="#234" stroke-width="2"/>')
        for r in ratios:
            out.append(f'<circle cx="{x(r):.1f}" cy="{y:.1f}" r="3" fill="#234"/>')
        out.append(f'<text x="{x(max(ratios)) + 6:.1f}" y="{y + 4:.1f}">{med:.3f} '
                   f'({min(ratios):.3f}–{max(ratios):.3f})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- msg/s against round-trip time (site_to_site.py --rtt) ------------------------------------------

#: kind -> (label, colour); each file after the first gets its own dash pattern
KINDS = {"s2s": ("A→B", "#1f5fa8"), "ingest": ("B ingest (wrk)", "#888"), "jetstream": ("JetStream", "#c0571b")}
DASHES = ["", "6 3", "2 3", "8 3 2 3"]


def rtt_series(path: Path) -> dict[str, list[tuple[float, list[float]]]]:
    """{kind: [(rtt ms, [msg/s of each round])]} from one site_to_site.py results file; a file from
    before --rtt counts as RTT 0."""
    data = json.loads(path.read_text())
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


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def rtt_svg(files: list[tuple[str, dict[str, list[tuple[float, list[float]]]]]], title: str) -> str:
    longest = max(len(KINDS[k][0]) + (len(n) + 2 if len(files) > 1 else 0) for n, series in files for k in series)
    plot_w, plot_h, left, top, bottom = 510, 350, 80, 40, 50
    width, height = left + plot_w + max(170, 50 + 7 * longest), top + plot_h + bottom
    rtts = sorted({x for _n, series in files for pts in series.values() for x, _v in pts})
    top_v = max(max(v) for _n, series in files for pts in series.values() for _x, v in pts)
    step = _nice_step(top_v * 1.05)
    y_max = step * math.ceil(top_v * 1.05 / step)
    x_max = max(rtts) or 1.0

    def x(v: float) -> float:
        return left + v / x_max * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / y_max * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    tick = 0.0
    while tick <= y_max + 1e-9:
        out.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:,.0f}</text>')
        tick += step
    for rtt in rtts:
        out.append(f'<line x1="{x(rtt):.1f}" y1="{top}" x2="{x(rtt):.1f}" y2="{top + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{x(rtt):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{rtt:g}</text>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle">round-trip time A↔B, ms</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + plot_h / 2:.1f})">msg/s</text>')
    legend_y = top + 6
    for fi, (name, series) in enumerate(files):
        dash = DASHES[fi % len(DASHES)]
        for kind, pts in series.items():
            label, colour = KINDS[kind]
            stroke = f' stroke-dasharray="{dash}"' if dash else ""
            meds = [(px, statistics.median(v)) for px, v in pts]
            path = " ".join(f"{'M' if i == 0 else 'L'}{x(px):.1f},{y(m):.1f}" for i, (px, m) in enumerate(meds))
            out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{stroke}/>')
            for (px, v), (_px, m) in zip(pts, meds):
                out.append(f'<line x1="{x(px):.1f}" y1="{y(min(v)):.1f}" x2="{x(px):.1f}" y2="{y(max(v)):.1f}" '
                           f'stroke="{colour}" stroke-width="1.5"/>')
                out.append(f'<circle cx="{x(px):.1f}" cy="{y(m):.1f}" r="3.5" fill="{colour}"/>')
                if kind == "s2s" and len(files) == 1:
                    out.append(f'<text x="{x(px) + 6:.1f}" y="{y(m) - 6:.1f}" fill="{colour}">{m:,.0f}</text>')
            text = label if len(files) == 1 else f"{label}, {name}"
            lx = left + plot_w + 14
            out.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 22}" y2="{legend_y}" stroke="{colour}" '
                       f'stroke-width="2"{stroke}/>')
            out.append(f'<text x="{lx + 28}" y="{legend_y + 4}">{escape(text)}</text>')
            legend_y += 18
    out.append(f'<text x="{left + plot_w + 14}" y="{legend_y + 10}" fill="#555">median, min–max bar</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--title", help="default: 'distributor ÷ standalone, per round (dots), median (bar), range "
                   "(line)'; with --rtt 'site to site: msg/s against round-trip time'")
    p.add_argument("--target", type=float)
    p.add_argument("--ref", action="append", default=[], metavar="VALUE=TEXT", help="a dashed reference line")
    p.add_argument("--rtt", action="store_true",
                   help="site_to_site.py results with several RTTs: msg/s against the round-trip time")
    p.add_argument("--labels", help="--rtt with several files: their names in the legend, comma-separated "
                   "(default: the file names)")
    cfg = p.parse_args(argv)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    if cfg.rtt:
        names = cfg.labels.split(",") if cfg.labels else [path.stem for path in cfg.results]
        if len(names) != len(cfg.results):
            p.error("--labels: one per results file")
        cfg.output.write_text(rtt_svg([(name, rtt_series(path)) for name, path in zip(names, cfg.results)],
                                      cfg.title or "site to site: msg/s against round-trip time"))
        return 0
    refs = [(float(v), t) for v, _, t in (r.partition("=") for r in cfg.ref)]
    cfg.output.write_text(svg(rows(cfg.results), cfg.title or
                              "distributor ÷ standalone, per round (dots), median (bar), range (line)", cfg.target, refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
