"""Errors a user can act on.

Entry points catch :class:`DriverscoreError` and print its message as one line, then exit
non-zero (the command line's exit codes are in ``docs/operations.md``); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class DriverscoreError(Exception):
    """A problem the user can fix: the message says what, where and what to do."""


class InputDataError(DriverscoreError):
    """An input file, column or value cannot be read as telemetry."""


class ConfigError(DriverscoreError):
    """A setting, mapping file or command-line option is wrong."""


class NoModelError(DriverscoreError):
    """No registered model answers to the requested alias."""


class GateFailedError(DriverscoreError):
    """A candidate model did not pass the validation gate (it is recorded, without an alias)."""


class StorageError(DriverscoreError):
    """An object store (S3 API) cannot be reached, or finds no credentials to sign with."""


class RegistryError(DriverscoreError):
    """The model registry's database cannot be opened (corrupt, or not an MLflow database)."""


class AliasMoveError(DriverscoreError):
    """An alias move was refused: the alias is not where the mover expected (someone moved
    it first), the version is unknown, or another mover holds the lease too long."""


class ScoringServiceError(DriverscoreError):
    """The scoring service cannot score for the stream (down, failing, or refusing its token).

    Nothing of the batch was scored; the stream stops without committing so its trips are
    processed again once the service answers.
    """
