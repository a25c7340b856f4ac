"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """A problem the user can fix (bad input, bad config, missing artifact)."""


class ConfigError(PipelineError):
    """The config has an unknown key, a wrong type or an out-of-range value."""


class DataError(PipelineError):
    """The competition folder or an artifact is missing, malformed or inconsistent."""
