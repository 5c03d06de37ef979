"""The chat page (serving/static/chat.html) in headless Debian chromium, driven by playwright.

The app runs on a real uvicorn server with a fake backend that streams known tokens over several
rounds; the page must show exactly their decoded text and its live figures. The screenshot goes
to tmp_path, and also to $SPECEDGE_SCREENSHOT when that is set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading

import pytest

from specedge_jax.data import assets
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.serving import http_api
from specedge_jax.serving.drafter import EdgeRequest, RoundUpdate
from specedge_jax.testing import browser

MODEL = "specedge-embedded"
ANSWER = "Edge drafting, server verifying: tokens arrive a round at a time. Café ☃ 日本!"
ROUND_SIZES = (1, 4, 3, 5, 2, 6, 4, 3, 5)  # tokens per round (round 0 first); the rest: round 9
TREE_SIZE = 8

pytestmark = pytest.mark.slow


class ScriptedStream:
  """Plays the rounds 40 ms apart (so the page's live figures have gaps to measure)."""

  def __init__(self, updates: list[RoundUpdate]):
    self._updates = iter(updates)
    self.cancelled = False

  def __aiter__(self):
    return self

  async def __anext__(self) -> RoundUpdate:
    if self.cancelled:
      raise StopAsyncIteration
    await asyncio.sleep(0.04)
    try:
      return next(self._updates)
    except StopIteration:
      raise StopAsyncIteration from None

  async def cancel(self) -> None:
    self.cancelled = True


class ScriptedBackend:
  def __init__(self, ids: list[int], eos: int):
    tokens, self.updates, start = ids + [eos], [], 0
    for r, size in enumerate(ROUND_SIZES + (len(tokens),)):
      chunk, start = tokens[start:start + size], start + size
      last = start >= len(tokens)
      self.updates.append(RoundUpdate(tokens=tuple(chunk), round=r,
                                      accepted=0 if r == 0 else len(chunk) - 1,
                                      tree_size=0 if r == 0 else TREE_SIZE, finished=last,
                                      finish_reason="eos" if last else ""))
      if last:
        break
    self.submitted: list[EdgeRequest] = []

  def submit(self, request: EdgeRequest) -> ScriptedStream:
    self.submitted.append(request)
    return ScriptedStream(self.updates)

  def stats(self) -> dict[str, int]:
    return dict(running=0, queued=0, free_slots=1, max_running=1, max_queued=0)


def _missing() -> str | None:
  if browser.chromium_path() is None:
    return "no chromium (run tests/install_chromium.sh)"
  try:
    import playwright.sync_api  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return "the playwright package is not installed (pip install playwright)"
  return None


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_chat_page_streams_a_reply_with_live_figures(tmp_path):
  tokenizer = load_tokenizer(assets.DEFAULT_TARGET_DIR)
  ids = [int(t) for t in tokenizer(ANSWER, add_special_tokens=False)["input_ids"]]
  backend = ScriptedBackend(ids, tokenizer.eos_token_id)
  assert len(backend.updates) == len(ROUND_SIZES) + 1  # the script has the rounds it names
  app = http_api.create_app(backend, tokenizer, model_name=MODEL)

  loop = asyncio.new_event_loop()
  holder: dict = {}
  started = threading.Event()

  def run():
    asyncio.set_event_loop(loop)
    holder["server"] = loop.run_until_complete(http_api.serve(app, "127.0.0.1", 0))
    started.set()
    loop.run_forever()

  thread = threading.Thread(target=run, daemon=True, name="chat-page-server")
  thread.start()
  assert started.wait(30)
  server = holder["server"]
  screenshot = str(tmp_path / "chat_page.png")
  try:
    result = browser.chat_in_browser(f"{server.url}/", "What does the edge do?",
                                     screenshot_path=screenshot, timeout_s=90)
  finally:
    asyncio.run_coroutine_threadsafe(server.shutdown(timeout_s=5), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()

  expected = tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True)
  assert result["answer"] == expected == ANSWER
  assert result["finish_reason"] == "stop"
  assert result["console_errors"] == []
  # The page's request: the chat template applied at the edge, the user's turn in it.
  messages = [{"role": "user", "content": "What does the edge do?"}]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert backend.submitted[-1].prompt_ids == tuple(
      tokenizer(text, add_special_tokens=False)["input_ids"])
  stats = result["stats"]
  updates = backend.updates
  assert int(stats["tokens"]) == sum(len(u.tokens) for u in updates)
  assert int(stats["rounds"]) == len(updates) - 1
  accepted = sum(u.accepted for u in updates) / (len(updates) - 1)
  assert float(stats["accepted-per-round"]) == pytest.approx(accepted, abs=0.01)
  assert float(stats["tokens-per-s"]) > 0
  # Ten rounds 40 ms apart, 40-odd tokens: a mean gap of several ms between tokens.
  assert 1.0 < float(stats["itl-ms"]) < 1000.0
  assert os.path.getsize(screenshot) > 1000
  target = os.environ.get("SPECEDGE_SCREENSHOT")
  if target:
    shutil.copyfile(screenshot, target)
