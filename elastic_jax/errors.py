"""The one exception type for bad user input.

Every check of a config value, file, architecture or checkpoint raises `UserError` with a message
that names what is wrong and how to fix it. The CLI turns it into one line on stderr and exit
code 2; library users catch it like any other exception.
"""


class UserError(ValueError):
  """Bad input from the user: a config value, a file, an architecture, a checkpoint."""
