"""The main job's config: the embedded tiny Qwen3 target/draft pair and prompt set, on one machine.

    python -m launch.local                                   # this config
    python -m launch.local --config.edge.num_drafters=4 --config.workload.num_requests=16

Sizes are for CPU and the embedded models (a 4.2M-parameter target, a 0.9M draft).
"""

import ml_collections

from specedge_jax.data import assets


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "embedded",
      "models": {
          "target": assets.DEFAULT_TARGET_DIR,
          "draft": assets.DEFAULT_DRAFT_DIR,
          "tokenizer": "",  # the target's folder
          "dtype": "",  # fp32 as stored
          # Heterogeneous edges: drafter i runs drafts[i % len], e.g.
          # --config.models.drafts="('<draft>', '<draft_small>')"; empty: every edge runs draft.
          "drafts": (),
      },
      # A CPU-sized tree. On CPU drafting cost grows with the beams forwarded per step: with the
      # reference's tree (32, 4, 16, 32) one draft of the embedded pair takes ~190 ms against
      # ~35 ms for this one, for about the same tokens per step (3.1 vs 3.3); see
      # docs/notes/serving.md. The 14B/32B configs keep the reference's tree.
      "tree": {"max_n_beams": 4, "max_beam_len": 4, "max_branch_width": 2, "max_budget": 8},
      # Off by default here: on this 2-core CPU, with every drafter on one core, it hits 13-15 %
      # of rounds and helps only with one client (+6-10 % wall throughput, within noise); with
      # four clients it costs 17-22 % (docs/notes/sweep.md). Turn it on with
      # --config.proactive.mode=excluded.
      "proactive": {"mode": "disabled", "max_n_beams": 4, "max_beam_len": 2,
                    "max_branch_width": 2, "max_budget": 4},
      "server": {
          "num_slots": 8,
          "max_batch_size": 4,  # = num_drafters x requests_per_drafter: one tree per session
          "max_len": 512,
          "prefill_chunk": 64,
          "prefill_cache_entries": 0,
          "session_timeout_s": 30.0,  # the lease: a silent client's slot comes back after it
          "max_sessions_per_client": 4,  # a drafter runs requests_per_drafter sessions
          # Live-prefix attention: one bucket (all 512 rows) here. Buckets from 256 would save
          # 1.1-1.3x per verify at these lengths but double the warm-up's verify compiles, which
          # every start of the main job and every serving test pays on a fresh machine
          # (WORKSPACE_NOTES.md, "Scale and the GPU path"); --config.server.attention_min_rows=256.
          "attention_min_rows": 512,
          "tree_buckets": (),  # e.g. (3, 5) with slo batching: small trees run small forwards
          "speculation_control": False,  # the verifier advises each edge its next tree
          "control_reach_threshold": 0.3,
          # Hold fewer sessions than slots while their measured ITL misses their SLOs; the rest
          # wait for admission (time to first token), serving/slo_admission.py.
          "slo_admission": False,
          "mesh_shape": "",  # one device; launch.verifier --mesh_shape=model=N shards
          "device_memory_gb": 0.0,  # the memory planner asks the device
          "memory_headroom": 0.9,
          # Static: one forward for every active session's tree. Measured on CPU it doubled the
          # server throughput of dynamic batching at the same ITL (docs/notes/serving.md).
          "batching": {"mode": "static", "max_wait_ms": 0.0, "static_timeout_s": 5.0,
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
          "num_drafters": 2,
          "requests_per_drafter": 2,
          "interleave": True,
          "simulated_rtt_ms": 14.0,  # the paper's edge-to-server round trip
          "max_len": 512,
          # The HTTP API (launch.drafter --http_port): queue beyond the K running (429 past it),
          # and how long an open waits for an unreachable verifier before a 503.
          "max_queued_requests": 8,
          "open_give_up_s": 300.0,
          "speculative_first_round": False,  # the reference's: the first tree verified in the open
          "itl_slo_ms": 0,  # the ITL SLO its sessions ask for (batching mode "slo"); 0: none
      },
      "workload": {
          "source": "embedded",
          "dataset_dir": "",
          "num_requests": 8,
          "req_offset": 0,
          "sample_req_cnt": 1,
          "max_new_tokens": 48,
          "temperature": 0.0,
          "top_p": 1.0,
          "top_k": 0,
          "seed": 0,
          "mode": "sharded",  # 'reference': one request per client, whole set in client_order
          "end_row": -1,  # the reference's max_request_num: exclusive end row (-1: all)
          "reasoning": False,  # enable_thinking of chat templates that read it (Qwen3)
      },
  })
