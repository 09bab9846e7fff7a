"""pytest-benchmark for the OPD op: `pytest bench --benchmark-only` (see bench/README.md).

The shapes, dtypes, modes and implementations come from the --opd-* options below, small by
default so the whole run takes about a minute; `bench_opd.py` is the full report. The bench
folder is not collected by a plain `pytest` (pyproject's testpaths is python_tests).
"""

from __future__ import annotations

import pytest

DEFAULTS = {
    "n": "128",
    "vocab": "32768",
    "dtypes": "fp32,bf16",
    "modes": "fwd_bwd",
    "impls": "opd_fast,floor,careful,careful_compile,reference",
    "variant": "student_topk",
    "estimator": "pg",
    "k": "16",
}


LIST_OPTIONS = ("n", "dtypes", "modes", "impls")


def pytest_addoption(parser):
    group = parser.getgroup("opd", "opd_fast benchmark cases")
    for name, default in DEFAULTS.items():
        many = name in LIST_OPTIONS
        group.addoption(
            f"--opd-{name}",
            default=default,
            help=f"{'comma-separated ' if many else ''}{name} (default {default})",
        )


def option(config, name):
    return config.getoption(f"--opd-{name}")


def option_list(config, name):
    return [value.strip() for value in option(config, name).split(",") if value.strip()]


def pytest_generate_tests(metafunc):
    if "opd_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases, ids = [], []
    for dtype in option_list(config, "dtypes"):
        for rows in (int(n) for n in option_list(config, "n")):
            for mode in option_list(config, "modes"):
                for impl in option_list(config, "impls"):
                    cases.append((impl, mode, rows, dtype))
                    ids.append(f"{impl}-{mode}-N{rows}-{dtype}")
    metafunc.parametrize("opd_case", cases, ids=ids)


@pytest.fixture
def opd_settings(request):
    config = request.config
    return {
        "vocab": int(option(config, "vocab")),
        "variant": option(config, "variant"),
        "estimator": option(config, "estimator"),
        "k": int(option(config, "k")),
    }
