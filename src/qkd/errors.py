"""The exceptions a user sees: the CLI prints each as one line and exits non-zero."""


class QKDError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""


class ConfigError(QKDError):
    """A config or override that is not valid. Every rank of a torchrun job reads the same command line and
    fails alike, so rank 0 alone says it."""

    reported_by_rank_0 = True


class Diverged(QKDError):
    """Training diverged (a non-finite loss, or one far above its running level); the CLI exits with 3.

    The run folder keeps the last good checkpoint; the message says how to continue from it."""

    exit_code = 3


class Stopped(KeyboardInterrupt):
    """A run stopped on request (Ctrl-C or SIGTERM) after saving its state at a step boundary.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it; ``exit_code`` is the shell's
    convention for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
