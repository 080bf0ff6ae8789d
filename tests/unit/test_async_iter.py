"""Blocking iterators driven from async code (:mod:`nest_core.async_iter`): the server's
answers decode in one call on its own pool, and stop when their client is gone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

import pytest

from nest_core.async_iter import aiter_on


class Counting:
    """A generator's life, seen from outside: what it yielded, on which threads, closed?"""

    def __init__(self, fail_at: int | None = None) -> None:
        self.made, self.threads, self.closed_on = 0, set(), None
        self.fail_at = fail_at

    def items(self, n: int = 1000) -> Iterator[int]:
        try:
            for i in range(n):
                self.threads.add(threading.current_thread().name)
                if i == self.fail_at:
                    raise ValueError("the model broke")
                time.sleep(0.002)  # a decoding step
                self.made += 1
                yield i
        finally:
            self.closed_on = threading.current_thread().name


def test_items_arrive_in_order_from_one_thread_of_the_pool() -> None:
    # caught: a hop per item (the items would come from several threads, or the loop's)
    seen = Counting()

    async def consume() -> list[int]:
        with ThreadPoolExecutor(2, thread_name_prefix="answer") as pool:
            return [i async for i in aiter_on(pool, seen.items(20))]

    assert asyncio.run(consume()) == list(range(20))
    assert [name.startswith("answer") for name in seen.threads] == [True]
    assert str(seen.closed_on).startswith("answer")


def test_a_consumer_that_stops_stops_the_iterator_after_its_current_item() -> None:
    # the client left: the decoder must not go on to max_tokens; caught: the stop flag not
    # checked, the iterator not closed
    seen = Counting()
    items = seen.items()  # held here: only an explicit close ends it (as a decoder's stream)

    async def consume() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="answer") as pool:
            async with aclosing(aiter_on(pool, items)) as stream:
                async for i in stream:
                    if i == 2:
                        break
            await asyncio.sleep(0.1)  # 50 more steps if it went on

    asyncio.run(consume())
    assert 3 <= seen.made <= 5
    assert str(seen.closed_on).startswith("answer")


def test_a_cancelled_consumer_stops_the_iterator() -> None:
    # the route itself cancelled (server shutting down): the same
    seen = Counting()

    async def consume() -> None:
        with ThreadPoolExecutor(1) as pool:
            async def read() -> None:
                async with aclosing(aiter_on(pool, seen.items())) as stream:
                    async for _ in stream:
                        pass

            task = asyncio.ensure_future(read())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            made = seen.made
            await asyncio.sleep(0.1)
            assert seen.made <= made + 1

    asyncio.run(consume())
    assert seen.closed_on is not None


def test_a_failure_in_the_iterator_is_raised_in_the_consumer() -> None:
    seen = Counting(fail_at=3)

    got: list[int] = []

    async def consume() -> None:
        with ThreadPoolExecutor(1) as pool:
            async for i in aiter_on(pool, seen.items()):
                got.append(i)

    with pytest.raises(ValueError, match="the model broke"):
        asyncio.run(consume())
    assert got == [0, 1, 2]
    assert seen.closed_on is not None
