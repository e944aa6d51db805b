"""mechscope's exceptions. Each message says what was wrong and what to do; docs/errors.md has one entry per class."""


class MechscopeError(Exception):
    """Base class of every error mechscope raises on purpose."""


class UnknownHookError(MechscopeError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class HookReturnError(MechscopeError, ValueError):
    """A hook function returned a tensor of the wrong shape or dtype."""


class UnsupportedArchitectureError(MechscopeError, ValueError):
    """The HF model's architecture has no adapter."""


class ModelNotAvailableError(MechscopeError, RuntimeError):
    """A model alias whose package is not installed, or a hub id while offline."""


class ContextTooLongError(MechscopeError, ValueError):
    """More tokens than the model's context window."""


class TokenizationError(MechscopeError, ValueError):
    """A string that is not the single token it was asked to be."""
