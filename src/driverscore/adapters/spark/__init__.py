"""The Spark engine's adapters: the session, and import and prepare run on the executors.

Import only with the ``spark`` extra installed; nothing here starts Spark at import.
"""
