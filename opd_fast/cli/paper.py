"""opd-fast subcommands for the paper's recipes and diagnostics: probe, sft, dedup, diagnose,
repro. Registered on the main parser by opd_fast.cli. The work is in opd_fast.paper and
opd_fast.training."""

from __future__ import annotations

import json
import os


def _load_pair(args, student_trainable: bool):
    """The seeded student/teacher pair a command names (--student, --teacher or
    --teacher-url with --teacher-token)."""
    import torch

    from opd_fast.models.loading import Placement
    from opd_fast.teachers.factory import TeacherSpec
    from opd_fast.training.pair import load_pair

    torch.manual_seed(args.seed)
    url = getattr(args, "teacher_url", None)
    spec = TeacherSpec(
        path=None if url else args.teacher,
        url=url,
        token=getattr(args, "teacher_token", None),
        batch_size=16,
    )
    return load_pair(
        args.student, spec, Placement.resolve(args.device), student_trainable=student_trainable
    )


def _probe(args) -> int:
    from opd_fast.paper.probe import ProbeSettings, markdown_table, probe, write_probe

    settings = ProbeSettings(
        num_prompts=args.num_prompts,
        rollouts_per_prompt=args.rollouts,
        max_new_tokens=args.max_new_tokens,
        k=args.k,
        seed=args.seed,
        device=args.device,
    )
    rows = probe(args.student, args.teacher, args.prompts, args.template or None, settings)
    write_probe(rows, args.out)
    print(markdown_table(rows))
    best = max(rows, key=lambda r: (r["overlap_ratio"], -r["entropy_gap"]))
    print(
        f"\nbest pairing: teacher {best['teacher']} with template {best['template']!r} "
        f"(overlap {best['overlap_ratio']:.3f}): {best['verdict']}"
    )
    print(f"written: {args.out}/probe.json, probe.md, probe.png")
    return 0


