"""Errors a user can cause: bad flags, files, configs or checkpoints."""


class UserError(ValueError):
    """A problem with the user's input. The message is one line that names the problem.

    Recipes catch it, print ``error: <message>`` on rank 0 and exit with status 2,
    before any training state is created or overwritten.
    """


def exit_on_user_error(main):
    """Decorate a command's ``main(argv) -> int``: a ``UserError`` becomes one line,
    ``error: <message>`` on stderr, and exit status 2 (the convention of every recipe)."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
