"""Delivered supervision tokens/s through ``eagle3-target serve`` vs the same engine in
process, per mode and number of concurrent clients, with wire bytes/token.

    python bench/bench_server.py                      # CPU, built-in tiny model
    python bench/bench_server.py --model /models/Llama-3.1-8B-Instruct --engine sglang \\
        --device cuda --batch 4 --seq-len 2048 --clients 1,2

Each client is its own process (a trainer rank). "Delivered" means what the trainer
holds at the end of the call: in ``hidden`` mode the
logits rebuilt on ``--client-device`` (or the draft distribution), in ``draft`` mode the
server's ``target_probs``. Each client sends ``--runs`` batches of ``--batch`` x
``--seq-len`` random ids (no padding, distinct per client and run) after one warm-up;
the in-process baseline is ``generate_batch`` (plus the draft projection or top-k for
those modes) on the same batches, median of ``--runs``. The server runs in its own
process (started here unless ``--url`` is given); the in-process target is loaded in this
process, so on one GPU both hold a copy of the weights.

Two server rates per row: end to end (from the start to the last answer, over
``--runs`` requests per client, so one request's fill and drain are in it) and steady
(the least-squares slope of answers completed against time, all clients together: the
pipelined rate a trainer sees over an epoch of thousands of requests, free of the one
fill and drain; it wants a dozen ``--runs`` or more). The in-process baseline is a
median per call, a steady rate by construction. Beside them, the server's engine time
from its ``/metrics``: the share of the wall time it ran (``engine busy``) and its time
per request against the in-process call's.

Prints a Markdown table (and ``--json`` lines) ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch


def progress(msg: str) -> None:
    """One timestamped line on stderr, so a long GPU run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(seed: int, batch: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    return ids, mask, mask.clone()


def inprocess_tps(target, mode: str, mapping, args) -> float:
    from eagle3_target import compute_target_distribution

    times = []
    for r in range(args.runs + 1):
        ids, mask, loss = make_batch(10_000 + r, args.batch, args.seq_len, target.vocab_size)
        _sync()
        t0 = time.perf_counter()
        b = target.generate_batch(ids, mask, loss)
        if mode == "draft":
            out = compute_target_distribution(b.logits, mapping.selected_token_ids,
                                              mapping.selected_token_mask, b.loss_mask)
        elif mode == "topk":
            out = b.logits.topk(args.topk, dim=-1)
        _sync()
        if r:  # the first run is the warm-up
            times.append(time.perf_counter() - t0)
        del b
    return args.batch * args.seq_len / statistics.median(times)


def _client(c: int, url: str, token: str | None, mapping_ids: list[int],
            args: argparse.Namespace, commands, results) -> None:
    """One trainer rank in its own process (as in training: no GIL shared with others).

    Answers ``started`` once imported. Commands: ``("prepare", mode)`` builds the
    client and batches and warms up, then answers ``ready``; ``"go"`` times ``--runs``
    batches and answers the bytes received and when each answer was complete; ``None``
    exits."""
    from eagle3_target.client import RemoteTarget

    results.put(("started", c, None))  # imports done: it no longer loads the CPU
    clients: dict[str, Any] = {}
    while True:
        cmd = commands.get()
        if cmd is None:
            break
        try:
            mode = cmd[1]
            rt = clients.get(mode)
            if rt is None:
                rt = clients[mode] = RemoteTarget(url, token=token, mode=mode,
                                                  device=args.client_device,
                                                  dtype=args.wire_dtype, topk=args.topk,
                                                  timeout=600, batch=args.batch_policy,
                                                  max_in_flight=max(2, *args.prefetch))
                if mode == "draft" or (mode == "hidden" and args.hidden_form == "draft"):
                    rt.set_vocab_mapping(torch.tensor(mapping_ids))
            call = rt.generate_topk if mode == "topk" else rt.generate_batch
            call(*make_batch(c, args.batch, args.seq_len, rt.vocab_size))  # warm-up
            batches = [make_batch(1000 * (c + 1) + r, args.batch, args.seq_len, rt.vocab_size)
                       for r in range(args.runs)]
            results.put(("ready", c, None))
            if commands.get() != "go":
                raise RuntimeError("protocol error: expected go")
            before = rt.stats["bytes_received"]
            depth = cmd[2]
            stream = rt.prefetch(batches, depth=depth) if depth else (call(*b) for b in batches)
            done_at = []  # when each answer was complete on the client: the steady rate
            for out in stream:
                _sync()
                done_at.append(time.perf_counter())
                del out
            results.put(("done", c, (rt.stats["bytes_received"] - before, done_at)))
        except BaseException as e:  # reported by the parent
            results.put(("error", c, f"{type(e).__name__}: {e}"))
    for rt in clients.values():
        rt.close()


class ClientPool:
    """``n`` client processes kept for the whole benchmark (spawned once)."""

    def __init__(self, n: int, url: str, token: str | None, mapping, args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.args = args
        self.url, self.token = url, token
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_client, args=(c, url, token,
                                                        mapping.selected_token_ids.tolist(),
                                                        args, self.commands[c], self.results))
                      for c in range(n)]
        for p in self.procs:
            p.start()
        # Starting a client (a fresh interpreter importing torch) loads the CPU; on a
        # small machine that would land in the first in-process measurement.
        self._collect(n, "started")

    def _collect(self, n: int, kind: str) -> list[Any]:
        out = []
        for _ in range(n):
            what, c, value = self.results.get(timeout=3600)
            if what == "error":
                raise RuntimeError(f"client {c} failed: {value}")
            assert what == kind
            out.append(value)
        return out

    def run(self, mode: str, clients: int, prefetch: int) -> dict[str, float]:
        """One measurement over ``clients`` concurrent clients.

        ``tokens_per_s`` is end to end: from the go to the last answer, so it holds one
        request's fill (the first engine call) and drain (the last answer's transport
        and rebuild) that a trainer pays once per epoch. ``steady_tokens_per_s`` is the
        pipelined rate without them: the least-squares slope of answers completed
        against time (NaN with fewer than three answers). ``engine_busy`` is
        the server's engine time (its ``eagle3_engine_seconds``) over the wall time,
        ``engine_s_per_request`` that time per request: together they tell an engine
        that idles from one that runs slower beside the transport."""
        for q in self.commands[:clients]:
            q.put(("prepare", mode, prefetch))
        self._collect(clients, "ready")
        before = self.engine_seconds()
        t0 = time.perf_counter()
        for q in self.commands[:clients]:
            q.put("go")
        done = self._collect(clients, "done")
        wall = time.perf_counter() - t0
        after = self.engine_seconds()
        per_request = self.args.batch * self.args.seq_len
        tokens = clients * self.args.runs * per_request
        # The least-squares slope of answers completed against time, all clients' answers
        # together: the fill and the drain only shift the line, and answers that come in
        # bursts (a merged call, prefetched requests) do not bias it as a first-to-last
        # count would.
        times = sorted(t for _, ts in done for t in ts)
        steady = float("nan")
        if len(times) > 2 and times[-1] > times[0]:
            slope = statistics.linear_regression(times, range(1, len(times) + 1)).slope
            steady = slope * per_request
        out = {"tokens_per_s": tokens / wall, "steady_tokens_per_s": steady,
               "bytes_per_token": sum(r for r, _ in done) / tokens}
        if before is not None and after is not None:
            out["engine_busy"] = (after - before) / wall
            out["engine_s_per_request"] = (after - before) / max(1, clients * self.args.runs)
        return out

    def engine_seconds(self) -> float | None:
        """The server's total ``eagle3_engine_seconds`` from ``/metrics``; None where the
        server does not answer it."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(self.url.rstrip("/") + "/metrics")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "eagle3_engine_seconds_sum":
                    return sample.value
        return None

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: built-in tiny model)")
    p.add_argument("--engine", default="hf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--aux-layers", default=None, help="three comma-separated layer ids")
    p.add_argument("--client-device", default=None, help="where hidden mode rebuilds (default --device)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--clients", default="1,2")
    p.add_argument("--modes", default="logits,draft,hidden,topk")
    p.add_argument("--wire-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--hidden-form", default="logits", choices=["logits", "draft"],
                   help="what hidden mode rebuilds on the client")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--prefetch", default="0",
                   help="comma-separated: each client keeps this many requests in flight with "
                        "RemoteTarget.prefetch (0: one call after another)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="draft vocabulary size (default: 32000, or V/8 for small vocabularies)")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--token", default=None)
    p.add_argument("--engine-arg", action="append", default=[])
    p.add_argument("--repeat", type=int, default=3, help="medians over this many repeats")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate in-process and server runs (default: on CPU only)")
    p.add_argument("--batch-policy", default="shared", choices=["shared", "alone"],
                   help="the requests' batch parameter: alone = never merged with another "
                        "client's (what dump --server sends)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.client_device = args.client_device or args.device
    args.prefetch = [int(x) for x in str(args.prefetch).split(",")]

    from eagle3_target import Eagle3TargetModel, VocabMapping
    from eagle3_target.engines.common import quiet_transformers as quiet_transformers
    from eagle3_target.cli.common import parse_engine_args
    from eagle3_target.tiny import resolve_model
    from eagle3_target.server.process import ServerProcess

    quiet_transformers()
    model = resolve_model(args.model)
    engine_kwargs = parse_engine_args(args.engine_arg)
    aux = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
    target = Eagle3TargetModel.from_pretrained(model, engine=args.engine, device=args.device,
                                               dtype=args.dtype, aux_layer_ids=aux,
                                               **engine_kwargs)
    vd = args.draft_vocab or (32000 if target.vocab_size > 64000 else target.vocab_size // 8)
    mapping = VocabMapping.from_ids(torch.randperm(target.vocab_size,
                                                   generator=torch.Generator().manual_seed(0))[:vd],
                                    target.vocab_size)
    modes = args.modes.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    # Interleaving (in-process, then through the server, per mode and repeat) keeps the
    # ratio honest on a machine whose load drifts; on a GPU the in-process copy is
    # measured first and freed, so the server gets the GPU memory to itself.
    interleave = not args.device.startswith("cuda") if args.interleave is None else args.interleave
    base: dict[str, list[float]] = {m: [] for m in modes}
    if not interleave:
        for m in modes:
            base[m] = [inprocess_tps(target, m, mapping, args) for _ in range(args.repeat)]
            progress(f"in-process {m}: {statistics.median(base[m]):,.0f} tokens/s")
        target.close()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    srv = None
    url, token = args.url, args.token
    if url is None:
        token = token or "bench"
        flags = ["--model", model, "--engine", args.engine, "--device", args.device,
                 "--max-batch-tokens", str(args.max_batch_tokens)]
        if args.dtype:
            flags += ["--dtype", args.dtype]
        if args.aux_layers:
            flags += ["--aux-layers", args.aux_layers]
        for e in args.engine_arg:
            flags += ["--engine-arg", e]
        progress("starting the server")
        srv = ServerProcess(flags, token=token).start(timeout=1800)
        progress(f"server ready at {srv.url}")
        url = srv.url
    served: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    pool = None
    try:
        pool = ClientPool(max(clients), url, token, mapping, args)
        for m in modes:
            for _ in range(args.repeat):
                if interleave:
                    base[m].append(inprocess_tps(target, m, mapping, args))
                for pf in args.prefetch:
                    for c in clients:
                        served.setdefault((m, c, pf), []).append(pool.run(m, c, pf))
                        last = served[(m, c, pf)][-1]
                        progress(f"server {m}, {c} client(s), prefetch {pf}: "
                                 f"{last['tokens_per_s']:,.0f} tokens/s, steady "
                                 f"{last['steady_tokens_per_s']:,.0f}, engine busy "
                                 f"{last.get('engine_busy', float('nan')):.2f}")
    finally:
        if pool is not None:
            pool.close()
        if srv is not None:
            srv.stop()
        if interleave:
            target.close()
    rows: list[dict[str, Any]] = []
    for (m, c, pf), runs in served.items():
        ref = statistics.median(base[m])
        row: dict[str, Any] = {"mode": m, "clients": c, "prefetch": pf,
                               "inprocess_tokens_per_s": ref, "repeats": len(runs),
                               "bytes_per_token": runs[0]["bytes_per_token"]}
        for key in ("tokens_per_s", "steady_tokens_per_s", "engine_busy",
                    "engine_s_per_request"):
            got = [r[key] for r in runs if key in r]
            if got:
                row[key if key.startswith("engine") else "server_" + key] = statistics.median(got)
        row["ratio"] = row["server_tokens_per_s"] / ref
        row["steady_ratio"] = row["server_steady_tokens_per_s"] / ref
        rows.append(row)

    dev = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
           else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model {model} | engine {args.engine} | device {args.device} ({dev}) | "
          f"wire dtype {args.wire_dtype} | batch {args.batch_policy} | "
          f"{args.batch} x {args.seq_len} per request, "
          f"{args.runs} runs per client, "
          f"median of {args.repeat} repeats")
    logits_bpt = {r["clients"]: r["bytes_per_token"] for r in rows if r["mode"] == "logits"}
    per_request = args.batch * args.seq_len
    print("| mode | clients | prefetch | server tokens/s | steady tokens/s | in-process tokens/s "
          "| ratio | steady ratio | engine busy | engine ms/request (in process) | bytes/token "
          "| bytes vs logits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = (f"1/{logits_bpt[r['clients']] / r['bytes_per_token']:.1f}"
              if r["clients"] in logits_bpt and r["mode"] != "logits" else "1")
        busy = f"{r['engine_busy']:.2f}" if "engine_busy" in r else "-"
        ms = (f"{1000 * r['engine_s_per_request']:.0f} "
              if "engine_s_per_request" in r else "- ")
        ms += f"({1000 * per_request / r['inprocess_tokens_per_s']:.0f})"
        print(f"| {r['mode']} | {r['clients']} | {r['prefetch']} | {r['server_tokens_per_s']:,.0f} | "
              f"{r['server_steady_tokens_per_s']:,.0f} | {r['inprocess_tokens_per_s']:,.0f} | "
              f"{r['ratio']:.2f}x | {r['steady_ratio']:.2f}x | {busy} | {ms} | "
              f"{r['bytes_per_token']:,.0f} | {vs} |")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
