"""User-facing errors. The CLI turns each into one line on stderr and a non-zero exit.

Everything a user can get wrong (a spec, a data file, an option value) raises a subclass of
``MinicnnError`` whose message says what was wrong and what is accepted, on one line.
"""


class MinicnnError(ValueError):
    """Base class: bad input from the user, reported without a traceback."""


class SpecError(MinicnnError):
    """A network spec string that does not parse or does not fit the input shape."""


class DataError(MinicnnError):
    """A dataset that is missing, corrupt, or has the wrong shape/values."""


class ConfigError(MinicnnError):
    """A training option with a value outside what is accepted."""


class DeviceError(MinicnnError):
    """A device that is not available (e.g. --device cuda without a GPU)."""


class ArgumentTypeError(ConfigError, TypeError):
    """An argument of the wrong type (a list where an array is needed, a number where a spec
    string is): a ConfigError for the CLI and a TypeError for Python code that catches those."""
