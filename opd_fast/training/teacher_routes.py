"""Several teachers in one run: which teacher scores which prompt.

A run with `teachers` (name -> teacher) sends each prompt to the teacher its data row names
(the `teacher_column` field), or to `default_teacher` when the row names none. A step may mix
teachers: scoring splits the step's rollouts by teacher, each micro-batch holds one teacher's
sequences, and the loss is still normalised over the whole step. A run with one `teacher` has
no routes: everything goes to it and nothing is logged per teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_fast.training.data import Example


@dataclass(frozen=True)
class TeacherRoutes:
    names: tuple[str, ...]  # in the config's order (the order metrics and micro-batches take)
    default: str | None  # for rows that name no teacher

    @classmethod
    def from_config(cls, config) -> TeacherRoutes | None:
        """None for a single-teacher run."""
        if not config.teachers:
            return None
        names = tuple(config.teachers)
        default = config.default_teacher or (names[0] if len(names) == 1 else None)
        return cls(names, default)

    def name_of(self, example: Example) -> str:
        return example.teacher if example.teacher is not None else self.default

    def check(self, examples: list[Example], column: str, what: str) -> None:
        """ValueError naming the first row whose teacher is not one of the run's (or that
        names none, with no default_teacher), before any model loads."""
        for example in examples:
            if example.teacher is None and self.default is None:
                raise ValueError(
                    f"{example.source}: the row names no teacher ('{column}') and the config "
                    f"sets no default_teacher ({what}; teachers: {', '.join(self.names)})"
                )
            if example.teacher is not None and example.teacher not in self.names:
                raise ValueError(
                    f"{example.source}: unknown teacher {example.teacher!r} in '{column}' "
                    f"({what}); the config's teachers: {', '.join(self.names)}"
                )

    def groups(self, examples: list[Example]) -> dict[str, list[int]]:
        """Sequence indices by teacher name, every name present (maybe with none)."""
        found: dict[str, list[int]] = {name: [] for name in self.names}
        for index, example in enumerate(examples):
            found[self.name_of(example)].append(index)
        return found

    def split(self, examples: list[Example]) -> dict[str, list[Example]]:
        """The examples by teacher name, in order, every name present (maybe with none)."""
        return {
            name: [examples[index] for index in indices]
            for name, indices in self.groups(examples).items()
        }
