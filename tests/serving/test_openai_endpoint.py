"""The edge's OpenAI-compatible API end to end, driven by the official `openai` client: the real
verifier and the real edge drafter with the embedded target/draft pair (`LiveStack`).

* Greedy completions and chat completions equal target-only greedy decoding of the same prompt,
  streaming and not, and the streamed chunks (one per verification round) concatenate to the
  non-streamed text.
* Four concurrent streaming clients all complete exactly; a fifth beyond K=2 running and a queue
  of 2 gets 429.
* A client that disconnects mid-stream frees its session on the verifier.
* Bad requests get OpenAI-shaped errors.
* /metrics parses with prometheus_client's parser and its counters agree with the edge's JSONL
  events.
"""

from __future__ import annotations

import concurrent.futures
import os
import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specedge_jax.measure import events as events_lib
from specedge_jax.testing.live_stack import LiveStack, embedded_config, reference_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
COMPLETION_PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
  # K=2 interleaved requests on the edge and a queue of 2: four fit, the fifth is refused.
  config = embedded_config(requests_per_drafter=2, max_queued_requests=2)
  folder = tmp_path_factory.mktemp("events")
  with LiveStack(config, events_path=str(folder / "edge.jsonl"),
                 verifier_events_path=str(folder / "verifier.jsonl")) as live:
    yield live


@pytest.fixture(scope="module")
def references(stack):
  """Target-only greedy text of the completion prompt and of the chat."""
  tokenizer = stack.tokenizer
  completion_ids = tokenizer(COMPLETION_PROMPT)["input_ids"]
  chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
  out = reference_greedy(stack.config, [completion_ids, chat_ids], MAX_TOKENS)
  return {name: tokenizer.decode(tokens, skip_special_tokens=True)
          for name, tokens in zip(("completion", "chat"), out)}


@pytest.fixture(scope="module")
def model_name(stack):
  return openai.OpenAI(base_url=stack.base_url, api_key="unused").models.list().data[0].id


def get(stack, path: str) -> str:
  with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}{path}", timeout=10) as response:
    return response.read().decode()


def client(stack, **kwargs) -> openai.OpenAI:
  return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, **kwargs)


def test_greedy_completion_equals_target_only_greedy_streamed_or_not(stack, references,
                                                                     model_name):
  c = client(stack)
  full = c.completions.create(model=model_name, prompt=COMPLETION_PROMPT, max_tokens=MAX_TOKENS,
                              temperature=0)
  assert full.choices[0].text == references["completion"]
  assert full.usage.completion_tokens <= MAX_TOKENS
  acceptance = full.usage.model_extra["specedge"]
  assert acceptance["rounds"] >= 1 and acceptance["accepted_tokens"] >= 0
  chunks = list(c.completions.create(model=model_name, prompt=COMPLETION_PROMPT,
                                     max_tokens=MAX_TOKENS, temperature=0, stream=True))
  assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == \
      references["completion"]
  # One event per verification round (plus the first token's), not per token.
  rounds = {chunk.model_extra["specedge"]["round"] for chunk in chunks if chunk.choices}
  assert len(rounds) <= acceptance["rounds"] + 1 < full.usage.completion_tokens + 1


