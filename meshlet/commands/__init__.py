"""One module per `meshlet` sub-command; each parses and prints, the logic lives elsewhere."""


class CommandError(Exception):
    """A user-facing failure: printed as one line `meshlet: message`, exit status 1."""
