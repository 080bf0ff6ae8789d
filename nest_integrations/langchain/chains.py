"""``create_nest_chain``: retrieval + Nest in the ``create_retrieval_chain`` shape.

The output is ``{"input", "context": [Document], "answer"}`` like LangChain's stock retrieval
chain, so code written for it keeps working; ``answer`` is the model's ``AIMessage`` (for
``ChatNest``, with citations) or string (for ``NestLLM``). The retrieved documents are handed
to the model per call (``documents=``): Nest copies spans from them instead of reading them in
the prompt. Streaming yields the context first, then answer chunks.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from langchain_core.language_models import BaseLanguageModel
from langchain_core.prompts import BasePromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import VectorStore


def create_nest_chain(retriever: BaseRetriever | VectorStore | Runnable[str, Any],
                      model: BaseLanguageModel[Any],
                      prompt: BasePromptTemplate | None = None) -> Runnable[dict[str, Any],
                                                                            dict[str, Any]]:
    """A Runnable ``{"input": question} -> {"input", "context", "answer"}``.

    ``retriever`` is any retriever (or a vector store, searched with its default retriever);
    ``model`` is a :class:`ChatNest` or :class:`NestLLM`; ``prompt`` optionally formats the
    question (it receives the chain input, e.g. ``{input}``), else the question is sent as is.
    """
    if isinstance(retriever, VectorStore):
        retriever = retriever.as_retriever()
    if not isinstance(retriever, Runnable):
        msg = f"retriever must be a BaseRetriever or VectorStore, got {type(retriever).__name__}"
        raise TypeError(msg)
    if not isinstance(model, BaseLanguageModel) or not hasattr(model, "resolved_config"):
        msg = f"model must be a ChatNest or NestLLM, got {type(model).__name__}"
        raise TypeError(msg)
    question: Runnable[Any, Any] = prompt if prompt is not None else RunnableLambda(
        itemgetter("input"))

    def answer_with_context(inputs: dict[str, Any]) -> Runnable[Any, Any]:
        # Returning a Runnable makes RunnableLambda run (and stream) it on the same input.
        return question | model.bind(documents=list(inputs["context"]))

    retrieve = (RunnableLambda(itemgetter("input")) | retriever).with_config(
        run_name="retrieve_documents")
    return (
        RunnablePassthrough.assign(context=retrieve)
        .assign(answer=RunnableLambda(answer_with_context).with_config(run_name="nest_answer"))
        .with_config(run_name="nest_chain")
    )
