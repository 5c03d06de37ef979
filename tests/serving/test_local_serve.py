"""`launch.local --serve`: the option plumbing (which children start, with which flags), the URLs
printed, and the refusals. The end-to-end run of serve mode lives with the HTTP API's tests."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from specedge_jax.serving import local

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _argvs(options: local.LocalOptions, num_drafters: int) -> dict[str, list[str]]:
  return local.child_argvs(options, num_drafters, config_path="run/config.json", port=4321,
                           server_security=["--allow_insecure"],
                           drafter_security=[["--allow_insecure"]] * num_drafters)


def test_serve_mode_starts_the_verifier_and_one_http_drafter(tmp_path):
  options = local.LocalOptions(out_dir=str(tmp_path), serve=True, http_port=0,
                               http_host="0.0.0.0", drafter_cpus=(1,))
  argvs = _argvs(options, 1)
  assert list(argvs) == ["verifier", "drafter0"]  # start order
  verifier, drafter = argvs["verifier"], argvs["drafter0"]
  assert verifier[1:3] == ["-m", "launch.verifier"] and drafter[1:3] == ["-m", "launch.drafter"]
  assert "--port=4321" in verifier
  assert f"--port_file={tmp_path / 'verifier.port'}" in verifier
  for flag in ("--http_port=0", "--http_host=0.0.0.0",
               f"--http_port_file={tmp_path / 'http.port'}", "--server=127.0.0.1:4321",
               "--client_index=0", "--cpus=1", "--config_json=run/config.json",
               "--allow_insecure", f"--event_log={tmp_path / 'drafter0.jsonl'}"):
    assert flag in drafter, flag
  assert not any(flag.startswith("--http") for flag in verifier)


def test_batch_mode_drafters_get_no_http_flags(tmp_path):
  options = local.LocalOptions(out_dir=str(tmp_path))
  argvs = _argvs(options, 2)
  assert list(argvs) == ["verifier", "drafter0", "drafter1"]
  assert "--client_index=1" in argvs["drafter1"]
  assert not any(flag.startswith("--http") for argv in argvs.values() for flag in argv)
  # Serve mode changes only the drafters' HTTP flags.
  served = _argvs(dataclasses.replace(options, serve=True), 2)
  assert served["verifier"] == argvs["verifier"]
  assert [f for f in served["drafter0"] if not f.startswith("--http")] == argvs["drafter0"]
  assert "--http_port=8000" in served["drafter0"] and "--http_host=127.0.0.1" in served["drafter0"]


def test_the_verifier_alone_gets_the_io_cores(tmp_path):
  options = local.LocalOptions(out_dir=str(tmp_path), verifier_cpus=(0,), verifier_io_cpus=(1,),
                               drafter_cpus=(1,))
  argvs = _argvs(options, 2)
  assert "--cpus=0" in argvs["verifier"] and "--io_cpus=1" in argvs["verifier"]
  assert not any(f.startswith("--io_cpus") for f in argvs["drafter0"] + argvs["drafter1"])
  assert not any(f.startswith("--io_cpus")
                 for f in _argvs(local.LocalOptions(out_dir=str(tmp_path)), 1)["verifier"])


def test_serve_options_are_checked():
  with pytest.raises(ValueError, match="no baselines"):
    local.LocalOptions(out_dir="x", serve=True, baselines=("autoregressive",))
  with pytest.raises(ValueError, match="http_port"):
    local.LocalOptions(out_dir="x", serve=True, http_port=70000)


def test_http_urls():
  assert local.http_urls("127.0.0.1", 8000) == ("http://127.0.0.1:8000/",
                                                "http://127.0.0.1:8000/v1")
  assert local.http_urls("0.0.0.0", 80) == ("http://127.0.0.1:80/", "http://127.0.0.1:80/v1")
  assert local.http_urls("::1", 8000)[1] == "http://[::1]:8000/v1"


def test_launcher_refuses_serve_with_baselines(tmp_path):
  done = subprocess.run([sys.executable, "-m", "launch.local", "--serve",
                         "--baselines=autoregressive", f"--out_dir={tmp_path}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0
  assert "serve mode runs no baselines" in done.stderr
  assert not os.listdir(tmp_path)  # refused before anything started
