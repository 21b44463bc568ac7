"""Where a single-ping message's time goes in the processor, without a broker.

Single-ping messages of a simulated day go through ``PingProcessor.process`` with the
partition state in a real Quix RocksDB store (``QuixScope``), checkpointed like the Kafka
processor does (every ``--checkpoint`` messages: ``prepare`` + ``flush``). Trips that close
are not scored (scoring is per trip, not per ping). Prints µs per message, the changed
keys per message (each is one changelog record at a checkpoint), and with ``--profile``
a pyinstrument profile of the loop (``cProfile``'s when pyinstrument is not installed).

    .venv/bin/python bench/profile_stream_single.py --vehicles 30 --profile

``--against REF`` compares with another commit in the same command: the commit's
``src/`` (``git archive``) and this tree's code each replay the same messages in a process
of their own, taking turns every ``--step`` messages, so the load of a shared machine
falls on both alike; per round it prints the CPU µs per message of each and the ratio.

    .venv/bin/python bench/profile_stream_single.py --vehicles 20 --against main --rounds 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
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


class _Replay:
    """The single-ping messages of a simulated day through the processor, in steps."""

    def __init__(self, vehicles: int, checkpoint: int, folder: str) -> None:
        pings = simulate(
            SimulationConfig(vehicles=vehicles, days=1, seed=7, dirt=DirtConfig.clean())
        ).pings.sort("ts")
        self.messages = [
            (encode_ping(row), str(row["vehicle_id"])) for row in pings.iter_rows(named=True)
        ]
        self.processor = PingProcessor(
            _NoScoring(),  # type: ignore[arg-type]
            TripAssembler(SessionRules.of(300.0, 60.0), defer=True),
            KafkaTopics(),
            StreamMetrics(),
            batch_trips=200,
            batch_wait_s=0.1,
        )
        self.checkpoint = checkpoint
        self.store = RocksDBStorePartition(str(Path(folder) / "state"))
        self.transaction = self.store.begin()
        self.scope: QuixScope | None = None
        self.done = 0
        self.changed = 0

    def step(self, count: int) -> None:
        """The next ``count`` messages, checkpointed like the Kafka processor."""
        end = min(self.done + count, len(self.messages))
        for i in range(self.done, end):
            value, key = self.messages[i]
            state = self.transaction.as_state(prefix=key)
            if self.scope is None:  # one per transaction, as ``quix_step`` keeps it
                self.scope = QuixScope(state, ("pings", 0))
            self.processor.process(value, key, 0, [], self.scope, "pings/0/0")
            if (i + 1) % self.checkpoint == 0 or i + 1 == len(self.messages):
                # Counted once prepared: the processor may write at that moment too.
                self.transaction.prepare()
                updates = self.transaction._update_cache.get_updates()
                self.changed += sum(len(v) for v in updates.values())
                self.changed += len(self.transaction._update_cache.get_deletes())
                self.transaction.flush()
                self.transaction = self.store.begin()
                self.scope = None
        self.done = end


def _serve(args: argparse.Namespace) -> None:
    """For ``--against``: run the number of messages each stdin line asks, print the CPU."""
    with tempfile.TemporaryDirectory() as folder:
        replay = _Replay(args.vehicles, args.checkpoint, folder)
        print(json.dumps({"messages": len(replay.messages)}), flush=True)
        for line in sys.stdin:
            cpu = time.process_time()
            replay.step(int(line))
            cpu = time.process_time() - cpu
            print(json.dumps({"cpu_s": cpu, "changed": replay.changed}), flush=True)
        replay.store.close()


class _Runner:
    """One ``--serve`` process: this tree's code, or another commit's ``src``."""

    def __init__(self, name: str, src: Path | None, args: argparse.Namespace) -> None:
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-W", "ignore", __file__, "--serve"]
        command += ["--vehicles", str(args.vehicles), "--checkpoint", str(args.checkpoint)]
        self.name = name
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.messages = int(self._answer()["messages"])
        self.cpu_s = 0.0
        self.changed = 0

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.name} runner stopped (exit {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def step(self, count: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        answer = self._answer()
        self.cpu_s += answer["cpu_s"]
        self.changed = int(answer["changed"])
        return float(answer["cpu_s"])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def _compare(args: argparse.Namespace) -> None:
    """Both versions replay the same messages in the same steps, taking turns step by step
    (who goes first alternates), so a shared machine's load of the moment falls on both."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", args.against, "src"],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        for round_ in range(args.rounds):
            base = _Runner(args.against, Path(folder) / "src", args)
            mine = _Runner("this tree", None, args)
            if base.messages != mine.messages:  # each simulates with its own code
                raise SystemExit(
                    f"error: {args.against} simulates {base.messages:,} messages, this tree "
                    f"{mine.messages:,}: compare with a commit whose simulator gives the same day"
                )
            ratios: list[float] = []
            step = 0
            while step * args.step < base.messages:
                pair = (base, mine) if step % 2 == 0 else (mine, base)
                cpu = {runner.name: runner.step(args.step) for runner in pair}
                ratios.append(cpu["this tree"] / cpu[args.against])
                step += 1
            base.close()
            mine.close()
            n = base.messages
            print(
                f"round {round_ + 1}: {n:,} single-ping messages, CPU per message "
                f"{args.against} {base.cpu_s / n * 1e6:.2f} µs, this tree "
                f"{mine.cpu_s / n * 1e6:.2f} µs: {mine.cpu_s / base.cpu_s:.3f}× "
                f"(median of {len(ratios)} steps {statistics.median(ratios):.3f}×); "
                f"changed keys/message {base.changed / n:.3f} and {mine.changed / n:.3f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=30)
    parser.add_argument("--checkpoint", type=int, default=7000, help="messages per checkpoint")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--against", help="a git commit to compare with (its src/)")
    parser.add_argument("--rounds", type=int, default=3, help="replays of each with --against")
    parser.add_argument("--step", type=int, default=1000, help="messages per turn (--against)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against:
        _compare(args)
        return
    if args.serve:
        _serve(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        replay = _Replay(args.vehicles, args.checkpoint, folder)
        profiler = cprofiler = None
        if args.profile:
            try:
                from pyinstrument import Profiler
            except ImportError:  # not in the lock file: the standard library's profiler
                cprofiler = cProfile.Profile()
            else:
                profiler = Profiler(interval=0.0005)
        started, cpu = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.start()
        if cprofiler is not None:
            cprofiler.enable()
        replay.step(len(replay.messages))
        if cprofiler is not None:
            cprofiler.disable()
        if profiler is not None:
            profiler.stop()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        replay.store.close()
    n = len(replay.messages)
    print(
        f"{n:,} single-ping messages: {elapsed / n * 1e6:.1f} µs/message "
        f"({cpu / n * 1e6:.1f} µs CPU), "
        f"{replay.changed / n:.3f} changed keys/message (changelog records)"
    )
    if profiler is not None:
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    if cprofiler is not None:  # deterministic, so calls weigh more than in a sampler
        pstats.Stats(cprofiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
