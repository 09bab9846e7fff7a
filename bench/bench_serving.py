"""Benchmark of teacher serving: scoring throughput and bytes on the wire, top-k payloads
against shipping full logits; and remote- vs in-process-teacher training on the toy default.

Scoring (`score`, the default): for each teacher (--models: "toy" = the toy default's
teacher, "synthetic" = a random 1-layer Qwen3 with --synthetic-vocab output rows (151,936: a
Qwen-sized vocabulary), or a model directory), the same workload of --sequences sequences of
--prompt-len + --response-len random tokens, with the student's top-k ids (random) at every
response position, is scored

    in-process   Scorer.score on the request (forward + payload, no HTTP): the compute ceiling
    payload      `opd-fast serve-teacher` in a subprocess, over loopback HTTP, C clients
    logits       the same server and HTTP stack answering with the fp32 logits of the response
                 positions (P, V) instead of the payload: what shipping logits costs

Reported per row: response tokens/s (median, p10, p90 over --repeats), request and response
bytes per response token, and the answer's size as a fraction of fp32 logits at the model's V
and at V = 151,936 (the issue's target: <= 1% at k = 16).

Training (`train`): the toy demo recipe (opd_fast.training.recipes.TOY_DEMO, --steps overrides its
length) with the teacher in process and with `teacher_url` pointing at a server subprocess
(started once), alternating --repeats pairs so that load drift hits both alike; reports per
pair both wall times and their ratio (target <= 1.3), the ratio of the summed step times
(which leaves out the in-process run's extra teacher-accuracy evaluation), the CPU seconds
(trainer, plus the server for the remote run: insensitive to other load on the machine), and
the largest relative difference of every training metric between the runs.

    python bench/bench_serving.py score --models toy synthetic
    python bench/bench_serving.py train --repeats 3
Output: a table and bench/results/serving-<device>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from machine import git_info, machine_info  # bench/machine.py

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_VOCAB = 151_936
# decode_frame returns read-only views of the answer; torch.from_numpy warns once about that
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


# ---- the logits-shipping server (comparison) ------------------------------------------------


def _logits_scorer_class():
    from opd_fast.serving.scorer import Scorer
    from opd_fast.wire import protocol

    class LogitsScorer(Scorer):
        """Answers a score request with the fp32 logits (P, vocab_limit) of its positions."""

        def _payload(self, job, logits, rows):
            batch_rows, kept = rows
            selected = logits[
                torch.from_numpy(batch_rows).to(self.device),
                torch.from_numpy(kept).to(self.device),
                : job.vocab_limit,
            ]
            values = selected.float().cpu().numpy()
            return protocol.encode_frame({"positions": job.positions}, {"logits": values})

    return LogitsScorer


def serve(args) -> int:
    """Subprocess entry: a TeacherServer answering payloads (or logits with --logits)."""
    from opd_fast.serving.scorer import Scorer, ServerLimits
    from opd_fast.serving.server import TeacherServer

    scorer_class = _logits_scorer_class() if args.logits else Scorer
    base = Scorer.from_path(args.model, args.device)
    scorer = scorer_class(base.model, base.tokenizer, base.model_path)
    limits = ServerLimits(max_request_bytes=1 << 30, max_batch_tokens=1 << 20)
    server = TeacherServer(scorer, port=args.port, limits=limits)
    print(f"listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


class _Subprocess:
    def __init__(self, model, device, logits=False, python_args=()):
        # The test suite's server helpers (python_tests/serving_helpers.py).
        sys.path.insert(
            0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_tests")
        )
        from serving_helpers import free_port, wait_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, __file__, "serve", "--model", model, "--port", str(self.port)]
        command += ["--device", device] + (["--logits"] if logits else [])
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_healthy(self.url, 180, self.process)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)


# ---- scoring benchmark ------------------------------------------------------------------------


def synthetic_model(folder: str, vocab: int) -> str:
    from opd_fast.toy.tiny import save_tiny_model

    return save_tiny_model(folder, vocab_size=vocab, hidden_size=64, num_layers=1, seed=0)


def workload(vocab_rows: int, args, seed: int = 0):
    rng = np.random.default_rng(seed)
    length = args.prompt_len + args.response_len
    sequences = [rng.integers(0, vocab_rows, length) for _ in range(args.sequences)]
    starts = [args.prompt_len] * args.sequences
    requested = rng.integers(0, vocab_rows, (args.sequences * args.response_len, args.k))
    return sequences, starts, requested


def _percentiles(values):
    values = np.asarray(values)
    return {
        "median": float(np.median(values)),
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
    }


def time_remote(url, body, decode, clients, repeats, requests_per_client):
    """Wall time of `clients` threads each posting `body` requests_per_client times."""
    from opd_fast.teachers.http import HttpTransport
    from opd_fast.wire.protocol import CONTENT_TYPE

    transports = [HttpTransport(url, timeout=600) for _ in range(clients)]
    sizes = {}

    def one_client(transport):
        for _ in range(requests_per_client):
            _, answer = transport.request("POST", "/v1/score", body, CONTENT_TYPE)
            decode(answer)
            sizes["answer"] = len(answer)

    one_client(transports[0])  # warm-up (and connection)
    times = []
    for _ in range(repeats):
        threads = [threading.Thread(target=one_client, args=(t,)) for t in transports]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        times.append(time.perf_counter() - started)
    for transport in transports:
        transport.close()
    return times, sizes["answer"]


def bench_model(name: str, path: str, args, rows_out: list) -> None:
    from opd_fast.serving.scorer import Scorer, ServerLimits, parse_score_request
    from opd_fast.wire import protocol

    scorer = Scorer.from_path(path, args.device)
    vocab = scorer.vocab_size
    sequences, starts, requested = workload(vocab, args)
    body = protocol.encode_score_request(sequences, starts, args.k, 1.0, None, requested)
    tokens = args.sequences * args.response_len
    limits = ServerLimits(max_request_bytes=1 << 30, max_batch_tokens=1 << 20)
    common = {
        "model": name,
        "vocab": vocab,
        "k": args.k,
        "sequences": args.sequences,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "dtype": str(scorer.dtype).replace("torch.", ""),
        "request_bytes_per_token": len(body) / tokens,
    }

    # in-process: parse + forward + payload + encode, no HTTP; from a worker thread, as the
    # server scores (on a busy 2-core machine, 2 OpenMP threads started from the main thread
    # can be many times slower than from a worker thread)
    times, answers = [], []

    def measure():
        job = parse_score_request(body, limits, vocab)
        scorer.score([job])
        for _ in range(args.repeats):
            job = parse_score_request(body, limits, vocab)
            started = time.perf_counter()
            answers[:] = scorer.score([job])
            times.append(time.perf_counter() - started)

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    (answer,) = answers
    stats = _percentiles([tokens / t for t in times])
    rows_out.append(
        dict(
            common,
            transport="in-process",
            clients=1,
            tokens_per_s=stats,
            response_bytes_per_token=len(answer) / tokens,
        )
    )
    print_row(rows_out[-1])
    scorer = None  # free the model before the servers load theirs

    for transport in ("payload", "logits"):
        server = _Subprocess(path, args.device, logits=transport == "logits")
        try:
            decode = (
                protocol.decode_score_response
                if transport == "payload"
                else lambda answer: torch.from_numpy(protocol.decode_frame(answer)[1]["logits"])
            )
            for clients in args.clients:
                per_client = max(1, args.requests // clients)
                times, answer_bytes = time_remote(
                    server.url, body, decode, clients, args.repeats, per_client
                )
                scored = tokens * per_client * clients
                rows_out.append(
                    dict(
                        common,
                        transport=transport,
                        clients=clients,
                        requests=per_client * clients,
                        tokens_per_s=_percentiles([scored / t for t in times]),
                        response_bytes_per_token=answer_bytes / tokens,
                    )
                )
                print_row(rows_out[-1])
        finally:
            server.close()


def add_ratios(rows_out: list) -> None:
    for row in rows_out:
        answer = row["response_bytes_per_token"]
        row["answer_fraction_of_fp32_logits"] = answer / (4 * row["vocab"])
        row["answer_fraction_of_fp32_logits_at_151936"] = answer / (4 * TARGET_VOCAB)
        both = answer + row["request_bytes_per_token"]
        row["round_trip_fraction_of_fp32_logits_at_151936"] = both / (4 * TARGET_VOCAB)


def targets(rows_out: list) -> dict:
    """The issue's payload target on the payload rows (not the logits comparison rows)."""
    payload_rows = [r for r in rows_out if r["transport"] != "logits" and r["k"] == 16]
    return {
        "answer_bytes_per_token_at_k16_le_1pct_of_fp32_logits_at_151936": bool(payload_rows)
        and all(r["answer_fraction_of_fp32_logits_at_151936"] <= 0.01 for r in payload_rows),
        "round_trip_bytes_per_token_at_k16_le_1pct_of_fp32_logits_at_151936": bool(payload_rows)
        and all(r["round_trip_fraction_of_fp32_logits_at_151936"] <= 0.01 for r in payload_rows),
    }


