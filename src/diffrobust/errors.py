"""The one base class of the project's user-facing errors.

An error of this class carries a message meant for the person running the workflow: what is wrong (naming the file,
key or argument) and how to fix it. `diffrobust`'s `main` prints such messages without a traceback (`-v` shows it);
anything else is a bug and keeps its traceback.
"""


class DiffrobustError(Exception):
    """A problem the user can fix; the message names the file/key and the fix."""
