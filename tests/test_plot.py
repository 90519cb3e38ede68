"""bench/load/plot.py: what each picture reads from the drivers' results files, that the figures
show those numbers, and that the drivers' hook writes a PNG (or says what is missing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "load"))
import plot  # noqa: E402

pytest.importorskip("matplotlib")  # the bench extra; make compile installs it (a skip fails CI)

PNG = b"\x89PNG\r\n\x1a\n"


def _server(rps: float, p50: float, p99: float) -> dict:
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}


def load_file(tmp_path: Path) -> Path:
    """A run_load.py sweep as run_load.py writes it: a scenario per connection count, rounds of
    the three servers and both ratios."""
    scenarios = []
    for conns, base in ((1, 100.0), (4, 400.0), (16, 1200.0)):
        rounds = []
        for r, f in enumerate((1.0, 1.1, 0.9)):
            g, st, b = base * f, base * 4 * f, base * 2
            rounds.append({"round": r + 1, "gwcore": _server(g, 2.0 * f, 9.0), "strict": _server(st, 0.1, 1.0),
                           "bare": _server(b, 0.2, 2.0), "ratio": g / b, "ratio_strict": g / st})
        scenarios.append({"name": "unique", "params": {"connections": conns}, "rounds": rounds})
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"argv": ["-c", "1,4,16"], "scenarios": scenarios}))
    return path


def test_rows_of_a_load_sweep_and_of_a_key(tmp_path):
    path = load_file(tmp_path)
    got = plot.rows([f"{path}#ratio_strict", path])
    assert [label for label, _v in got] == ["unique c1 ÷ strict", "unique c4 ÷ strict", "unique c16 ÷ strict",
                                             "unique c1 ÷ bare", "unique c4 ÷ bare", "unique c16 ÷ bare"]
    assert got[0][1] == pytest.approx([0.25, 0.25, 0.25])
    assert got[3][1] == pytest.approx([0.5, 0.55, 0.45])
    dist = tmp_path / "distributor.json"
    dist.write_text(json.dumps({"argv": [], "rounds": [{"ratio": 0.7, "x": 1}, {"ratio": 0.9, "x": 2}]}))
    assert plot.rows([dist]) == [("distributor", [0.7, 0.9])]
    assert plot.rows([f"{dist}#x"]) == [("x", [1, 2])]
    with pytest.raises(plot.PlotError, match="without 'missing'"):
        plot.rows([f"{dist}#missing"])


def test_load_series_medians_by_connections(tmp_path):
    series = plot.load_series(load_file(tmp_path))
    assert set(series) == {"strict", "bare", "gwcore"}
    assert series["gwcore"]["rps"] == [(1, 100.0), (4, 400.0), (16, 1200.0)]  # the middle of 0.9, 1.0, 1.1
    assert series["gwcore"]["p50_ms"] == [(1, 2.0), (4, 2.0), (16, 2.0)]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"scenarios": [{"name": "unique", "params": {"connections": 64}, "rounds": [
        {"gwcore": _server(1.0, 1.0, 1.0)}]}]}))
    with pytest.raises(plot.PlotError, match="not a connection sweep"):
        plot.load_series(one)


def test_the_load_figure_draws_those_medians(tmp_path):
    fig = plot.fig_load(plot.load_series(load_file(tmp_path)), "t")
    top, bottom = fig.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()}
    assert lines["gwcore"] == pytest.approx([100.0, 400.0, 1200.0])
    assert lines["strict"] == pytest.approx([400.0, 1600.0, 4800.0])
    assert {line.get_label() for line in bottom.get_lines()} >= {"gwcore p50", "gwcore p99", "strict p99"}
    out = plot.save(fig, tmp_path / "load.png")
    assert out.read_bytes()[:8] == PNG


def test_timeline_bins_by_instance_with_refusals_apart(tmp_path):
    path = tmp_path / "failover.json"
    t0 = 1_700_000_000.0
    answers = [[t0, 200, "127.0.0.1:1"], [t0 + 0.05, 200, "127.0.0.1:1"], [t0 + 0.15, 502, "127.0.0.1:1"],
               [t0 + 0.25, 200, "127.0.0.1:2"], [t0 + 0.26, 200, "127.0.0.1:2"]]
    path.write_text(json.dumps({"answers": answers, "events": [{"t": t0 + 0.12, "what": "SIGKILL i0"}],
                                "instances": {"127.0.0.1:1": "i0", "127.0.0.1:2": "i1"}}))
    tl = plot.timeline_bins(path, 0.1)
    assert tl["ok"] == {"i0": [2, 0, 0], "i1": [0, 0, 2]}
    assert tl["refused"] == [0, 1, 0]
    assert tl["events"] == [(pytest.approx(0.12), "SIGKILL i0")]
    fig = plot.fig_timeline(tl, "t")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert sum(heights) == pytest.approx(5 / 0.1)  # answers per second in 100 ms bins
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"answers": []}))
    with pytest.raises(plot.PlotError, match="no answers"):
        plot.timeline_bins(empty)


def test_the_checked_in_history_draws():
    entries = plot.history_points()
    assert len(entries) >= 5 and {e["baseline"] for e in entries} <= {"bare", "strict"}
    assert all(0 < e["min"] <= e.get("median", e["min"]) <= e["max"] < 1 for e in entries)
    fig = plot.fig_history(entries, "t", target=0.6)
    points = [c.lines[0] for c in fig.axes[0].containers]  # one errorbar series per baseline
    assert sum(len(line.get_xdata()) for line in points) == len(entries)
    strict = [e.get("median", (e["min"] + e["max"]) / 2) for e in entries if e["baseline"] == "strict"]
    assert list(points[1].get_ydata()) == pytest.approx(strict)


def test_rtt_series_and_figure(tmp_path):
    path = tmp_path / "s2s.json"
    rounds = [{"s2s_by_rtt": {"0": {"rps": 50.0}, "50": {"rps": 10.0}}, "ingest": {"rps": 80.0},
               "jetstream": {"rps": 70.0}} for _ in range(2)]
    path.write_text(json.dumps({"rounds": rounds}))
    series = plot.rtt_series(path)
    assert series["s2s"] == [(0.0, [50.0, 50.0]), (50.0, [10.0, 10.0])]
    assert "jetstream" in series
    out = plot.save(plot.fig_rtt([("a", series)], "t"), tmp_path / "rtt.png")
    assert out.read_bytes()[:8] == PNG


def test_the_drivers_hook_writes_the_png_beside_the_results(tmp_path, monkeypatch):
    path = load_file(tmp_path)
    said = []
    out = plot.write_plot("load", path, log=said.append)
    assert out == path.with_suffix(".png") and out.read_bytes()[:8] == PNG
    # a picture that cannot be drawn does not fail the run that measured: it says why
    assert plot.write_plot("timeline", path, log=said.append) is None
    assert "no answers" in said[-1]
    # without the bench extra: one line naming the install, no picture, no failure
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot.write_plot("load", path, log=said.append) is None
    assert "pip install -e '.[bench]'" in said[-1]


def test_the_command_line_writes_each_kind(tmp_path):
    path = load_file(tmp_path)
    for args in (["--load", str(path)], ["--ratios", f"{path}#ratio_strict", "--target", "0.6"], ["--history"]):
        out = tmp_path / f"{args[0][2:]}.png"
        assert plot.main([*args, "-o", str(out)]) == 0
        assert out.read_bytes()[:8] == PNG
    with pytest.raises(SystemExit, match="nothing.json"):
        plot.main(["--load", str(tmp_path / "nothing.json"), "-o", str(tmp_path / "x.png")])
    ratios_only = tmp_path / "ratios.json"
    ratios_only.write_text(json.dumps({"rounds": [{"ratio": 0.5}]}))
    with pytest.raises(SystemExit, match="not a connection sweep"):
        plot.main(["--load", str(ratios_only), "-o", str(tmp_path / "x.png")])
