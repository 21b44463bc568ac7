"""spark-submit entry point: the driverscore CLI inside a Spark application.

    spark-submit --master yarn deploy/spark/driverscore_job.py \
        train --engine spark --pings s3://bucket/pings/ --labels s3://bucket/incidents.parquet

The session spark-submit configured is the one the run uses (``spark_session`` finds it);
the executors need the driverscore package too (``pip install 'driverscore[spark]'`` in
the image, or ``--py-files`` / ``--archives`` with a packed environment).
"""

from driverscore.cli import main

if __name__ == "__main__":
    main()
