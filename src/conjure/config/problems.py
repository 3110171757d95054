"""What is wrong with a config, as data: `Problem(field, message)` per problem, `ConfigError` carrying the list
(its text is a rendering of it, for the CLI), and `FieldProblem`, which a validator raises to name the field a
rule spanning several fields is about (pydantic would place it at the section that holds the validator)."""

from __future__ import annotations

from dataclasses import dataclass

from conjure.errors import ConjureError


@dataclass(frozen=True)
class Problem:
    """One problem: `field` is the dotted setting it is about ("" for the file or the config as a whole)."""

    field: str
    message: str

    def line(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ConfigError(ConjureError):
    """A config that cannot be used. `problems` lists each problem; the message renders them one per line,
    under `heading` when given."""

    def __init__(self, problems: str | list[Problem], *, heading: str = "") -> None:
        self.problems = [Problem("", problems)] if isinstance(problems, str) else list(problems)
        lines = [problem.line() for problem in self.problems]
        super().__init__(f"{heading}:\n  " + "\n  ".join(lines) if heading else "\n".join(lines))


class FieldProblem(ValueError):
    """Raised by a validator: `field` (dotted, from the top of the config) is what the user must change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
