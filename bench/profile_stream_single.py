"""Where a single-ping message's time goes in the processor, without a broker.

Single-ping messages of a simulated day go through ``PingProcessor.process`` with the
partition state in a real Quix RocksDB store (``QuixScope``), checkpointed like the Kafka
processor does (every ``--checkpoint`` messages: ``prepare`` + ``flush``). Trips that close
are not scored (scoring is per trip, not per ping). Prints µs per message, the changed
keys per message (each is one changelog record at a checkpoint), and with ``--profile``
a pyinstrument profile of the loop.

    .venv/bin/python bench/profile_stream_single.py --vehicles 30 --profile

``--against REF`` compares with another commit in the same command: the commit's
``src/`` (``git archive``) and this tree's each run the loop in a fresh process, taking
turns ``--rounds`` times, so both meet the same load of a shared machine; it prints each
round, the median CPU µs per message of each and their ratio.

    .venv/bin/python bench/profile_stream_single.py --vehicles 20 --against main --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from quixstreams.state.rocksdb import RocksDBStorePartition

from driverscore.adapters.kafka.messages import encode_ping
from driverscore.domain.sessions import ClosedSession, SessionRules, TripAssembler
from driverscore.services.stream.metrics import StreamMetrics
from driverscore.services.stream.processor import PingProcessor
from driverscore.services.stream.quix_state import QuixScope
from driverscore.settings import KafkaTopics
from driverscore.simulation import DirtConfig, SimulationConfig, simulate


class _NoScoring:
    def close_sessions(self, sessions: list[ClosedSession]) -> list[Any]:
        return []


def _run(src: Path | None, args: argparse.Namespace) -> dict[str, float]:
    """One measurement in a fresh process, with ``src`` first on the path (None: this tree)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-W", "ignore", __file__, "--json"]
    command += ["--vehicles", str(args.vehicles), "--checkpoint", str(args.checkpoint)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _compare(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", args.against, "src"],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        baseline_src = Path(folder) / "src"
        runs: dict[str, list[dict[str, float]]] = {args.against: [], "this tree": []}
        for round_ in range(args.rounds):
            for name, src in ((args.against, baseline_src), ("this tree", None)):
                result = _run(src, args)
                runs[name].append(result)
                print(
                    f"round {round_ + 1}  {name:>12}: {result['cpu_us']:.2f} µs CPU/message, "
                    f"{result['wall_us']:.2f} µs wall, {result['changed']:.3f} changed keys",
                    flush=True,
                )
    base = statistics.median(r["cpu_us"] for r in runs[args.against])
    base_min = min(r["cpu_us"] for r in runs[args.against])
    mine_min = min(r["cpu_us"] for r in runs["this tree"])
    mine = statistics.median(r["cpu_us"] for r in runs["this tree"])
    print(
        f"median CPU per message: {args.against} {base:.2f} µs, this tree {mine:.2f} µs: "
        f"{mine / base:.3f}× ({(1 - mine / base) * 100:+.1f} % less CPU); "
        f"fastest round: {base_min:.2f} µs against {mine_min:.2f} µs: {mine_min / base_min:.3f}×"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=30)
    parser.add_argument("--checkpoint", type=int, default=7000, help="messages per checkpoint")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--against", help="a git commit to compare with (its src/)")
    parser.add_argument("--rounds", type=int, default=5, help="turns each with --against")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --against)")
    args = parser.parse_args()
    if args.against:
        _compare(args)
        return
    pings = simulate(
        SimulationConfig(vehicles=args.vehicles, days=1, seed=7, dirt=DirtConfig.clean())
    ).pings.sort("ts")
    messages = [(encode_ping(row), str(row["vehicle_id"])) for row in pings.iter_rows(named=True)]
    processor = PingProcessor(
        _NoScoring(),  # type: ignore[arg-type]
        TripAssembler(SessionRules.of(300.0, 60.0), defer=True),
        KafkaTopics(),
        StreamMetrics(),
        batch_trips=200,
        batch_wait_s=0.1,
    )
    with tempfile.TemporaryDirectory() as folder:
        store = RocksDBStorePartition(str(Path(folder) / "state"))
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        changed = 0
        started, cpu = time.perf_counter(), time.process_time()
        transaction = store.begin()
        scope = None
        for i, (value, key) in enumerate(messages):
            state = transaction.as_state(prefix=key)
            if scope is None:  # one per transaction, as ``quix_step`` keeps it
                scope = QuixScope(state, ("pings", 0))
            processor.process(value, key, 0, [], scope, "pings/0/0")
            if (i + 1) % args.checkpoint == 0 or i + 1 == len(messages):
                updates = transaction._update_cache.get_updates()
                changed += sum(len(v) for v in updates.values())
                changed += len(transaction._update_cache.get_deletes())
                transaction.prepare()
                transaction.flush()
                transaction = store.begin()
                scope = None
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if profiler is not None:
            profiler.stop()
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "cpu_us": cpu / len(messages) * 1e6,
                    "wall_us": elapsed / len(messages) * 1e6,
                    "changed": changed / len(messages),
                }
            )
        )
        return
    print(
        f"{len(messages):,} single-ping messages: {elapsed / len(messages) * 1e6:.1f} µs/message "
        f"({cpu / len(messages) * 1e6:.1f} µs CPU), "
        f"{changed / len(messages):.3f} changed keys/message (changelog records)"
    )
    if profiler is not None:
        print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
