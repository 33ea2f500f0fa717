"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a traceback and
exits with EXIT_INPUT, or EXIT_CHECKED_ONLY for a DeviceError (everything was checked, but this machine has no GPU
to run the stage on): a `&&` chain or a CI job never carries on as if the work was done."""

EXIT_INPUT = 2
EXIT_CHECKED_ONLY = 3


class GptOssNemoError(ValueError):
    """Bad input caught before any GPU time is spent."""


class ConfigError(GptOssNemoError):
    """A model or recipe configuration that cannot work."""


class CheckpointError(GptOssNemoError):
    """A checkpoint that is missing, incomplete or not in the expected layout."""


class DataError(GptOssNemoError):
    """A dataset line or file that cannot be used for training."""


class DeviceError(GptOssNemoError):
    """A stage that needs CUDA GPUs started where none is visible (raised after the CPU checks passed)."""
