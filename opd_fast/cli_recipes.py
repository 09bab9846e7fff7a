"""opd-fast subcommands for the paper's recipes and diagnostics: probe, sft, dedup, diagnose,
repro. Registered on the main parser by opd_fast.cli."""

from __future__ import annotations

import json
import os


def _load_pair(
    student_dir: str, teacher_dir: str, device_name: str, seed: int, student_trainable: bool
):
    """Seeded (device, tokenizer, student, teacher, shared vocabulary) for a student/teacher
    pair that must share a tokenizer."""
    import torch

    from opd_fast.models import (
        check_tokenizers_match,
        load_model,
        load_tokenizer,
        output_rows,
        resolve_attention,
        resolve_device,
        resolve_dtype,
        shared_vocab_size,
    )

    torch.manual_seed(seed)
    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    attention = resolve_attention("auto", device)
    tokenizer = load_tokenizer(student_dir)
    check_tokenizers_match(tokenizer, load_tokenizer(teacher_dir))
    student = load_model(student_dir, device, dtype, attention, trainable=student_trainable)
    teacher = load_model(teacher_dir, device, dtype, attention, trainable=False)
    vocab = shared_vocab_size(output_rows(student), output_rows(teacher), tokenizer)
    return device, tokenizer, student, teacher, vocab


def _probe(args) -> int:
    from opd_fast.probe import ProbeSettings, markdown_table, probe, write_probe

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
    from opd_fast.data import load_examples
    from opd_fast.models import eos_token_ids
    from opd_fast.sft import SFTSettings, cold_start

    _, tokenizer, student, teacher, vocab = _load_pair(
        args.student, args.teacher, args.device, args.seed, student_trainable=True
    )
    settings = SFTSettings(
        responses_per_prompt=args.responses_per_prompt,
        max_new_tokens=args.max_new_tokens,
        only_correct=args.only_correct,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        vocab_limit=vocab,
    )
    report = cold_start(
        student,
        teacher,
        tokenizer,
        load_examples(args.prompts),
        args.template,
        eos_token_ids(tokenizer, teacher),
        settings,
        args.out,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    print(f"SFT student written to {args.out}")
    return 0


def _dedup(args) -> int:
    from opd_fast.dedup import deduplicate

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
    from opd_fast.metrics import MetricsLog
    from opd_fast.plots import plot_position_heatmaps

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
    from opd_fast.data import load_examples, render_prompt
    from opd_fast.diagnostics import (
        position_profile,
        prefix_advantage,
        score_rollouts,
        sequence_auroc,
    )
    from opd_fast.models import eos_token_ids
    from opd_fast.rollout import generate
    from opd_fast.teacher import LocalTeacher

    if not args.teacher or not args.prompts:
        raise ValueError("diagnosing a checkpoint needs --teacher and --prompts")
    _, tokenizer, student, teacher_model, vocab = _load_pair(
        args.student, args.teacher, args.device, args.seed, student_trainable=False
    )
    eos_ids = eos_token_ids(tokenizer, student)
    examples = load_examples(args.prompts)[: args.num_prompts]
    repeated = [e for e in examples for _ in range(args.rollouts)]
    prompts = [render_prompt(e, "{prompt}", tokenizer) for e in repeated]
    batch = generate(
        student,
        tokenizer,
        prompts,
        eos_ids=eos_ids,
        max_new_tokens=args.max_new_tokens,
        vocab_limit=vocab,
    )
    scored = score_rollouts(
        student,
        LocalTeacher(teacher_model, 16).logits,
        batch,
        [e.answer for e in repeated],
        k=args.k,
        vocab=vocab,
    )
    profile = {name: position_profile(scored, name) for name in scored.token_metrics}
    advantage = prefix_advantage(
        student,
        teacher_model,
        tokenizer,
        [render_prompt(e, "{prompt}", tokenizer) for e in examples],
        [e.answer for e in examples],
        eos_ids=eos_ids,
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
    from opd_fast.repro import run_repro

    run_repro(out_dir=args.out, quick=args.quick, seeds=args.seeds)
    return 0


def add_recipe_commands(commands) -> None:
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
    diagnose.add_argument("--teacher")
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
    repro.set_defaults(handler=_repro)
