"""The one exception type for problems with the user's input."""


class InputError(ValueError):
    """A problem with the user's input (file, samplesheet, parameter): reported as one line, exit status 2."""
