"""The fuzz corpus as a regression suite: every file of tests/fuzz_corpus/<target>/ (the seeds) and
of tests/fuzz_crashes/<target>/ (inputs the fuzzer once failed on) goes through the target's own
``check(data)`` (fuzz/fuzz_<target>.py) on the build in place, without atheris. A crash found by
``make fuzz`` is added by copying its file to tests/fuzz_crashes/<target>/ (docs/development.md,
"Fuzzing")."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from gwcore import _dedup

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in (ROOT / "fuzz").glob("fuzz_*.py"))
NOW = 1_787_000_000_000


def _target(name: str):
    module = sys.modules.get(f"fuzz_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"fuzz_{name}", ROOT / "fuzz" / f"fuzz_{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _cases() -> list:
    cases = []
    for folder in ("fuzz_corpus", "fuzz_crashes"):
        for target_dir in sorted((ROOT / "tests" / folder).glob("*")):
            if target_dir.is_dir():
                cases += [pytest.param(target_dir.name, path, id=f"{folder}/{target_dir.name}/{path.name}")
                          for path in sorted(target_dir.iterdir()) if path.is_file()]
    return cases


def test_every_target_has_seeds_and_every_folder_a_target():
    assert TARGETS == ["envelope", "framer", "request_parser"]
    for target in TARGETS:
        assert list((ROOT / "tests" / "fuzz_corpus" / target).iterdir()), target
    for folder in ("fuzz_corpus", "fuzz_crashes"):
        for target_dir in (ROOT / "tests" / folder).glob("*"):
            assert target_dir.name in TARGETS, f"tests/{folder}/{target_dir.name} has no fuzz/fuzz_{target_dir.name}.py"


@pytest.mark.parametrize("target,path", _cases())
def test_replay(target, path):
    _target(target).check(path.read_bytes())


def test_check_refuses_what_it_should():
    # the targets' checks are not vacuous: a broken invariant is reported
    rp = _target("request_parser")
    with pytest.raises(rp.Finding):
        rp.Checker(0).feed([(_dedup.EV_ERROR, 400, "x"), (_dedup.EV_CONTINUE,)], rp.make(0))
    with pytest.raises(rp.Finding):
        rp.expect(rp.norm([(_dedup.EV_ERROR, 400, "a")]) == rp.norm([(_dedup.EV_ERROR, 431, "a")]), "differ")
    env = _target("envelope")
    assert env.layout_ok(_dedup.encode_envelope("i", [("a", "b")], b"c", 1, 2))
    assert not env.layout_ok(_dedup.encode_envelope("i", [("a", "b")], b"c", 1, 2)[:-1])
