"""Text for harvesting: corpora (embedded, local files, HF datasets) and fixed-length contexts."""

from mechscope.data.contexts import (
    INDEX_FIELDS,
    Context,
    ContextConfig,
    ContextStream,
    DocumentInfo,
    Packing,
    context_stream,
)
from mechscope.data.corpus import (
    Corpus,
    CorpusError,
    Document,
    default_corpus,
    hf_corpus,
    load_corpus,
    local_corpus,
    pydoc_corpus,
    shakespeare_corpus,
)

__all__ = [
    "INDEX_FIELDS",
    "Context",
    "ContextConfig",
    "ContextStream",
    "Corpus",
    "CorpusError",
    "Document",
    "DocumentInfo",
    "Packing",
    "context_stream",
    "default_corpus",
    "hf_corpus",
    "load_corpus",
    "local_corpus",
    "pydoc_corpus",
    "shakespeare_corpus",
]
