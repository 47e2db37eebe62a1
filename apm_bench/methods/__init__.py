"""Built-in methods register themselves on import; third-party ones come through entry points."""

from apm_bench.methods import cbpo, popi, rag, rag_advanced, routing, simple, soft_prompt  # noqa: F401  (registration side effects)
from apm_bench.methods.base import (
    METHODS,
    FitContext,
    FitUser,
    Personalization,
    Personalizer,
    UserView,
    register_method,
)

__all__ = ["METHODS", "FitContext", "FitUser", "Personalization", "Personalizer", "UserView", "register_method"]
