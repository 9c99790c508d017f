"""The one error data preparation raises for bad settings or (with --strict) bad input: the CLI prints it, exit 2."""


class PrepareError(ValueError):
    """A clear, user-facing failure: what went wrong and where (file and line when it is about the input)."""
