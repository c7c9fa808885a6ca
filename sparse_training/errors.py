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