def print_row(row: dict) -> None:
    stats = row["tokens_per_s"]
    print(
        f"{row['model']:>10} V={row['vocab']:<7} {row['transport']:>10} clients={row['clients']:<3}"
        f" {stats['median']:>12,.0f} tok/s (p10 {stats['p10']:,.0f}, p90 {stats['p90']:,.0f})"
        f"  answer {row['response_bytes_per_token']:>10,.1f} B/tok"
        f"  request {row['request_bytes_per_token']:,.1f} B/tok",
        flush=True,
    )


# ---- training: remote vs in-process -----------------------------------------------------------


def _cpu_seconds(pid: int | None = None) -> float:
    """user + system CPU time of this process (all threads) or of process `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _train(config_values: dict, server_pid: int | None = None):
    """(wall s, CPU s of the trainer plus the server, train records) of one run."""
    from opd_fast.training.config import make_config
    from opd_fast.training.trainer import Trainer

    cpu = _cpu_seconds() + (_cpu_seconds(server_pid) if server_pid else 0.0)
    started = time.perf_counter()
    trainer = Trainer(make_config(config_values))
    trainer.run()
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() + (_cpu_seconds(server_pid) if server_pid else 0.0) - cpu
    return wall, cpu, [r for r in trainer.parts.log.read() if r["kind"] == "train"]


def bench_training(args) -> dict:
    from opd_fast.toy import toy_assets
    from opd_fast.training.recipes import TOY_DEMO

    assets = toy_assets(cache_dir=args.toy_cache, progress=False)
    paths = {
        "student": assets.student_dir,
        "teacher": assets.teacher_dir,
        "train_data": assets.train_prompts,
        "eval_data": assets.eval_prompts,
    }
    config = {**TOY_DEMO, **paths, "progress": False, "device": args.device}
    if args.steps:
        config["steps"] = args.steps
    folder = tempfile.mkdtemp(prefix="opd-serving-train-")
    server = _Subprocess(paths["teacher"], args.device)
    pairs, cpu_pairs = [], []
    try:
        for repeat in range(args.repeats):  # alternate, so that load drift hits both alike
            run_dir = os.path.join(folder, f"local-{repeat}")
            local_wall, local_cpu, local_rows = _train(dict(config, run_dir=run_dir))
            run_dir = os.path.join(folder, f"remote-{repeat}")
            remote_wall, remote_cpu, remote_rows = _train(
                dict(config, run_dir=run_dir, teacher_url=server.url), server.process.pid
            )
            pairs.append((local_wall, local_rows, remote_wall, remote_rows, os.getloadavg()[0]))
            cpu_pairs.append((local_cpu, remote_cpu))
            print(
                f"pair {repeat}: in-process {local_wall:.1f} s ({local_cpu:.1f} CPU s), remote "
                f"{remote_wall:.1f} s ({remote_cpu:.1f} CPU s), wall ratio "
                f"{remote_wall / local_wall:.3f} (load {pairs[-1][-1]:.1f})",
                flush=True,
            )
    finally:
        server.close()

    def numbers(record, prefix=""):
        """(name, value) of every number in a metrics record, nested ones included."""
        if isinstance(record, dict):
            for key, value in record.items():
                if not any(t in key for t in ("per_s", "seconds", "memory")):
                    yield from numbers(value, f"{prefix}{key}.")
        elif isinstance(record, list):
            for value in record:
                yield from numbers(value, prefix)
        elif isinstance(record, (int, float)) and not isinstance(record, bool):
            yield prefix.rstrip("."), float(record)

    differences = {}
    for _, local_rows, _, remote_rows, _ in pairs:
        for local, remote in zip(local_rows, remote_rows):
            for (key, value), (other_key, other) in zip(numbers(local), numbers(remote)):
                assert key == other_key, (key, other_key)
                gap = abs(value - other) / max(abs(value), 1e-12)
                differences[key] = max(differences.get(key, 0.0), gap)

    def teacher_seconds(rows):
        return sum(r["response_tokens"] / r["teacher_tokens_per_s"] for r in rows)

    runs = [
        {
            "in_process_wall_s": local_wall,
            "remote_wall_s": remote_wall,
            "wall_ratio": remote_wall / local_wall,
            "in_process_step_s": sum(r["step_seconds"] for r in local_rows),
            "remote_step_s": sum(r["step_seconds"] for r in remote_rows),
            "step_time_ratio": sum(r["step_seconds"] for r in remote_rows)
            / sum(r["step_seconds"] for r in local_rows),
            "in_process_teacher_s": teacher_seconds(local_rows),
            "remote_teacher_s": teacher_seconds(remote_rows),
            "load_average_after": load,
            "in_process_cpu_s": local_cpu,
            "remote_cpu_s_trainer_plus_server": remote_cpu,
            "cpu_ratio": remote_cpu / local_cpu,
        }
        for (local_wall, local_rows, remote_wall, remote_rows, load), (
            local_cpu,
            remote_cpu,
        ) in zip(pairs, cpu_pairs)
    ]
    result = {
        "config": {k: v for k, v in config.items() if k not in paths},
        "steps": len(pairs[0][1]),
        "runs": runs,
        "median_wall_ratio": float(np.median([r["wall_ratio"] for r in runs])),
        "median_step_time_ratio": float(np.median([r["step_time_ratio"] for r in runs])),
        "median_cpu_ratio": float(np.median([r["cpu_ratio"] for r in runs])),
        "same_steps": all(
            [r["step"] for r in local] == [r["step"] for r in remote]
            for _, local, _, remote, _ in pairs
        ),
        "max_relative_metric_difference": differences,
        "target_wall_ratio": 1.3,
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    score = commands.add_parser("score", help="scoring throughput and bytes (default)")
    score.add_argument("--models", nargs="+", default=["toy", "synthetic"])
    score.add_argument("--synthetic-vocab", type=int, default=TARGET_VOCAB)
    score.add_argument("--k", type=int, default=16)
    score.add_argument("--sequences", type=int, default=16)
    score.add_argument("--prompt-len", type=int, default=16)
    score.add_argument("--response-len", type=int, default=48)
    score.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    score.add_argument("--requests", type=int, default=8, help="requests per repeat, all clients")
    score.add_argument("--repeats", type=int, default=5)
    score.add_argument("--toy-cache", default=None, help="toy assets cache (default: the usual)")
    train = commands.add_parser("train", help="remote vs in-process training wall time")
    train.add_argument("--steps", type=int, default=0, help="0: the recipe's 40")
    train.add_argument("--toy-cache", default=None, help="toy assets cache (default: the usual)")
    train.add_argument("--repeats", type=int, default=1, help="alternating in-process/remote pairs")
    child = commands.add_parser("serve", help=argparse.SUPPRESS)
    child.add_argument("--model", required=True)
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--logits", action="store_true")
    for sub in (score, train, child):
        sub.add_argument("--device", default="cpu")
    for sub in (score, train):
        sub.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["score", *(argv or sys.argv[1:])])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "serve":
        return serve(args)
    date = datetime.date.today().isoformat()
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    out = args.out or str(REPO_ROOT / "bench" / "results" / f"serving-{device}-{date}.json")
    report = {"date": date, "argv": sys.argv, "machine": machine_info(), **git_info()}
    if os.path.exists(out):
        with open(out) as handle:
            report = {**json.load(handle), **report}
    if args.command == "score":
        rows_out: list = []
        with tempfile.TemporaryDirectory() as folder:
            for name in args.models:
                path = name
                if name == "toy":
                    from opd_fast.toy import toy_assets

                    path = toy_assets(cache_dir=args.toy_cache, progress=False).teacher_dir
                elif name == "synthetic":
                    path = synthetic_model(os.path.join(folder, "synthetic"), args.synthetic_vocab)
                bench_model(name, path, args, rows_out)
        add_ratios(rows_out)
        report["scoring"] = {"settings": vars(args), "rows": rows_out}
        report["scoring"]["targets"] = targets(rows_out)
    else:
        report["training"] = bench_training(args)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
