"""Exceptions that the CLI turns into one clear line on stderr."""


class OcnnaError(Exception):
    """A user-facing error: bad input, an invalid plan, a model that failed validation."""


class InputError(OcnnaError):
    """The user gave a file, option or data set the tool cannot use."""


class PlanError(OcnnaError):
    """A pruning plan does not fit the model it is applied to."""


class ValidationError(OcnnaError):
    """A rewritten model failed a check; nothing was written."""
