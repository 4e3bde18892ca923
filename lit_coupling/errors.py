"""The one exception type the command line shows as a message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or set-up (a file, a record, a model, a flag); the message says how to fix it.

    Data errors name the file, the record and the field. Anything else that escapes is a bug and keeps its traceback.
    """
