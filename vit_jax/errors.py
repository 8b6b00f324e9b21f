"""The base of every error a user can fix: a bad config, missing data, another run's workdir,
an unreadable checkpoint, a non-finite loss.

main.py prints these as one line and exits with status 1 instead of a traceback. Each
module's error derives from `UserError` and from the built-in type it refines, so callers
can catch either. Kept free of imports so that main.py can catch all of them without
loading every module (bench mode needs neither TFDS nor TensorFlow).
"""


class UserError(Exception):
  """A mistake in the run's input whose message names the problem and the fix."""
