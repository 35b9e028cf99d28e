"""The one base class of the errors a user can fix: bad input, options, files or storage.

Every layer raises subclasses of `UserError` (ImageError, ArtifactError, QueryError,
StorageError, ...) with a message that says what is wrong and what to do. The command line
prints them as one line; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """An input, option, file or store that delf-index cannot use as it is. A ValueError, so
    that callers who catch bad values catch these too."""


class SchemaError(UserError):
    """A table, artifact or model file that is not what this version of delf-index reads."""
