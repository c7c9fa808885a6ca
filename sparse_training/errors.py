"""Errors a user can cause or act on. The CLI maps `exit_code` to the process exit status
and prints `str(error)` as one line; anything else is a bug and gets a traceback with --debug."""


class SparseTrainingError(Exception):
    exit_code = 1


class UserError(SparseTrainingError):
    """Bad input: a wrong name, path, option or file. Exit code 2."""

    exit_code = 2


class IncompleteRunError(SparseTrainingError):
    """The run directory has no DONE marker. Exit code 3."""

    exit_code = 3


class TrainingDiverged(SparseTrainingError):
    """A non-finite loss. Exit code 1."""

    exit_code = 1


class DistributedMismatch(SparseTrainingError):
    """Ranks that must agree bitwise do not. Exit code 1."""


class FailedOnMain(SparseTrainingError):
    """What the other ranks raise when rank 0 failed at a step they wait on (rank 0 raises,
    and reports, its own error); it carries the message and exit code across processes."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def of(cls, error: BaseException) -> "FailedOnMain":
        return cls(f"{error}" if isinstance(error, SparseTrainingError) else f"{type(error).__name__}: {error}",
                   getattr(error, "exit_code", 1))

    def __reduce__(self):  # pickled by broadcast_object_list
        return FailedOnMain, (str(self), self.exit_code)
