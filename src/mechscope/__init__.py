"""mechscope: mechanistic interpretability of transformer language models.

import mechscope as ms
model = ms.load_model("smollm2-135m")
logits, cache = model.run_with_cache("The Eiffel Tower is in the city of")
"""

from mechscope.models import (
    ActivationCache,
    HookedModel,
    HookPoint,
    MechscopeError,
    ModelFacts,
    edits,
    fold_norms,
    load_model,
)

__all__ = [
    "ActivationCache",
    "HookPoint",
    "HookedModel",
    "MechscopeError",
    "ModelFacts",
    "edits",
    "fold_norms",
    "load_model",
]
__version__ = "0.1.0"
