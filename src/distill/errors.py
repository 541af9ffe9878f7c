"""One exception type for problems the user can fix (config, data, model mismatch).

The CLI prints these as a single line and exits non-zero; anything else is a bug.
"""


class DistillError(Exception):
    """A problem with the user's input, with a message that names the culprit and the fix."""
