"""LangChain embeddings over a registered feature-extraction variant: `EngineEmbeddings(name=...)`.

Like LangChain's `QuantizedBgeEmbeddings` (ITREX) and `QuantizedBiEncoderEmbeddings` (optimum-intel):
`embed_documents` embeds passages as they are, `embed_query` prefixes `query_instruction` (BGE's
"Represent this sentence for searching relevant passages: " for its English models), vectors are
unit length unless `normalize=False`. Needs the `langchain` extra (langchain-core).
"""
from __future__ import annotations

from typing import Any

try:
    from langchain_core.embeddings import Embeddings
    from pydantic import BaseModel, PrivateAttr
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from ..errors import RuntimeUnavailable

    raise RuntimeUnavailable("engine.integrations.langchain_embeddings needs langchain-core",
                             hint="pip install 'engine[langchain]'") from error


class EngineEmbeddings(BaseModel, Embeddings):
    """A registered feature-extraction variant as LangChain Embeddings (loaded on first use, then kept)."""

    name: str
    batch_size: int = 32
    normalize: bool = True
    query_instruction: str = ""
    document_instruction: str = ""
    registry: str | None = None
    store: str | None = None
    verify: bool = False
    load_options: dict[str, Any] = {}

    _model: Any = PrivateAttr(default=None)

    @property
    def model(self) -> Any:
        if self._model is None:
            from ..loader import load

            self._model = load(self.name, verify=self.verify, registry=self.registry, store=self.store,
                               **self.load_options)
        return self._model

    def _embed(self, texts: list[str], instruction: str) -> list[list[float]]:
        vectors = self.model.embed(list(texts), batch_size=self.batch_size, normalize=self.normalize,
                                   instruction=instruction or None)
        return vectors.tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts, self.document_instruction)

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text], self.query_instruction)[0]
