"""Cluster ids for a new KRaft storage, as Kafka's own ``Uuid.randomUuid().toString()`` makes them.

``broker.sh`` runs this file as a script (standard library only, so any ``python3`` will
do): ``python3 -I cluster_id.py`` prints one id.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable

__all__ = ["new_cluster_id"]


def _uuid4_bytes() -> bytes:
    return uuid.uuid4().bytes


def new_cluster_id(random_bytes: Callable[[], bytes] = _uuid4_bytes) -> str:
    """A random UUID as 22 characters of unpadded url-safe base64, never starting with ``-``.

    One id in 64 would start with ``-`` (first six bits ``111110``), and
    ``kafka-storage format -t <id>`` then reads the id as an option. Kafka draws again in
    that case; so does this.
    """
    while True:
        text = base64.urlsafe_b64encode(random_bytes()).rstrip(b"=").decode("ascii")
        if not text.startswith("-"):
            return text


if __name__ == "__main__":
    print(new_cluster_id())
