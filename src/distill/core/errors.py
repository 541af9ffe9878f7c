"""One exception type for problems the user can fix (config, data, model mismatch).

The CLI prints these as a single line and exits non-zero; anything else is a bug.
"""


class DistillError(Exception):
    """A problem with the user's input, with a message that names the culprit and the fix.

    The message is kept to one line (messages quoted from other libraries may hold newlines).
    """

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))
