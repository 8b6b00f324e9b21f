"""Every error a user can fix, in one place: main.py prints them as one line, exit status 1.

Each kind derives from `UserError` and from the built-in type it refines, so callers can
catch either. The module imports nothing, so that the command line can catch all of them
without loading the modules that raise them (bench mode needs neither TFDS nor
TensorFlow).
"""


class UserError(Exception):
  """A mistake in the run's input whose message names the problem and the fix."""


# --- The command line ----------------------------------------------------------------------


class UsageError(UserError, ValueError):
  """A command line that lacks a flag its mode needs, or has arguments it does not take."""


# --- Config --------------------------------------------------------------------------------


class ConfigError(UserError, ValueError):
  """A config key with a value that is not allowed, or keys that clash."""


# --- Data ----------------------------------------------------------------------------------


class DataError(UserError, ValueError):
  """A data mistake: bad dataset name, split, image file, labels..."""


class MissingDataError(DataError, FileNotFoundError):
  """Data files that are not where the config says (folder, manual_dir)."""


# --- Workdirs and checkpoints ----------------------------------------------------------------


class NotAFolderError(UserError, NotADirectoryError):
  """A path that must be a folder (a workdir) is a file."""


class WorkdirMismatchError(UserError, ValueError):
  """The workdir holds a run of another model or dataset."""


class WorkdirNotSharedError(UserError, RuntimeError):
  """The processes of a multi-host run do not all see the same workdir."""


class NoRunError(UserError, FileNotFoundError):
  """The workdir holds no training run, or not yet what was asked for: train first."""


class UnreadableCheckpointError(UserError, RuntimeError):
  """No checkpoint of a workdir can be read."""


class StateMismatchError(UserError, ValueError):
  """An intact checkpoint holds another train state than the one asked for: the config
  changed a setting the state's structure depends on. Not damage: no fallback."""


class NotACheckpointError(UserError, ValueError):
  """The file or folder given as a checkpoint (config.init_from, export) is not one."""


class MissingCheckpointError(NotACheckpointError, FileNotFoundError):
  """The path does not exist, or the folder holds no checkpoint."""


class CheckpointDownloadError(UserError, ConnectionError):
  """A published checkpoint (config.init_from by name or URL) cannot be downloaded."""


class CheckpointMismatchError(UserError, ValueError):
  """The file cannot initialise the model: missing parameters or unresolvable shapes."""


# --- Training and prediction -------------------------------------------------------------------


class NonFiniteLossError(UserError, RuntimeError):
  """A NaN/Inf loss or gradient with config.on_nonfinite="stop"."""


class NoReadableImageError(UserError, ValueError):
  """None of the images given to predict/visualize could be read."""
