"""Errors a user can cause: bad flags, files, configs or checkpoints."""


class UserError(ValueError):
    """A problem with the user's input. The message is one line that names the problem.

    Recipes catch it, print ``error: <message>`` on rank 0 and exit with status 2,
    before any training state is created or overwritten.
    """
