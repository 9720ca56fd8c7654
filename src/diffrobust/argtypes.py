"""argparse types shared by the command line (`cli`) and the bench commands (`bench/`): each converts one argument
or raises argparse.ArgumentTypeError with what it allows (argparse then exits with status 2 on one line)."""

import argparse
from pathlib import Path


def existing_file(text):
    """An argparse type: a path that names a file."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no file {text}" + (" (it is a folder)" if Path(text).is_dir() else ""))
    return text


def positive_int(text):
    """An argparse type: an integer of at least 1 (a batch size, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give one of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give an integer of at least 1")
    return value


def positive_int_list(text):
    """An argparse type: comma-separated integers of at least 1 ("10,125,1000")."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error} (comma-separated, as 10,125,1000)") from None


def choice_list(choices):
    """An argparse type: comma-separated names, each one of `choices` ("mini,cifar10")."""

    def convert(text):
        names = text.split(",")
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))} not among {', '.join(choices)} "
                                             "(comma-separated)")
        return names

    convert.__name__ = "list"
    return convert
