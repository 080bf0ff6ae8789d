"""Blocking iterators (the decoder's stream) driven from async code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_DONE = object()


async def aiter_in_thread(make: Callable[[], Iterator[_T]]) -> AsyncGenerator[_T, None]:
    """Drive a blocking iterator from async code, one ``next`` per worker-thread hop, so the
    event loop stays free while the LM runs (``make`` itself may load the model). The
    iterator is closed when the consumer stops early."""
    iterator = await asyncio.to_thread(make)
    try:
        while True:
            item = await asyncio.to_thread(next, iterator, _DONE)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        await close_in_thread(iterator)


async def close_in_thread(iterator: Iterator[object]) -> None:
    """Close a generator (which runs its cleanup: the decoder releases its caches) off the
    event loop; one still mid-step in another thread is left to the garbage collector."""
    close = getattr(iterator, "close", None)
    if close is not None:
        try:
            await asyncio.to_thread(close)
        except ValueError:  # cancelled mid-step: the generator is still running; GC ends it
            logger.debug("decoder stream abandoned while a step was running")
