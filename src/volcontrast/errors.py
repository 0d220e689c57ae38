"""The one error type for bad user input.

Every problem with a user's files or arguments is raised as :class:`InputError`; the CLI prints it as a
single line ``error: <file>: <problem>`` and exits with code 2. Anything else is an internal error (exit 1).
"""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad input: names the file (or argument) and the problem in one line."""

    def __init__(self, where: str | os.PathLike | None, problem: str):
        self.where = None if where is None else str(where)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.line())

    def __reduce__(self):  # keep (where, problem) across process boundaries
        return (type(self), (self.where, self.problem))

    def line(self) -> str:
        return f"{self.where}: {self.problem}" if self.where else self.problem
