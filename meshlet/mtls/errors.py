"""The mTLS error users see, in a module of its own: the CLI catches it without loading
cryptography (a `--workers 1` sidecar without `--identity` never needs it)."""


class IdentityError(Exception):
    """A CA or identity dir that cannot be used; the message names the file and what is wrong."""
