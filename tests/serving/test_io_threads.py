"""The verifier's network threads move off its compute cores (serving/io_threads.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from specedge_jax.serving import io_threads


def test_io_thread_ids_takes_the_main_thread_and_grpcs():
  names = {100: "python", 101: "python", 102: "tf_XLAEigen", 103: "event_engine",
           104: "grpc_global_tim", 105: "lifeguard", 106: "verifier.py", 107: "llvm-worker-0"}
  # 100 is the main thread; XLA's threads (named or not) and Python's stay.
  assert io_threads.io_thread_ids(names, 100) == {100, 103, 104, 105}
  # A main thread that has ended (not listed) is not asked for.
  assert io_threads.io_thread_ids({7: "python", 8: "event_engine"}, 1) == {8}


@pytest.mark.parametrize("cpus, message", [((), "non-empty"), ((10_000,), "subset")])
def test_io_cpus_the_machine_lacks_are_refused(cpus, message):
  with pytest.raises(ValueError, match=message):
    io_threads.check_io_cpus(cpus)


_PROBE = textwrap.dedent("""
    import asyncio, json, os, threading
    os.sched_setaffinity(0, {0})  # the verifier's --cpus=0: XLA sizes its pools to one core
    import jax, jax.numpy as jnp
    import grpc
    from specedge_jax.serving import io_threads

    def cores(tid):
      with open(f"/proc/self/task/{tid}/status") as f:
        line = next(l for l in f if l.startswith("Cpus_allowed_list"))
      return line.split(":")[1].strip()

    release = threading.Event()
    worker = threading.Thread(target=release.wait, name="engine")  # started before the move
    worker.start()

    async def main():
      x = jnp.ones((256, 256))
      (x @ x).block_until_ready()  # XLA's compute pool exists
      server = grpc.aio.server()
      server.add_insecure_port("127.0.0.1:0")
      await server.start()
      placer = io_threads.IoThreadPlacer([1], poll_s=0.05).start()
      later = threading.Thread(target=release.wait)  # started by the main thread after it
      later.start()
      await asyncio.sleep(0.2)
      names = io_threads.thread_names()
      out = {"main": cores(threading.main_thread().native_id), "engine": cores(worker.native_id),
             "later": cores(later.native_id),
             "threads": [[name, cores(tid)] for tid, name in names.items()
                         if tid not in (worker.native_id, later.native_id)],
             "placed": sorted(set(placer.placed.values()))}
      placer.stop()
      release.set()
      await server.stop(None)
      print(json.dumps(out))

    asyncio.run(main())
""")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or
                    not {0, 1} <= os.sched_getaffinity(0), reason="needs cores 0 and 1 (Linux)")
def test_grpc_threads_move_and_xla_compute_stays(tmp_path):
  """In a child process (affinity is inherited, so pytest's own threads stay as they are): a
  process on core 0 with a gRPC server and XLA's pool moves its network threads to core 1 and
  keeps XLA's threads and the engine thread on core 0."""
  done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out["main"] == "1" and out["later"] == "1"
  assert out["engine"] == "0"
  by_name: dict[str, set[str]] = {}
  for name, cores in out["threads"]:
    by_name.setdefault(name, set()).add(cores)
  grpc_names = [n for n in by_name if n.startswith(io_threads.GRPC_THREAD_PREFIXES)]
  assert grpc_names, f"no gRPC threads seen: {sorted(by_name)}"
  for name in grpc_names:
    assert by_name[name] == {"1"}, (name, by_name[name])
  for name, cores in by_name.items():  # XLA's named threads stay
    if name.startswith(("tf_", "llvm")):
      assert cores == {"0"}, (name, cores)
  # XLA's unnamed threads (comm = the process's) stay, apart from the main thread itself.
  assert "0" in by_name["python"]
  assert set(out["placed"]) >= set(grpc_names)


@pytest.mark.slow  # a launcher subprocess (~6 s of imports)
def test_the_verifier_launcher_refuses_io_cpus_the_machine_lacks():
  done = subprocess.run([sys.executable, "-m", "launch.verifier", "--allow_insecure",
                         "--io_cpus=4096"], capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert done.returncode != 0
  assert "--io_cpus: io_cpus [4096] must be a non-empty subset" in done.stderr, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
