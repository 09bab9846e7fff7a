"""The benchmark's comparisons under pytest-benchmark: one group per (mode, N, V, dtype), with
opd_fast, the careful eager baseline, its torch.compile, the reference and the machine's floor
side by side. Cases come from bench/conftest.py's --opd-* options.

  pytest bench --benchmark-only                                   # small shapes, ~1 min
  pytest bench --benchmark-only --benchmark-autosave              # save for a later compare
  pytest bench --benchmark-only --benchmark-compare               # against the last saved run
"""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("pytest_benchmark")

import bench_opd  # noqa: E402  (bench/ is put on sys.path by pytest's rootdir-less import)
import torch  # noqa: E402

import opd_fast  # noqa: E402

# timed rounds of an implementation that takes seconds per call at the default shapes
SLOW_ROUNDS = {"reference": 3}


def test_opd(benchmark, opd_case, opd_settings):
    impl, mode, rows, dtype_name = opd_case
    args = argparse.Namespace(temperature=1.0, cold_compile=False, **opd_settings)
    bench_opd.check_settings(args)
    torch.manual_seed(0)
    inputs = bench_opd.make_inputs(
        rows, args.vocab, bench_opd.DTYPES[dtype_name], torch.device("cpu"), seed=0
    )
    inputs[0].requires_grad_(True)
    call = bench_opd.make_call(impl, args)
    benchmark.group = f"{mode} N={rows} V={args.vocab} {dtype_name} {args.variant}/{args.estimator}"
    benchmark.extra_info.update(
        impl=impl, mode=mode, N=rows, V=args.vocab, dtype=dtype_name, k=args.k
    )
    first = call(inputs, mode)  # warm-up; compiles careful_compile
    if impl != "floor":
        loss = bench_opd.loss_value(impl, first, mode)
        expected = float(
            opd_fast.opd_loss(
                *inputs[:2],
                k=args.k,
                variant=args.variant,
                estimator=args.estimator,
                sampled_ids=inputs[2] if args.variant == "sampled_token" else None,
            ).loss.detach()
        )
        benchmark.extra_info["loss_diff_vs_opd_fast"] = abs(loss - expected)
        if dtype_name == "fp32":  # no ties in fp32 inputs: every impl computes the same loss
            assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5), (impl, loss, expected)
    del first
    if impl in SLOW_ROUNDS:
        benchmark.pedantic(call, args=(inputs, mode), rounds=SLOW_ROUNDS[impl], iterations=1)
    else:
        benchmark(call, inputs, mode)
