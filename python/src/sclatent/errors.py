"""The exception types a command reports in one line: problems with the user's input, a training run gone
non-finite. No torch here (every command imports this).
"""


class InputError(ValueError):
    """A problem with the user's input (file, samplesheet, parameter): reported as one line, exit status 2."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; the last good checkpoint is left untouched."""

    def __init__(self, step: int, what: str, value: float) -> None:
        self.step = step
        self.value = value
        super().__init__(
            f"non-finite {what} {value!r} at step {step}; training stopped, the last checkpoint on disk is "
            "from before this step"
        )
