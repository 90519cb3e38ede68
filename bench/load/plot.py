#!/usr/bin/env python3
"""A picture of load-driver results: one row per results file (bench/results/*.json, as
distributor.py and site_to_site.py write them), each round's ratio a dot, the median a bar, the
range a line. Plain SVG, no plotting library needed.

    .venv/bin/python bench/load/plot.py -o docs/img/distributor-ratios.svg \\
        bench/results/distributor-A.json bench/results/distributor-B.json --target 0.8 --ref 0.478="before"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from html import escape
from pathlib import Path

WIDTH, LEFT, RIGHT, ROW, TOP = 860, 330, 40, 34, 40


def rows(paths: list[Path]) -> list[tuple[str, list[float]]]:
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        label = " ".join(data.get("argv") or []) or path.stem
        out.append((label, [r["ratio"] for r in data["rounds"]]))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--title", default="distributor ÷ standalone, per round (dots), median (bar), range (line)")
    p.add_argument("--target", type=float)
    p.add_argument("--ref", action="append", default=[], metavar="VALUE=TEXT", help="a dashed reference line")
    cfg = p.parse_args(argv)
    refs = [(float(v), t) for v, _, t in (r.partition("=") for r in cfg.ref)]
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(svg(rows(cfg.results), cfg.title, cfg.target, refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
