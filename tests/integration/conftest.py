"""A real S3 API server for the suite: moto's server over HTTP on a free localhost port.

Clients talk to it exactly as to S3 (signed HTTP requests through botocore / s3fs), so
the code under test takes the same path it takes against AWS, MinIO or Ceph.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

_REGION = "us-east-1"
#: Dummy credentials: moto accepts any, and botocore refuses to sign without some.
_ACCESS_KEY = "driverscore-test"
_SECRET_KEY = "driverscore-test-secret"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 API listens and a bucket created for the session."""

    endpoint_url: str
    bucket: str
    region: str = _REGION

    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options, shaped like ``Settings.storage_options()``."""
        return {
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            "key": _ACCESS_KEY,
            "secret": _SECRET_KEY,
        }

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def fresh_prefix(self, name: str) -> str:
        """A URI under a prefix no other test uses (the server lives for the session)."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 API server on 127.0.0.1 and a free port; stop it after the session.

    Credentials and region are set in the environment for the session (and restored
    after), so boto3 clients and s3fs built without explicit keys also reach it.
    """
    from moto.server import ThreadedMotoServer

    from driverscore.adapters.storage import filesystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", _ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", _SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", _REGION)
        # A developer's own profile or session token must not leak into the tests.
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            host, port = server.get_host_and_port()
            s3 = S3Server(endpoint_url=f"http://{host}:{port}", bucket="driverscore-test")
            fs, _ = filesystem(s3.uri(), s3.storage_options())
            # Not fs.mkdir: s3fs would send LocationConstraint=us-east-1, which S3 refuses.
            fs.call_s3("create_bucket", Bucket=s3.bucket)
            yield s3
        finally:
            server.stop()
