"""Everything a personalization method needs, importable from one place.

A method from another package should import from here only; the modules these names come from
may move, this list will not. Example:

    from apm_bench.methods.plugin import Personalizer, Personalization, chat, register_method

The base class and registry (`Personalizer`, `register_method`, `FitContext`, `Personalization`,
`UserView`) are also exported by `apm_bench.methods`, and the engine interface lives in
`apm_bench.backends.base`; both stay where they are.
"""

from apm_bench.backends.base import (
    AdapterRef,
    Backend,
    Capabilities,
    Generation,
    GenerationRequest,
    Message,
    SamplingParams,
    SoftPrompt,
    chat,
)
from apm_bench.errors import ConfigError
from apm_bench.methods.base import (
    METHODS,
    FitContext,
    FitUser,
    MethodOptions,
    Personalization,
    Personalizer,
    UserView,
    register_method,
)
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.world.catalog import Principle, Side
from apm_bench.world.prompting import (
    example_block,
    history_block,
    history_context,
    style_instruction,
    summarize_messages,
    summary_context,
)

__all__ = [
    "METHODS",
    "AdapterRef",
    "Backend",
    "Capabilities",
    "ConfigError",
    "FitContext",
    "FitUser",
    "Generation",
    "GenerationRequest",
    "HistoryEmbedder",
    "Message",
    "MethodOptions",
    "Personalization",
    "Personalizer",
    "Principle",
    "SamplingParams",
    "Side",
    "SoftPrompt",
    "UserView",
    "chat",
    "example_block",
    "history_block",
    "history_context",
    "register_method",
    "style_instruction",
    "summarize_messages",
    "summary_context",
]
