"""Driving the edge's chat page in a real headless browser, for tests and demos.

What this module owns: `chat_in_browser` (open the chat page served by `serving/http_api.py`,
type a prompt, send it, wait for the streamed reply, read the answer and the live figures the
page shows, take a screenshot) and `chromium_path` (where the browser is). It uses the
`playwright` Python package with Debian's chromium (`tests/install_chromium.sh` installs it),
never `playwright install`: that downloads a browser build from outside the package registries.
Both are imported lazily, so importing this module needs neither.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

# Debian's chromium first; the others are what other distributions call it.
_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
_NAMES = ("chromium", "chromium-browser")

# Headless in a container: no sandbox (needs user namespaces), no GPU, and nothing that would
# reach the network on its own (the machines' network is closed, and a test must not wait on it).
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync")

# The ids of the figures the page shows (specedge_jax/serving/static/chat.html).
STAT_IDS = ("tokens-per-s", "accepted-per-round", "itl-ms", "ttft-ms", "tokens", "rounds")


def chromium_path() -> str | None:
  """The chromium executable, or None when none is installed."""
  for path in _CANDIDATES:
    if os.path.isfile(path) and os.access(path, os.X_OK):
      return path
  for name in _NAMES:
    found = shutil.which(name)
    if found:
      return found
  return None


def chat_in_browser(url: str, prompt: str, screenshot_path: str | None = None,
                    timeout_s: float = 120, *, api_key: str | None = None) -> dict[str, Any]:
  """Sends `prompt` from the chat page at `url` in headless chromium and waits for the reply.

  Returns {'answer': the assistant's text, 'stats': {stat id: the text shown}, 'state': 'done',
  'finish_reason', 'screenshot': the path or None, 'console_errors': [...]}. Raises RuntimeError
  when the page reports an error (with its message) and playwright's TimeoutError when no reply
  ends within `timeout_s`. `api_key` is typed into the page's key field first.
  """
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  executable = chromium_path()
  if executable is None:
    raise RuntimeError("no chromium found; run tests/install_chromium.sh")
  timeout_ms = timeout_s * 1000
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=executable, headless=True,
                                args=list(CHROMIUM_ARGS), timeout=timeout_ms)
    try:
      page = browser.new_page(viewport={"width": 1000, "height": 700})
      page.set_default_timeout(timeout_ms)
      console_errors: list[str] = []
      page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
      page.on("pageerror", lambda e: console_errors.append(str(e)))
      page.goto(url, wait_until="load")
      if api_key is not None:
        page.fill("#api-key", api_key)
        page.dispatch_event("#api-key", "change")
      page.fill("#prompt", prompt)
      page.click("#send")
      page.wait_for_selector('body[data-state="done"], body[data-state="error"]',
                             state="attached")
      state = page.get_attribute("body", "data-state")
      if screenshot_path is not None:
        page.screenshot(path=screenshot_path, full_page=True)
      if state != "done":
        error = page.text_content("#error") if page.query_selector("#error") else ""
        raise RuntimeError(f"the chat page reported an error: {error!r}; "
                           f"console: {console_errors}")
      answer = page.text_content("#answer") or ""
      stats = {name: (page.text_content(f"#{name}") or "").strip() for name in STAT_IDS}
      return {"answer": answer, "stats": stats, "state": state,
              "finish_reason": page.get_attribute("#answer", "data-finish-reason"),
              "screenshot": screenshot_path, "console_errors": console_errors}
    finally:
      browser.close()
