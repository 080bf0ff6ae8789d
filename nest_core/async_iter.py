"""Blocking iterators (the decoder's stream) driven from async code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

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


def close(iterator: Iterator[object]) -> None:
    """Close a generator, which runs its cleanup (the decoder releases its caches); another
    iterator has nothing to close."""
    closing = getattr(iterator, "close", None)
    if closing is not None:
        closing()


async def close_in_thread(iterator: Iterator[object]) -> None:
    """:func:`close` off the event loop; a generator still mid-step in another thread is left
    to the garbage collector."""
    try:
        await asyncio.to_thread(close, iterator)
    except ValueError:  # cancelled mid-step: the generator is still running; GC ends it
        logger.debug("decoder stream abandoned while a step was running")


async def aiter_on(pool: Executor, iterator: Iterator[_T]) -> AsyncGenerator[_T, None]:
    """Drive a blocking iterator from async code in ONE call on ``pool``: a thread of it runs
    the iterator to its end and hands each item to the event loop, instead of a hop to a
    thread per item (a turn of the loop per decoding step, and the loop's default pool,
    shared with everything else, caps how many run at once). When the consumer stops early
    the thread stops after the item it is computing and closes the iterator itself."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def hand(item: Any, err: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
            loop.call_soon_threadsafe(items.put_nowait, (item, err))

    def run() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    break
                hand(item)
            else:
                hand(_DONE)
        except Exception as err:  # raised in the consumer
            hand(_DONE, err)
        finally:
            close(iterator)

    loop.run_in_executor(pool, run)
    try:
        while True:
            item, err = await items.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
