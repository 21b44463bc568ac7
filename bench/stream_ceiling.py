"""The ceiling runner of ``bench_stream.py``: Quix Streams with no processing at all.

One Quix Streams ``Application`` (same client library, same commit interval and guarantee
as ``driverscore stream``) consumes the pings topic as raw bytes and produces one small
message per input message to the output topic, keyed like the input. Each output carries
the header ``driverscore.close_trigger_ms`` = the input message's Kafka timestamp (ms), so
the benchmark measures its latency exactly as it measures the processor's.

Usage (started by ``bench_stream.py``)::

    python bench/stream_ceiling.py --bootstrap HOST:PORT --input T --output T --group G \
        --guarantee at-least-once --state-dir DIR --commit-interval 0.2
"""

from __future__ import annotations

import argparse
from typing import Any

TRIGGER_HEADER = "driverscore.close_trigger_ms"


def _trigger_header(
    _value: Any, _key: Any, timestamp: int, _headers: Any
) -> list[tuple[str, bytes]]:
    return [(TRIGGER_HEADER, str(timestamp).encode())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--guarantee", choices=["at-least-once", "exactly-once"], required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--commit-interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()

    from quixstreams import Application

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        processing_guarantee=args.guarantee,
        loglevel="WARNING",
        commit_interval=args.commit_interval,
    )
    source = app.topic(args.input, key_deserializer="bytes", value_deserializer="bytes")
    sink = app.topic(args.output, key_serializer="bytes", value_serializer="bytes")
    sdf = app.dataframe(source)
    sdf = sdf.set_headers(_trigger_header)
    sdf = sdf.apply(lambda _value: b"1")
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
