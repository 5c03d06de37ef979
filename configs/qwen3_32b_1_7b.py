"""The larger pair: Qwen3-32B on the server, Qwen3-1.7B on the edges.

Everything but the target follows `qwen3_14b_1_7b.py` (read from beside this file, so the two
cannot drift apart); `configs/hf/qwen3_32b.json` is the target's architecture. Run it as the 14B
pair, with this file:

    python -m launch.verifier --config=configs/qwen3_32b_1_7b.py --host=0.0.0.0 --port=50051 \
        --tls_cert=server.pem --tls_key=server.key --auth_tokens=tokens.json
    python -m launch.drafter --config=configs/qwen3_32b_1_7b.py --server=SERVER:50051 \
        --client_index=0 --config.edge.num_drafters=2 --tls_ca=ca.pem --auth_token_file=edge0.token

(`specedge_jax.serving.security.make_test_pki` / `make_tokens` write such files for a trial; a
real deployment uses its own CA. Plaintext needs `--allow_insecure` on both sides.)
"""

import importlib.util
import os

import ml_collections


def _base_config() -> ml_collections.ConfigDict:
  # Config files are loaded by path (ml_collections), not as a package: load the sibling so.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_14b_1_7b.py")
  spec = importlib.util.spec_from_file_location("qwen3_14b_1_7b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  config = _base_config()
  config.name = "qwen3_32b_1_7b"
  config.models.target = "/models/Qwen3-32B"
  # bf16 weights take ~64 GB; a slot (2048 rows x 64 layers x 8 kv heads x 128 x k,v x 2 bytes)
  # takes 0.5 GiB, so the base's 16 slots add 8 GiB: fits an 80 GB GPU.
  return config
