"""The few exception types users see; each message says what to do."""


class VaecliError(Exception):
    """Base of every error vaecli raises on purpose (bad input, bad files); the CLI prints it in one line."""


class ConfigError(VaecliError):
    """A model configuration that cannot describe a valid AutoencoderKL."""


class WeightsError(VaecliError):
    """A weights file that cannot be read, or whose keys or shapes do not match the model."""


class InputError(VaecliError, ValueError):
    """An image, tensor or latent file that cannot be used (a ValueError, for library callers)."""


class NonFiniteError(VaecliError):
    """The model produced NaN or Inf at every precision tried."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: a KeyboardInterrupt that carries the items finished so far (`results`)."""

    def __init__(self, results: list) -> None:
        super().__init__("interrupted")
        self.results = results
