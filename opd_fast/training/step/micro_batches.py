"""How scoring splits a step's rollouts into micro-batches (gradient accumulation).

- by sequences (the default): micro_batch_size sequences at a time, in order, each batch
  right-padded to its longest sequence;
- by tokens (`micro_batch_tokens`): sequences sorted by length, a micro-batch filled while its
  padded size (sequences x longest) stays within the budget, so that lengths that vary 10-100x
  do not pad short responses to the longest;
- packed (`pack_sequences`): a micro-batch is one row holding as many sequences as fit in the
  budget (first fit, longest first), each with its own position ids and attending only to
  itself (opd_fast.models.batch.packed_attention): no padding but at the end of the row.

A sequence longer than the budget is a micro-batch of its own. With several teachers, each
teacher's sequences are split on their own, one teacher after another, so that every
micro-batch has one teacher. The loss is normalised over
the whole step, so the split changes nothing but rounding. On several ranks every rank must
run as many forwards (FSDP's collectives): ranks with fewer micro-batches add empty ones.
"""

from __future__ import annotations

from collections.abc import Iterator

from opd_fast.training.rollouts.batch import RolloutBatch


def plan(
    lengths: list[int], micro_batch_size: int, micro_batch_tokens: int = 0, pack: bool = False
) -> list[list[list[int]]]:
    """Micro-batches as lists of rows, each row a list of sequence indices (one per row unless
    packed)."""
    count = len(lengths)
    if not micro_batch_tokens:
        return [
            [[index] for index in range(start, min(start + micro_batch_size, count))]
            for start in range(0, count, micro_batch_size)
        ]
    order = sorted(range(count), key=lambda index: (-lengths[index], index))
    if pack:  # first fit, longest first: one packed row per micro-batch
        rows: list[list[int]] = []
        filled: list[int] = []
        for index in order:
            for row, used in enumerate(filled):
                if used + lengths[index] <= micro_batch_tokens:
                    rows[row].append(index)
                    filled[row] += lengths[index]
                    break
            else:
                rows.append([index])
                filled.append(lengths[index])
        return [[row] for row in rows]
    batches: list[list[list[int]]] = []
    for index in order:  # longest first: a batch's first sequence sets its padded length
        current = batches[-1] if batches else None
        if (
            current is not None
            and (len(current) + 1) * lengths[current[0][0]] <= micro_batch_tokens
        ):
            current.append([index])
        else:
            batches.append([[index]])
    return batches


def routed_micro_batches(
    batch: RolloutBatch, config, dist, groups: dict[str, list[int]] | None = None
) -> Iterator[tuple[str | None, RolloutBatch]]:
    """(teacher name, micro-batch) pairs: with `groups` (sequence indices by teacher, every
    teacher named on every rank, in one order), each teacher's sequences split on their own
    and padded with empty micro-batches to the most any rank has for that teacher (a sharded
    teacher's forwards are collectives too); without, (None, micro-batch) as micro_batches
    gives them."""
    if groups is None:
        for micro in micro_batches(batch, config, dist):
            yield None, micro
        return
    planned = {
        name: [] if not indices else _plan_rows(batch.take(indices), config)
        for name, indices in groups.items()
    }
    # Counted before any forward: a rank must not reach this collective while another is
    # inside a forward's (FSDP's all-gathers would meet it).
    most = dist.max({name: len(parts) for name, parts in planned.items()})
    for name, parts in planned.items():
        yield from ((name, part) for part in parts)
        for _ in range(int(most[name]) - len(parts)):
            yield name, batch.take([0]).without_responses()


def _plan_rows(batch: RolloutBatch, config) -> list[RolloutBatch]:
    """This rank's micro-batches of `batch`, not padded over ranks."""
    if not config.micro_batch_tokens:
        sequences = batch.input_ids.shape[0]
        return [
            batch.select(start, min(start + config.micro_batch_size, sequences))
            for start in range(0, sequences, config.micro_batch_size)
        ]
    planned = plan(
        batch.lengths, config.micro_batch_size, config.micro_batch_tokens, config.pack_sequences
    )
    if config.pack_sequences:
        return [batch.packed(rows) for rows in planned]
    return [batch.take([row[0] for row in rows]) for rows in planned]


def micro_batches(batch: RolloutBatch, config, dist) -> Iterator[RolloutBatch]:
    """The step's micro-batches of `batch` (this rank's rollouts) as the config splits them,
    as many on every rank."""
    planned = _plan_rows(batch, config)
    if not config.micro_batch_tokens:  # the same count everywhere: every rank has as many
        yield from planned
        return
    # Counted before any forward: a rank must not reach this collective while another is
    # inside a forward's (FSDP's all-gathers would meet it).
    (most,) = dist.max({"micro_batches": len(planned)}).values()
    yield from planned
    for _ in range(int(most) - len(planned)):
        yield batch.take([0]).without_responses()
