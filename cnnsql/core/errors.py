"""One exception type for every user-facing failure: the problem and the fix, in one line."""


class CnnsqlError(Exception):
    """An error the user can act on. `hint` says what to do about it."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.problem} ({self.hint})" if self.hint else self.problem


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what a one-line error quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
