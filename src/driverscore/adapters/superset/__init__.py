"""Apache Superset on the score store: the bundle (``bundle.py``: databases, datasets,
charts and dashboards for DuckDB and Druid) and a local Superset (``local.py``) that
`driverscore superset up` installs, configures, fills and starts (docs/superset.md)."""