def test_greedy_chat_equals_target_only_greedy_streamed_or_not(stack, references, model_name):
  c = client(stack)
  full = c.chat.completions.create(model=model_name, messages=CHAT, max_tokens=MAX_TOKENS,
                                   temperature=0)
  assert full.choices[0].message.content == references["chat"]
  assert full.choices[0].finish_reason in ("stop", "length")
  stream = c.chat.completions.create(model=model_name, messages=CHAT, max_tokens=MAX_TOKENS,
                                     temperature=0, stream=True,
                                     stream_options={"include_usage": True})
  chunks = list(stream)
  text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
  assert text == full.choices[0].message.content
  assert chunks[-1].usage is not None
  assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_four_concurrent_streams_complete_exactly_and_a_fifth_gets_429(stack, references,
                                                                       model_name):
  c = client(stack)

  def stream_one(_):
    stream = c.completions.create(model=model_name, prompt=COMPLETION_PROMPT,
                                  max_tokens=MAX_TOKENS, temperature=0, stream=True)
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

  def held() -> int:
    stats = json.loads(get(stack, "/health"))["stats"]
    return stats["running"] + stats["queued"]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(stream_one, i) for i in range(4)]
    deadline = time.monotonic() + 30
    while held() < 4:  # two run, two wait in the queue
      assert time.monotonic() < deadline, "the four requests never reached the edge"
      time.sleep(0.005)
    with pytest.raises(openai.RateLimitError) as refused:
      c.completions.create(model=model_name, prompt=COMPLETION_PROMPT, max_tokens=4,
                           temperature=0, stream=True)
    texts = [f.result(timeout=120) for f in futures]
  assert texts == [references["completion"]] * 4
  assert refused.value.status_code == 429
  assert "queued" in refused.value.body["message"]


def wait_for_no_sessions(stack, timeout_s: float = 10.0) -> int:
  """The verifier's open sessions once they are all gone, or after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while stack.sessions() and time.monotonic() < deadline:
    time.sleep(0.05)
  return stack.sessions()


def test_a_client_that_disconnects_mid_stream_frees_its_server_session(stack, model_name):
  assert wait_for_no_sessions(stack) == 0  # what earlier tests ran has closed
  body = {"model": model_name, "prompt": COMPLETION_PROMPT, "max_tokens": 400, "stream": True,
          "temperature": 0, "stop": None}
  connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
  try:
    connection.request("POST", "/v1/completions", body=json.dumps(body),
                       headers={"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    first = next(line for line in iter(response.readline, b"") if line.startswith(b"data: "))
    assert json.loads(first[len(b"data: "):])["choices"]
    assert stack.sessions() == 1
  finally:
    # Closes the connection mid-stream (400 tokens take several seconds).
    connection.close()
  assert wait_for_no_sessions(stack) == 0, "the disconnected client's session was not freed"
  # Freed by the cancellation, not by running to its end.
  end = [e for e in events_lib.read_events([stack.events_path]) if e["kind"] == "request_end"][-1]
  assert end["finished_reason"] == "cancelled" and end["n_generated"] < 400, end


def test_bad_requests_get_openai_shaped_errors(stack, model_name):
  c = client(stack)
  with pytest.raises(openai.NotFoundError) as unknown:
    c.completions.create(model="no-such-model", prompt="x", max_tokens=4)
  assert unknown.value.body["code"] == "model_not_found"
  with pytest.raises(openai.BadRequestError) as negative:
    c.completions.create(model=model_name, prompt="x", max_tokens=-3)
  assert negative.value.body["param"] == "max_tokens"
  malformed = urllib.request.Request(f"{stack.base_url}/chat/completions", data=b'{"model": ',
                                     headers={"content-type": "application/json"})
  with pytest.raises(urllib.error.HTTPError) as refused:
    urllib.request.urlopen(malformed, timeout=10)
  assert refused.value.code == 400
  assert json.loads(refused.value.read())["error"]["type"] == "invalid_request_error"
  # The server is unharmed: a good request still works.
  assert c.completions.create(model=model_name, prompt="x", max_tokens=2).choices[0].text \
      is not None


def test_metrics_parse_and_agree_with_the_edge_events(stack, model_name):
  client(stack).completions.create(model=model_name, prompt=COMPLETION_PROMPT,
                                   max_tokens=MAX_TOKENS, temperature=0)
  deadline = time.monotonic() + 10
  while True:  # the request's end event lands once its slots are freed
    text = get(stack, "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    events = list(events_lib.read_events([stack.events_path]))
    ended = sum(e["kind"] == "request_end" for e in events)
    started = sum(e["kind"] == "request_start" for e in events)
    if ended == started or time.monotonic() > deadline:
      break
    time.sleep(0.1)
  verify_steps = [e for e in events if e["kind"] == "request_step" and e["phase"] == "verify"]
  assert all(name.startswith("specedge_") for name, _ in samples)
  assert samples[("specedge_edge_verifications_total", ())] == len(verify_steps)
  assert samples[("specedge_edge_accepted_tokens_total", ())] == sum(
      e["accepted_depth"] for e in verify_steps)
  assert samples[("specedge_edge_draft_tokens_total", ())] == sum(
      e["tree_size"] for e in verify_steps)
  assert samples[("specedge_edge_requests_started_total", ())] == started
  assert samples[("specedge_edge_ttft_seconds_count", ())] == started
  assert samples[("specedge_edge_requests_running", ())] == 0
  # The verifier's own /metrics against its own events.
  server = stack.verifier_metrics()
  batches = [e for e in events_lib.read_events([stack.verifier_events_path])
             if e["kind"] == "server_batch" and e["op"] == "verify"]
  assert server[("specedge_verifier_verify_batches_total", ())] == len(batches)
  assert server[("specedge_verifier_tree_tokens_total", ())] == sum(e["tokens"] for e in batches)
  assert server[("specedge_verifier_accepted_tokens_total", ())] == sum(
      sum(e["accepted_depths"]) for e in batches)
  assert server[("specedge_verifier_free_slots", ())] == stack.config.server.num_slots


def test_the_chat_page_streams_the_target_greedy_answer_in_a_real_browser(stack, tmp_path):
  """The chat page on the real stack, in headless Debian chromium: the answer it shows is the
  target's own greedy answer (the page asks for temperature 0 and 256 tokens by default)."""
  pytest.importorskip("playwright", reason="the playwright package is not installed")
  from specedge_jax.testing import browser  # pylint: disable=g-import-not-at-top

  if browser.chromium_path() is None:
    pytest.skip("no chromium: run tests/install_chromium.sh")
  question = CHAT[0]["content"]
  tokenizer = stack.tokenizer
  text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                       add_generation_prompt=True, tokenize=False)
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  expected = tokenizer.decode(reference_greedy(stack.config, [ids], 256)[0],
                              skip_special_tokens=True)
  screenshot = os.environ.get("SPECEDGE_SCREENSHOT") or str(tmp_path / "chat_page.png")
  shown = browser.chat_in_browser(f"http://127.0.0.1:{stack.port}/", question,
                                  screenshot_path=screenshot)
  assert shown["answer"].strip() == expected.strip()
  assert shown["finish_reason"] in ("stop", "length")
  assert float(shown["stats"]["tokens-per-s"]) > 0 and float(shown["stats"]["itl-ms"]) > 0
  assert os.path.getsize(screenshot) > 0


