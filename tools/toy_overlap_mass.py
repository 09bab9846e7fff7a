"""Where the student's top-k disagreement with the teacher lies in a toy world, at the start of
OPD: the share of each model's probability mass inside the overlap of their top-k sets, overall
and by response position (the recalled value, the synonym slots, the rest), and the student's
and teacher's probabilities at the value position of the entities the student was not taught.

    python tools/toy_overlap_mass.py --world graded --out /tmp/mass_graded.json

Student rollouts are sampled at temperature 1 (as OPD samples them) on the first
`--prompts` OPD training prompts, `--rollouts` each; both models score every response token
(<eos> included) in float32 on the CPU. Builds the world into the cache if it is missing.
"""

from __future__ import annotations

import argparse
import json

import torch

from opd_fast.models.loading import CPU_FP32, load_model
from opd_fast.op.reference import token_metrics, topk_mask
from opd_fast.toy import data, toy_assets
from opd_fast.toy.spec import world_spec

# Word index in a chain response "e017 is 7 . 7 plus 4 is 11 . \boxed{ 11 } <eos>".
VALUE_INDEX = 2
SLOT_INDICES = (1, 3, 5, 7, 9)
# The training's own per-token metrics (opd_fast.op.reference.token_metrics) this tool reports.
SHARED_METRICS = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "student_topk_mass",
    "teacher_topk_mass",
)


def position_kind(index: int) -> str:
    if index == VALUE_INDEX:
        return "value"
    return "slot" if index in SLOT_INDICES else "other"


@torch.no_grad()
def measure(world: str, prompts: int, rollouts: int, k: int, seed: int) -> dict:
    spec = world_spec(world)
    assets = toy_assets(spec, progress=False)
    student = load_model(assets.student_dir, CPU_FP32, trainable=False)
    teacher = load_model(assets.teacher_dir, CPU_FP32, trainable=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.student_dir)
    rows = data.read_jsonl(assets.train_prompts)[:prompts]
    facts = data.make_facts(spec)
    known = set(facts.student_known)
    texts = [row["prompt"] for row in rows for _ in range(rollouts)]
    torch.manual_seed(seed)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = student.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=24,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    attention = (out != tokenizer.pad_token_id).long()
    start = batch.input_ids.shape[1]
    positions = torch.cumsum(attention, dim=1) - 1
    positions.clamp_(min=0)
    log_p = torch.log_softmax(
        student(input_ids=out, attention_mask=attention, position_ids=positions).logits, -1
    )
    log_q = torch.log_softmax(
        teacher(input_ids=out, attention_mask=attention, position_ids=positions).logits, -1
    )
    sums: dict[str, dict[str, float]] = {}
    value_rows = []
    for row_index, sequence in enumerate(out):
        entity = int(texts[row_index].split()[2][1:])
        for j, token in enumerate(sequence[start:].tolist()):
            t = start + j - 1  # logits at t predict token t + 1
            lp, lq = log_p[row_index, t], log_q[row_index, t]
            s_p = topk_mask(lp[None], k)[0]
            s_q = topk_mask(lq[None], k)[0]
            overlap = s_p & s_q
            p, q = lp.exp(), lq.exp()
            shared = token_metrics(s_p[None], s_q[None], lp[None], lq[None], k)
            values = {
                "tokens": 1.0,
                **{name: shared[name].item() for name in SHARED_METRICS},
                # mass of the symmetric difference: the student's on its own-only tokens, the
                # teacher's on its own-only tokens
                "student_mass_only_student_set": p[s_p & ~s_q].sum().item(),
                "teacher_mass_only_teacher_set": q[s_q & ~s_p].sum().item(),
            }
            for kind in ("all", position_kind(j)):
                bucket = sums.setdefault(kind, {})
                for name, value in values.items():
                    bucket[name] = bucket.get(name, 0.0) + value
            if j == VALUE_INDEX and entity not in known:
                truth = facts.values[entity]
                digit_ids = [tokenizer.convert_tokens_to_ids(str(v)) for v in range(spec.n_values)]
                student_digits = p[digit_ids]
                value_rows.append(
                    {
                        "student_p_true": student_digits[truth].item(),
                        "student_p_max": student_digits.max().item(),
                        "teacher_p_true": q[digit_ids[truth]].item(),
                        "student_argmax_in_teacher_topk": bool(s_q[p.argmax()].item()),
                        "student_argmax_in_overlap": bool(overlap[p.argmax()].item()),
                    }
                )
            if token == tokenizer.eos_token_id:
                break
    means = {
        kind: {
            "tokens": int(bucket["tokens"]),
            **{n: round(v / bucket["tokens"], 4) for n, v in bucket.items() if n != "tokens"},
        }
        for kind, bucket in sums.items()
    }
    value_means = {
        name: round(sum(float(r[name]) for r in value_rows) / max(1, len(value_rows)), 4)
        for name in (value_rows[0] if value_rows else {})
    }
    return {
        "world": world,
        "key": spec.key(),
        "prompts": prompts,
        "rollouts": rollouts,
        "k": k,
        "seed": seed,
        "by_position": means,
        "unknown_entity_value_position": {"rows": len(value_rows), **value_means},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="default")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = measure(args.world, args.prompts, args.rollouts, args.k, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
