"""The error a person fixes in their input, not in the code.

`python -m omnismola.main` prints an InputError's message as `error: ...`
and exits with status 1, without a traceback: the message alone must say
what is wrong and where (file, line, field, the valid choices).
"""


class InputError(ValueError):
  """Bad input: a data file, an image, a prompt file or a config value."""
