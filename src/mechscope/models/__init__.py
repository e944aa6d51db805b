"""Loading models and reading, replacing and back-propagating through what they compute.

Dimension glossary (the only names used for axes in mechscope: jaxtyping strings, einops
patterns, docstrings):

=============  =====================================================================
``batch``      independent sequences
``pos``        token positions (``q_pos``/``k_pos`` for query and key positions)
``d_model``    residual stream width
``n_layers``   decoder blocks
``n_heads``    query heads; ``n_kv_heads`` key/value heads (fewer under GQA)
``d_head``     one head's width
``d_mlp``      MLP hidden width (neurons)
``d_vocab``    vocabulary size
``n_ctx``      longest accepted context
``component``  a stacked residual-stream term (decompositions, logit lens)
=============  =====================================================================
"""

from mechscope.models.cache import ActivationCache
from mechscope.models.errors import (
    ContextTooLongError,
    HookReturnError,
    MechscopeError,
    ModelNotAvailableError,
    TokenizationError,
    UnknownHookError,
    UnsupportedArchitectureError,
)
from mechscope.models.facts import ModelFacts
from mechscope.models.hook_points import HookPoint
from mechscope.models.hooked import GradRun, HookedModel
from mechscope.models.load import load_model
from mechscope.models.sources import DEFAULT_MODEL, SOURCES
from mechscope.models.weights import fold_norms

__all__ = [
    "DEFAULT_MODEL",
    "SOURCES",
    "ActivationCache",
    "ContextTooLongError",
    "GradRun",
    "HookPoint",
    "HookReturnError",
    "HookedModel",
    "MechscopeError",
    "ModelFacts",
    "ModelNotAvailableError",
    "TokenizationError",
    "UnknownHookError",
    "UnsupportedArchitectureError",
    "fold_norms",
    "load_model",
]
