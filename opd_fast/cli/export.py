"""`opd-fast export`: a run's checkpoint as a Hugging Face model folder (sharded ones
consolidated), loadable by transformers and by `opd-fast serve-teacher`; a LoRA run's merged
into its base model, or with --adapter-only its peft adapter folder."""

from __future__ import annotations


def _export(args) -> int:
    from opd_fast.training.checkpoints.export import export

    out = export(args.run, args.step, args.out, adapter_only=args.adapter_only)
    print(f"exported {args.run} step {args.step if args.step is not None else '(newest)'}: {out}")
    return 0


def add_export_parser(commands) -> None:
    parser = commands.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face model folder (safetensors)"
    )
    parser.add_argument("--run", required=True, help="the run folder (its run_dir)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--out", required=True, help="the model folder to write (new or empty)")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run: write the peft adapter folder alone (default: merged into the base)",
    )
    parser.set_defaults(handler=_export)
