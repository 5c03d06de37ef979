"""How a result computed on an owner thread reaches the asyncio event loop.

The verifier's engine thread and the edge's device thread each own an engine that only one thread
may call. Both hand results back the same way: the future belongs to the loop, so it is resolved
on the loop (`call_soon_threadsafe`), never from the owner thread. This module owns that one
hand-off and nothing else.
"""

from __future__ import annotations

import asyncio


def resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result=None,
            error: BaseException | None = None) -> None:
  """Sets `future`'s result (or `error`) on `loop`; thread-safe, for owner threads.

  A future the loop side already cancelled is left alone, and a closed loop (the server or the
  edge is gone, nobody is listening) drops the result.
  """

  def settle() -> None:
    if future.done():
      return
    if error is not None:
      future.set_exception(error)
    else:
      future.set_result(result)

  try:
    loop.call_soon_threadsafe(settle)
  except RuntimeError:  # the loop is closed
    pass
