"""SpecEdge's main pair: Qwen3-14B on the server, Qwen3-1.7B on the edges (the paper's setup).

Point `models.target` / `models.draft` at local checkpoints (HF folders with weights, or orbax
dirs from `launch/convert.py`); `configs/hf/qwen3_14b.json` and `qwen3_1_7b.json` are their
architectures. Run the verifier on the GPU server and one drafter per edge GPU:

    python -m launch.verifier --config=configs/qwen3_14b_1_7b.py --host=0.0.0.0 --port=50051 \
        --tls_cert=server.pem --tls_key=server.key --auth_tokens=tokens.json
    python -m launch.drafter --config=configs/qwen3_14b_1_7b.py --server=SERVER:50051 \
        --client_index=0 --config.edge.num_drafters=2 --tls_ca=ca.pem --auth_token_file=edge0.token

(`specedge_jax.serving.security.make_test_pki` / `make_tokens` write such files for a trial; a
real deployment uses its own CA. Plaintext needs `--allow_insecure` on both sides.)

The network is real there, so `edge.simulated_rtt_ms` is 0. Values follow the reference's
example config (`config/specedge.example.yaml`): fp16 there, bf16 here (TPU/GPU native).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "qwen3_14b_1_7b",
      "models": {
          "target": "/models/Qwen3-14B",
          "draft": "/models/Qwen3-1.7B",
          "tokenizer": "",
          "dtype": "bf16",
          # Mixed edges, drafter i on drafts[i % len] (one tokenizer for all), e.g.
          # --config.models.drafts="('/models/Qwen3-0.6B', '/models/Qwen3-1.7B')".
          "drafts": (),
      },
      "tree": {"max_n_beams": 32, "max_beam_len": 4, "max_branch_width": 16, "max_budget": 32},
      "proactive": {"mode": "excluded", "max_n_beams": 32, "max_beam_len": 3,
                    "max_branch_width": 16, "max_budget": 32},
      "server": {
          # bf16 weights take ~30 GB; a slot (2048 rows x 40 layers x 8 kv heads x 128 x k,v
          # x 2 bytes) takes 320 MiB.
          "num_slots": 16,
          "max_batch_size": 8,
          "max_len": 2048,
          "prefill_chunk": 256,
          # Host-memory snapshots of replayed prompts (the reference's cache_prefill); the
          # sampled Spec-Bench rows (480 / 8) all fit.
          "prefill_cache_entries": 64,
          "session_timeout_s": 30.0,  # the lease: a silent client's slot comes back after it
          "max_sessions_per_client": 4,  # a drafter runs requests_per_drafter sessions
          "attention_min_rows": 256,  # live-prefix buckets 256, 512, ... max_len
          "tree_buckets": (),  # e.g. (3, 5) with slo batching: small trees run small forwards
          "speculation_control": False,  # the verifier advises each edge its next tree
          "control_reach_threshold": 0.3,
          # Hold fewer sessions than slots while their measured ITL misses their SLOs; the rest
          # wait for admission (time to first token), serving/slo_admission.py.
          "slo_admission": False,
          "mesh_shape": "",  # e.g. "model=2" on two GPUs (launch.verifier --mesh_shape)
          "device_memory_gb": 0.0,  # the memory planner asks the device
          "memory_headroom": 0.9,
          "batching": {"mode": "dynamic", "max_wait_ms": 1.0, "static_timeout_s": 5.0,
                       # batching mode "slo" (serving/slo_scheduler.py): the ITL SLO of sessions
                       # that send none (0: none), the starvation bound, the margin kept back
                       # from deadlines.
                       "default_itl_slo_ms": 0.0, "max_queue_ms": 100.0, "slo_margin_ms": 1.0},
          # The verify-time estimator: its measurements file across restarts ('': in memory)
          # and the `launch.bench_core --out_json` curve it starts from ('': defaults).
          "verify_time_path": "",
          "verify_time_seed": "",
      },
      "edge": {
          "num_drafters": 8,
          "requests_per_drafter": 2,
          "interleave": True,
          "simulated_rtt_ms": 0.0,
          "max_len": 2048,
          # The HTTP API (launch.drafter --http_port): queue beyond the K running (429 past it),
          # and how long an open waits for an unreachable verifier before a 503.
          "max_queued_requests": 8,
          "open_give_up_s": 300.0,
          "speculative_first_round": False,  # the reference's: the first tree verified in the open
          "itl_slo_ms": 0,  # the ITL SLO its sessions ask for (batching mode "slo"); 0: none
      },
      "workload": {
          "source": "specbench",
          "dataset_dir": "",
          "num_requests": 0,  # every sampled row
          "req_offset": 0,
          "sample_req_cnt": 8,
          "max_new_tokens": 64,
          "temperature": 0.7,
          "top_p": 1.0,
          "top_k": 0,
          "seed": 42,
          "mode": "sharded",  # 'reference': one request per client, whole set in client_order
          "end_row": -1,  # the reference's max_request_num: exclusive end row (-1: all)
          "reasoning": False,  # enable_thinking of chat templates that read it (Qwen3)
      },
  })
