"""Finding (c)'s variants on the graded world with pg and with a 10x lower learning rate.

Usage: OPD_FAST_THREADS=2 python weak_variants.py OUT_DIR
Runs Student / Overlap / Non-Overlap Top-k under (exact, lr 1e-3: the grid's own), (pg, lr 1e-3), (exact, lr 1e-4) and
(pg, lr 1e-4), 3 seeds each, the toy demo's schedule otherwise; reuses finished runs and
writes OUT_DIR/weak_variants.json.
"""

import dataclasses
import json
import os
import statistics
import sys

from opd_fast.paper import repro
from opd_fast.toy import toy_assets
from opd_fast.toy.spec import world_spec

SETTINGS = {"exact_lr1e-3": ("exact", 1e-3), "pg_lr1e-3": ("pg", 1e-3), "exact_lr1e-4": ("exact", 1e-4), "pg_lr1e-4": ("pg", 1e-4)}
VARIANTS = ("student_topk", "overlap_topk", "nonoverlap_topk")
SEEDS = 3


def main(out_dir: str) -> None:
    assets = toy_assets(spec=world_spec("graded"), progress=True)
    results = {}
    make = repro._config
    for setting, (estimator, lr) in SETTINGS.items():
        for variant in VARIANTS:
            spec = repro.RunSpec(f"{variant}_{setting}", "teacher", variant=variant,
                                 estimator=estimator)

            def config(assets, spec, seed, run_dir, quick, lr=lr):
                return dataclasses.replace(make(assets, spec, seed, run_dir, quick), lr=lr)

            repro._config = config
            rows = []
            for seed in range(SEEDS):
                print(f"{spec.name} seed {seed}", flush=True)
                summary = repro._run(assets, spec, seed, out_dir, False)
                rows.append({k: summary.get(k) for k in (
                    "gap_recovery", "student_acc_before", "student_acc_after")})
                print(f"  gap recovery {rows[-1]['gap_recovery']}", flush=True)
            gaps = [r["gap_recovery"] for r in rows]
            results[spec.name] = {"estimator": estimator, "lr": lr, "variant": variant,
                                  "seeds": rows, "mean": statistics.mean(gaps),
                                  "sd": statistics.stdev(gaps)}
    repro._config = make
    with open(os.path.join(out_dir, "weak_variants.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    for name, r in results.items():
        print(f"{name:32s} {r['mean']:+.3f} ± {r['sd']:.3f}  "
              + " ".join(f"{s['gap_recovery']:+.3f}" for s in r["seeds"]))


if __name__ == "__main__":
    main(sys.argv[1])