def test_launch_local_serve_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path,
                                                                          compilation_cache):
  """`python -m launch.local --serve` as a user runs it: real processes over mutual TLS, the
  HTTP port from its port file, a chat completion through the `openai` client, then SIGINT
  stops everything with status 0."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out_dir = tmp_path / "serve"
  # As from a terminal: a suite run in the background (`cmd &`, nohup, some CI runners) hands
  # its children SIGINT ignored, and Python then keeps it ignored, so Ctrl-C would do nothing.
  process = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--serve", "--http_port=0",
       f"--out_dir={out_dir}",
       # The suite's own cache: the default one under ~/.cache is shared with other processes
       # (a second pytest worker's launchers, a benchmark), and their compile locks with it.
       f"--compilation_cache_dir={compilation_cache}"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    port_file = out_dir / "http.port"
    deadline = time.monotonic() + 300
    while not port_file.exists():
      assert process.poll() is None, process.stdout.read()
      assert time.monotonic() < deadline, "the HTTP edge did not come up"
      time.sleep(0.2)
    port = int(port_file.read_text())
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = c.models.list().data[0].id
    reply = c.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
  finally:
    process.send_signal(signal.SIGINT)
    try:
      output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      process.kill()
      raise
  assert process.returncode == 0, output
  assert f"http://127.0.0.1:{port}/" in output  # the URLs were printed
