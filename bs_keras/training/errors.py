"""The error a training run reports to the user."""


class RunError(Exception):
    """A problem with the run that the user must fix; printed without a traceback."""