def _sft(args) -> int:
    from opd_fast.training.cold_start import SFTSettings, cold_start
    from opd_fast.training.data import load_examples

    settings = SFTSettings(
        responses_per_prompt=args.responses_per_prompt,
        max_new_tokens=args.max_new_tokens,
        only_correct=args.only_correct,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    pair = _load_pair(args, student_trainable=True)
    report = cold_start(pair, load_examples(args.prompts), args.template, settings, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    print(f"SFT student written to {args.out}")
    return 0


def _dedup(args) -> int:
    from opd_fast.paper.dedup import deduplicate

    def read(path):
        with open(path) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    rows = read(args.prompts)
    against = [r["prompt"] for r in read(args.against)] if args.against else None
    result = deduplicate([r["prompt"] for r in rows], against, threshold=args.threshold)
    kept = set(result.kept)
    with open(args.out, "w") as handle:
        seen = set()
        for row in rows:
            if row["prompt"] in kept and row["prompt"] not in seen:
                seen.add(row["prompt"])
                handle.write(json.dumps(row) + "\n")
    for prompt, reason, match in result.removed[:20]:
        print(f"removed: {prompt[:60]!r}: {reason}: {match[:60]!r}")
    print(f"kept {len(result.kept)} of {len(rows)} prompts -> {args.out}")
    return 0


def _diagnose(args) -> int:
    from opd_fast.training.metrics import MetricsLog
    from opd_fast.training.plots import plot_position_heatmaps

    os.makedirs(args.out, exist_ok=True)
    report = {}
    if args.run:
        records = MetricsLog(os.path.join(args.run, "metrics.jsonl")).read()
        path = os.path.join(args.out, "position_heatmaps.png")
        plot_position_heatmaps(records, path)
        report["position_heatmaps"] = path
        print(f"heatmaps of metrics by response position over training: {path}")
    if args.student:
        report.update(_diagnose_checkpoint(args))
    with open(os.path.join(args.out, "diagnose.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "position_profile"}, indent=2))
    return 0


def _diagnose_checkpoint(args) -> dict:
    from opd_fast.paper.diagnostics import (
        position_profile,
        prefix_advantage,
        score_rollouts,
        sequence_auroc,
    )
    from opd_fast.training.data import load_examples, render_prompt
    from opd_fast.training.rollouts import SamplingSettings, sample_examples
    from opd_fast.training.rollouts.hf import HFEngine

    if not (args.teacher or args.teacher_url) or not args.prompts:
        raise ValueError("diagnosing a checkpoint needs --teacher (or --teacher-url) and --prompts")
    pair = _load_pair(args, student_trainable=False)
    examples = load_examples(args.prompts)[: args.num_prompts]
    batch, repeated = sample_examples(
        HFEngine(pair.student, pair.tokenizer),
        pair.tokenizer,
        examples,
        repeats=args.rollouts,
        template="{prompt}",
        settings=SamplingSettings(
            eos_ids=tuple(pair.eos_ids),
            max_new_tokens=args.max_new_tokens,
            vocab_limit=pair.vocab,
        ),
    )
    scored = score_rollouts(pair, batch, [e.answer for e in repeated], k=args.k)
    profile = {name: position_profile(scored, name) for name in scored.token_metrics}
    advantage = None  # the teacher continues student prefixes: it must be in process
    if pair.teacher.local_model is not None:
        advantage = prefix_advantage(
            pair.student,
            pair.teacher.local_model,
            pair.tokenizer,
            [render_prompt(e, "{prompt}", pair.tokenizer) for e in examples],
            [e.answer for e in examples],
            eos_ids=pair.eos_ids,
            max_new_tokens=args.max_new_tokens,
        )
    return {
        "sequence_reward_auroc": sequence_auroc(scored),
        "rollout_accuracy": sum(scored.correct) / len(scored.correct),
        "metrics": scored.metrics,
        "position_profile": profile,
        "prefix_advantage": advantage,
    }


def _repro(args) -> int:
    from opd_fast.paper.repro import run_repro

    only = [name.strip() for name in args.only.split(",")] if args.only else None
    run_repro(out_dir=args.out, quick=args.quick, seeds=args.seeds, only=only, world=args.world)
    return 0


def add_paper_commands(commands) -> None:
    from opd_fast.toy.spec import WORLDS  # the spec alone: no torch at parser-building time

    probe = commands.add_parser(
        "probe", help="before training: initial overlap / entropy gap of student vs teachers"
    )
    probe.add_argument("--student", required=True)
    probe.add_argument("--teacher", required=True, action="append", help="repeatable")
    probe.add_argument("--prompts", required=True, help="JSONL with prompt and answer")
    probe.add_argument(
        "--template", action="append", help="prompt template with {prompt} or 'chat' (repeatable)"
    )
    probe.add_argument("--out", default="runs/probe")
    probe.add_argument("--num-prompts", type=int, default=32)
    probe.add_argument("--rollouts", type=int, default=2)
    probe.add_argument("--max-new-tokens", type=int, default=256)
    probe.add_argument("--k", type=int, default=16)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--device", default="auto")
    probe.set_defaults(handler=_probe)

    sft = commands.add_parser(
        "sft", help="off-policy cold start: SFT the student on filtered teacher responses"
    )
    sft.add_argument("--student", required=True)
    sft.add_argument("--teacher", required=True)
    sft.add_argument("--prompts", required=True)
    sft.add_argument("--out", required=True, help="directory for the fine-tuned student")
    sft.add_argument("--template", default="{prompt}")
    sft.add_argument("--steps", type=int, default=100)
    sft.add_argument("--lr", type=float, default=1e-5)
    sft.add_argument("--batch-size", type=int, default=32)
    sft.add_argument("--responses-per-prompt", type=int, default=2)
    sft.add_argument("--max-new-tokens", type=int, default=256)
    sft.add_argument("--only-correct", action="store_true")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--device", default="auto")
    sft.set_defaults(handler=_sft)

    dedup = commands.add_parser("dedup", help="drop exact and near-duplicate prompts")
    dedup.add_argument("--prompts", required=True, help="JSONL with a prompt field")
    dedup.add_argument("--against", help="JSONL of prompts to hold out from (e.g. teacher data)")
    dedup.add_argument("--out", required=True)
    dedup.add_argument("--threshold", type=float, default=0.8, help="word-shingle Jaccard")
    dedup.set_defaults(handler=_dedup)

    diagnose = commands.add_parser(
        "diagnose", help="diagnostics of a run (--run) and/or a checkpoint (--student ...)"
    )
    diagnose.add_argument("--run", help="run folder: metric-by-position heatmaps over training")
    diagnose.add_argument("--student", help="a checkpoint's model dir (or any student)")
    diagnose.add_argument("--teacher", help="the teacher's model dir")
    diagnose.add_argument("--teacher-url", help="or a teacher server (opd-fast serve-teacher)")
    diagnose.add_argument("--teacher-token", help="the teacher server's bearer token")
    diagnose.add_argument("--prompts")
    diagnose.add_argument("--out", default="runs/diagnose")
    diagnose.add_argument("--num-prompts", type=int, default=32)
    diagnose.add_argument("--rollouts", type=int, default=4)
    diagnose.add_argument("--max-new-tokens", type=int, default=256)
    diagnose.add_argument("--k", type=int, default=16)
    diagnose.add_argument("--seed", type=int, default=0)
    diagnose.add_argument("--device", default="auto")
    diagnose.set_defaults(handler=_diagnose)

    repro = commands.add_parser(
        "repro", help="replicate the paper's findings on the embedded toy world"
    )
    repro.add_argument("--out", default="runs/repro")
    repro.add_argument("--quick", action="store_true", help="a smaller grid (CI)")
    repro.add_argument("--seeds", type=int, default=None)
    repro.add_argument(
        "--only",
        default=None,
        help="comma-separated run names (e.g. teacher,full_vocab): run and report these only",
    )
    repro.add_argument(
        "--world",
        default="default",
        choices=sorted(WORLDS),
        help="the toy world: default (embedded), graded (the student half-knows what it "
        "was not taught, the teacher's phrasing does not drift), or graded_drift / no_drift "
        "(one of graded's two changes each; docs/repro-2026-12-03-graded-world)",
    )
    repro.set_defaults(handler=_repro)
