"""`compile_lock.exclusive`: processes take turns on one cache folder's lock; no folder, no lock."""

from __future__ import annotations

import subprocess
import sys

from specedge_jax.engine import compile_lock

_HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "a") as f:
  fcntl.flock(f, fcntl.LOCK_EX)
  print("locked", flush=True)
  time.sleep(float(sys.argv[2]))
"""


def test_a_second_process_waits_for_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(tmp_path / ".specedge-warmup.lock"), "1.0"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with compile_lock.exclusive("warmup", folder=str(tmp_path)) as waited_s:
      assert holder.poll() is not None or waited_s >= 0.5  # it ran only once the holder let go
    assert 0.5 <= waited_s < 10.0
    with compile_lock.exclusive("warmup", folder=str(tmp_path)) as waited_s:  # free now
      assert waited_s < 0.5
  finally:
    holder.kill()
    holder.wait()


def test_a_holder_that_hangs_is_waited_for_only_until_the_timeout(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(tmp_path / ".specedge-warmup.lock"), "60"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with compile_lock.exclusive("warmup", timeout_s=0.3, folder=str(tmp_path)) as waited_s:
      assert 0.3 <= waited_s < 5.0
  finally:
    holder.kill()
    holder.wait()


def test_no_cache_folder_no_lock():
  with compile_lock.exclusive("warmup", folder="") as waited_s:
    assert waited_s == 0.0
