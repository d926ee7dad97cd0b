"""The errors a user's input causes, as opposed to bugs in this code.

Code that checks input (a config, an override, a file, a photo, a checkpoint, a command-line argument) raises
a `UserError` that names the input and says what was expected. The command lines and the web app report
exactly these on one line (`reported`); any other exception is a bug of ours and keeps its traceback. Each
kind is also the built-in error it refines, so `except FileNotFoundError` still catches a missing file.
"""
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Input that cannot be used: the message names it and what was expected."""


class InputError(UserError, ValueError):
    """A value, file content or setting that is wrong."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that is not there; the message says how to make it or where it comes from."""


class MissingEntryError(UserError, KeyError):
    """A key or record that a file does not hold."""


class OutputExistsError(UserError, FileExistsError):
    """An output that is already there and would be overwritten."""


class OutOfSpaceError(UserError, OSError):
    """A disk without room for what is about to be written; the message gives the bytes needed and free."""


class MissingPackageError(UserError, ImportError):
    """An optional package that is not installed, or not usable; the message says what to install."""


def one_line(error):
    """The message of an error on one line (a KeyError's without the quotes str() adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


@contextmanager
def reported(program, debug=False):
    """Run a command's body: a UserError ends it with one line, `program: error: ...`, and exit status 2 (with
    `debug`, its traceback instead). Every other exception passes through with its traceback."""
    try:
        yield
    except UserError as e:
        if debug:
            raise
        print(f"{program}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
