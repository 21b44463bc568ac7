"""The SparkSession of a run: built from the settings once per entry point, never at import.

Local mode needs only Java 17 (pyspark carries Spark's jars). ``s3://`` URIs are read by
Spark as ``s3a://`` through ``org.apache.hadoop:hadoop-aws`` of the Hadoop version inside
pyspark, fetched from Maven Central by ``spark.jars.packages`` unless the cluster has it
(EMR, Glue: set ``DRIVERSCORE_SPARK__HADOOP_AWS_VERSION=""``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from driverscore.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from driverscore.settings import Settings

__all__ = ["hadoop_version", "spark_path", "spark_session", "store_uri"]

_HADOOP_JAR: Final = re.compile(r"^hadoop-client-api-(\d+\.\d+\.\d+)\.jar$")


def hadoop_version() -> str:
    """The Hadoop version of the jars inside the installed pyspark (e.g. ``3.5.0``)."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    for jar in sorted(jars.glob("hadoop-client-api-*.jar")):
        found = _HADOOP_JAR.match(jar.name)
        if found:
            return found.group(1)
    raise ConfigError(
        f"no hadoop-client-api jar under {jars}: set DRIVERSCORE_SPARK__HADOOP_AWS_VERSION "
        "to the Hadoop version of your Spark"
    )


def spark_path(uri: str) -> str:
    """A store URI as Spark reads it: ``s3://`` through the s3a connector."""
    return "s3a://" + uri.removeprefix("s3://") if uri.startswith("s3://") else uri


def store_uri(spark_file_path: str) -> str:
    """A file path as Spark reports it (``file:/x``, ``s3a://b/k``, URL-quoted) as the
    URI the embedded engine names the same file by (``/x``, ``s3://b/k``)."""
    path = unquote(spark_file_path)
    if path.startswith("s3a://"):
        return "s3://" + path.removeprefix("s3a://")
    if path.startswith("file:"):
        return "/" + path.removeprefix("file:").lstrip("/")
    return path


def spark_session(settings: Settings) -> SparkSession:
    """The run's SparkSession (an existing one, under spark-submit, gets these settings too).

    Timestamps are UTC end to end (``spark.sql.session.timeZone``), so a ping's ``ts``
    crosses Spark unchanged; S3 settings (endpoint, keys) go to the s3a connector.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "--engine spark needs pyspark: pip install 'driverscore[spark]' (Java 17 too)"
        ) from None
    config = settings.spark
    builder = SparkSession.builder.appName(config.app_name)
    if config.master:
        builder = builder.master(config.master)
    conf: dict[str, str] = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Each Arrow batch is one call of the domain's frame functions: few large calls,
        # not one per 10 000 rows (Spark's default).
        "spark.sql.execution.arrow.maxRecordsPerBatch": "200000",
        # Spark's own progress bars would interleave with the command's progress lines.
        "spark.ui.showConsoleProgress": "false",
    }
    aws_version = (
        hadoop_version() if config.hadoop_aws_version is None else config.hadoop_aws_version
    )
    if aws_version:
        conf["spark.jars.packages"] = f"org.apache.hadoop:hadoop-aws:{aws_version}"
    if config.shuffle_partitions is not None:
        conf["spark.sql.shuffle.partitions"] = str(config.shuffle_partitions)
    conf.update(_s3a_conf(settings))
    conf.update(config.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    from pyspark import SparkConf

    master = config.master or SparkConf().get("spark.master", None)
    if master is None:
        # spark-submit sets spark.master; run from plain Python, Spark needs one.
        master = "local[*]"
        builder = builder.master(master)
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local workers must run this interpreter (its environment has driverscore), not
        # whatever python3 is first on the PATH; SparkContext reads only the variable.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = builder.getOrCreate()
    # An existing session (spark-submit's, a test's) takes only runtime settings from the
    # builder: the S3 settings go to its Hadoop configuration directly.
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    for key, value in _s3a_conf(settings).items():
        hadoop.set(key.removeprefix("spark.hadoop."), value)
    return spark


def _s3a_conf(settings: Settings) -> dict[str, str]:
    conf: dict[str, str] = {}
    prefix = "spark.hadoop.fs.s3a."
    if settings.s3_endpoint_url:
        conf[prefix + "endpoint"] = settings.s3_endpoint_url
        conf[prefix + "endpoint.region"] = settings.aws_region
        # MinIO, moto and other S3 APIs on one host answer on paths, not bucket subdomains.
        conf[prefix + "path.style.access"] = "true"
        if settings.s3_endpoint_url.startswith("http://"):
            conf[prefix + "connection.ssl.enabled"] = "false"
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        conf[prefix + "access.key"] = settings.aws_access_key_id.get_secret_value()
        conf[prefix + "secret.key"] = settings.aws_secret_access_key.get_secret_value()
        conf[prefix + "aws.credentials.provider"] = (
            "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
        )
    conf[prefix + "attempts.maximum"] = str(settings.s3_max_attempts)
    return conf
