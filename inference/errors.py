"""The errors a user causes (a missing or unreadable file, a photo with no person, too few joints, a checkpoint
that does not fit its config), as the command line and the web app report them: one line, no traceback."""

USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, KeyError, ImportError)


def one_line(error):
    """The message of an error on one line (a KeyError's without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
