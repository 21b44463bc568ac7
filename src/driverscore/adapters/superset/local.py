"""A local Apache Superset for a home: its own environment, config, metadata and process.

Superset pins libraries the project does not use (SQLAlchemy 1.4, its own Flask), so it
gets an environment of its own, built once with pip from ``requirements.txt`` and shared
by every home: ``${XDG_CACHE_HOME:-~/.cache}/driverscore/superset-<version>-<hash>``, the
hash being that of the requirements file (a changed file builds a new environment; a
half-built one, without its marker, is built again). What belongs to a home lives under
``<home>/superset``: ``superset_config.py`` (the ``SECRET_KEY`` is generated once and
kept: Superset encrypts stored credentials with it), the SQLite metadata database, the
admin password, the imported bundle, ``superset.pid`` and ``superset.log``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from driverscore.adapters.superset.bundle import (
    BundleTarget,
    druid_sqlalchemy_uri,
    duckdb_sqlalchemy_uri,
)
from driverscore.errors import ConfigError, DriverscoreError
from driverscore.settings import Settings

__all__ = [
    "REQUIREMENTS",
    "LocalSuperset",
    "SupersetError",
    "default_venv_dir",
    "ensure_venv",
    "requirements_hash",
    "store_targets",
    "superset_state_dir",
    "venv_ready",
]

REQUIREMENTS: Final = Path(__file__).with_name("requirements.txt")
_MARKER: Final = ".driverscore-requirements"
#: Metadata set up (migrations, admin, roles) for this Superset version: a second `up`
#: skips the ~45 s of `db upgrade` and `init`.
_SETUP_MARKER: Final = "setup-done"
#: Supersets this process started, by pid: kept so the child is waited for when stopped
#: (and not reported as a leaked subprocess when the handle would be dropped).
_STARTED: Final[dict[int, subprocess.Popen[bytes]]] = {}


class SupersetError(DriverscoreError):
    """Superset could not be installed, set up, started or stopped."""


def requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]


def _superset_version() -> str:
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        if line.startswith("apache-superset=="):
            return line.split("==", 1)[1].strip()
    raise SupersetError(f"{REQUIREMENTS} does not pin apache-superset")


def default_venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "driverscore" / f"superset-{_superset_version()}-{requirements_hash()}"


def superset_state_dir(home: Path) -> Path:
    """Where ``driverscore superset up`` keeps the Superset of a home."""
    return (home / "superset").resolve()


def store_targets(settings: Settings, engine: str) -> list[BundleTarget]:
    """The stores the bundle points at: ``duckdb`` (the home's file), ``druid`` (the
    configured or recorded broker), ``both``, or ``auto``: DuckDB, and Druid when a Druid
    URL is configured or a local Druid recorded one."""
    from driverscore.adapters.druid.local import druid_state_dir, druid_url

    if engine not in ("auto", "duckdb", "druid", "both"):
        raise ConfigError(f"--engine {engine!r}: use auto, duckdb, druid or both")
    known_druid = (
        bool(settings.store.druid.url) or (druid_state_dir(settings.home) / "url").is_file()
    )
    targets: list[BundleTarget] = []
    if engine in ("auto", "duckdb", "both"):
        targets.append(BundleTarget("duckdb", duckdb_sqlalchemy_uri(settings.store_path)))
    if engine in ("druid", "both") or (engine == "auto" and known_druid):
        druid = settings.store.druid
        try:
            uri = druid_sqlalchemy_uri(druid_url(settings))
        except ValueError as exc:
            raise ConfigError(f"DRIVERSCORE_STORE__DRUID__URL: {exc}") from None
        targets.append(BundleTarget("druid", uri, druid.trips_datasource, druid.alerts_datasource))
    return targets


def venv_ready(venv: Path) -> bool:
    marker = venv / _MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == requirements_hash()


def _run(command: list[str], *, env: dict[str, str] | None = None, what: str) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip()).splitlines()
        last = output[-1] if output else f"exit code {done.returncode}"
        raise SupersetError(f"{what} failed: {last[-500:]}")
    return done.stdout


def ensure_venv(venv: Path, python: str = sys.executable) -> tuple[Path, bool]:
    """The environment at ``venv`` with ``requirements.txt`` installed, built when it is
    missing or was built from other requirements; returns it and whether it was built."""
    if venv_ready(venv):
        return venv, False
    if venv.exists():
        # Half-built or built from other requirements: start again rather than patch it.
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "venv", str(venv)], what=f"creating Superset's environment at {venv}")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "install", "-r", str(REQUIREMENTS)],
        what=f"pip install -r {REQUIREMENTS} into {venv} (needs network, ~800 MB)",
    )
    (venv / _MARKER).write_text(requirements_hash() + "\n", encoding="utf-8")
    return venv, True


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class LocalSuperset:
    """The Superset of one home (state in ``state_dir``) run from ``venv`` on ``port``."""

    state_dir: Path
    venv: Path
    port: int = 8088
    admin_user: str = "admin"
    timeout_s: float = 180.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "superset_config.py"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "superset.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "superset.log"

    def _kept_secret(self, name: str, nbytes: int) -> str:
        path = self.state_dir / name
        if not path.is_file():
            path.write_text(secrets.token_urlsafe(nbytes) + "\n", encoding="utf-8")
            path.chmod(0o600)
        return path.read_text(encoding="utf-8").strip()

    def admin_password(self) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self._kept_secret("admin_password", 12)

    def configure(self) -> Path:
        """Write ``superset_config.py`` (kept ``SECRET_KEY``, SQLite metadata here)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        secret_key = self._kept_secret("secret_key", 42)
        metadata = (self.state_dir / "superset.db").resolve()
        self.config_path.write_text(
            "# Written by `driverscore superset up`; edits are overwritten by the next `up`.\n"
            f"SECRET_KEY = {secret_key!r}\n"
            f"SQLALCHEMY_DATABASE_URI = {f'sqlite:///{metadata}'!r}\n"
            # The DuckDB store is a local file; Superset refuses only SQLite files.
            "PREVENT_UNSAFE_DB_CONNECTIONS = False\n"
            "SQLLAB_CTAS_NO_LIMIT = True\n"
            # One person's local Superset: no rate limiter storage to run.
            "RATELIMIT_ENABLED = False\n"
            "AUTH_RATE_LIMITED = False\n"
            "FEATURE_FLAGS = {'DASHBOARD_NATIVE_FILTERS': True}\n",
            encoding="utf-8",
        )
        return self.config_path

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SUPERSET_CONFIG_PATH": str(self.config_path),
            "FLASK_APP": "superset",
            "PYTHONWARNINGS": "ignore",
        }

    def _superset(self, *args: str, what: str) -> str:
        return _run([str(self.venv / "bin" / "superset"), *args], env=self._env(), what=what)

    def setup_metadata(self, template: Path | None = None) -> bool:
        """Migrations, the admin user and the roles, once per Superset version; returns
        whether it ran. With ``template`` (a folder), a metadata database set up before is
        copied from there (it holds no dashboards, datasets or credentials: a fresh
        Superset), or the one set up now is kept there: the tests' ~45-150 s, once."""
        marker = self.state_dir / _SETUP_MARKER
        version = _superset_version()
        if marker.is_file() and marker.read_text(encoding="utf-8").strip() == version:
            return False
        self.state_dir.mkdir(parents=True, exist_ok=True)
        kept = ("superset.db", "admin_password")
        if template is not None and all((template / name).is_file() for name in kept):
            for name in kept:
                shutil.copyfile(template / name, self.state_dir / name)
            marker.write_text(version + "\n", encoding="utf-8")
            return True
        self._superset("db", "upgrade", what="superset db upgrade")
        self._superset(
            "fab",
            "create-admin",
            "--username",
            self.admin_user,
            "--firstname",
            "driverscore",
            "--lastname",
            "admin",
            "--email",
            f"{self.admin_user}@localhost",
            "--password",
            self.admin_password(),
            what="superset fab create-admin",
        )
        self._superset("init", what="superset init")
        if template is not None:
            partial = template.with_name(template.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in kept:
                shutil.copyfile(self.state_dir / name, partial / name)
            shutil.rmtree(template, ignore_errors=True)
            partial.rename(template)
        marker.write_text(version + "\n", encoding="utf-8")
        return True

    def import_bundle(self, bundle: bytes) -> Path:
        """Import (overwrite) the dashboards, charts, datasets and databases of ``bundle``."""
        path = self.state_dir / "driverscore_bundle.zip"
        path.write_bytes(bundle)
        self._superset(
            "import-dashboards",
            "--path",
            str(path),
            "--username",
            self.admin_user,
            what=f"superset import-dashboards of {path} (see {self.log_file.name})",
        )
        return path

    def pid(self) -> int | None:
        """The running Superset's pid, or None (no pid file, or its process is gone)."""
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> str:
        """Start Superset in the background (gunicorn), wait for ``/health``; the URL."""
        if self.pid() is not None:
            if self.healthy():
                return self.url
            self.stop()
        if not _port_free(self.port):
            raise SupersetError(
                f"port {self.port} on 127.0.0.1 is taken: stop what listens there, or set "
                "DRIVERSCORE_SUPERSET__PORT"
            )
        command = [
            str(self.venv / "bin" / "gunicorn"),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--threads",
            "8",
            "--timeout",
            "120",
            "--limit-request-line",
            "0",
            "superset.app:create_app()",
        ]
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(
                command,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.state_dir,
            )
        self.pid_file.write_text(f"{process.pid}\n", encoding="utf-8")
        _STARTED[process.pid] = process
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                _STARTED.pop(process.pid, None)
                raise SupersetError(
                    f"superset exited with code {process.returncode} while starting: "
                    f"see {self.log_file}"
                )
            if self.healthy():
                return self.url
            time.sleep(1.0)
        self.stop()
        raise SupersetError(
            f"superset did not answer {self.url}/health within {self.timeout_s:.0f} s: "
            f"see {self.log_file}"
        )

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the running Superset (its process group); returns whether one ran."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Reap it when this process started it (tests): a zombie still "exists".
            if pid in _STARTED:
                _STARTED[pid].poll()
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                _STARTED.pop(pid, None)
                return True
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
        if pid in _STARTED:
            _STARTED.pop(pid).wait()
        return True

    def up(self, bundle: bytes) -> str:
        """Configure, set up the metadata once, import ``bundle``, start; the URL."""
        self.configure()
        self.setup_metadata()
        self.import_bundle(bundle)
        return self.start()
