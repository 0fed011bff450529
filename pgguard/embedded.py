"""An embedded PostgreSQL server for the demo, the tests and the benchmarks.

Uses the binaries shipped in the ``pgserver`` wheel, but runs its own ``initdb``/``pg_ctl`` so it
can listen on TCP as well as a unix socket, serve TLS, and authenticate roles by SCRAM, md5 and
plain password - all the upstream configurations pgguard must handle. As root, PostgreSQL refuses
to run, so the server runs as the unprivileged ``pgserver`` system user (created if missing), as
pgserver itself does.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"
UPSTREAM_ROLES = {  # role -> (password, hba method); pgguard's upstream credentials in tests
    "pgguard_scram": ("scram-secret", "scram-sha-256"),
    "pgguard_md5": ("md5-secret", "md5"),
    "pgguard_password": ("plain-secret", "password"),
}


def pgserver_bin_dir() -> Path:
    # Located without importing pgserver: its import has side effects (runtime dirs, atexit).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("the pgserver package is not installed (pip install 'pgguard[demo]')")
    return Path(spec.origin).parent / "pginstall" / "bin"


def system_bin_dir() -> Path | None:
    """A Debian/Ubuntu PostgreSQL server installation, if any (it is built with TLS; pgserver's
    is not)."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    for version in sorted(root.iterdir(), key=lambda p: p.name, reverse=True):
        if (version / "bin" / "postgres").exists() and (version / "bin" / "initdb").exists():
            return version / "bin"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster in ``datadir``."""

    datadir: Path
    port: int = 0
    tls: bool = False
    log_statements: bool = False
    bin_dir: Path | None = None

    def __post_init__(self) -> None:
        self.bin_dir = self.bin_dir or pgserver_bin_dir()
        self.port = self.port or free_port()
        self._run_as = "pgserver" if os.geteuid() == 0 else None
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgg-"))

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> EmbeddedPostgres:
        self._prepare_user()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.datadir / "server.log"))
        self._create_roles()
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._pg_ctl("stop", "-w", "-m", mode)

    def restart(self) -> None:
        self.stop()
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.datadir / "server.log"))

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    # --- connection strings -------------------------------------------------------------

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def tcp_dsn(
        self, role: str = "pgguard_scram", dbname: str = "postgres", sslmode: str = "disable"
    ) -> str:
        password = UPSTREAM_ROLES[role][0]
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{dbname}?sslmode={sslmode}"

    def unix_dsn(self, role: str = "pgguard_scram", dbname: str = "postgres") -> str:
        password = UPSTREAM_ROLES[role][0]
        return f"postgresql://{role}:{password}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        result = subprocess.run(
            [
                str(self._bin / "psql"),
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout

    # --- internals ----------------------------------------------------------------------

    @property
    def _bin(self) -> Path:
        assert self.bin_dir is not None
        return self.bin_dir

    def _prepare_user(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._run_as is None:
            return
        if not _user_exists(self._run_as):
            subprocess.run(
                ["useradd", "-s", "/bin/false", self._run_as], check=True, capture_output=True
            )
        entry = pwd.getpwnam(self._run_as)
        for path in (self.datadir, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.datadir.chmod(0o700)
        _open_path_to(self.datadir)
        _open_path_to(self.socket_dir)
        _open_path_to(self._bin)

    def _run(self, args: list[str]) -> None:
        subprocess.run(args, check=True, capture_output=True, text=True, user=self._run_as, cwd="/")

    def _pg_ctl(self, *args: str) -> None:
        try:
            self._run([str(self._bin / "pg_ctl"), "-D", str(self.datadir), *args])
        except subprocess.CalledProcessError as exc:
            log_file = self.datadir / "server.log"
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"pg_ctl {args[0]} failed: {exc.stderr}\n{tail}") from exc

    def _initdb(self) -> None:
        self._run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 200",
            "shared_buffers = 64MB",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
        ]
        if self.log_statements:
            conf.append("log_statement = 'all'")
        if self.tls:
            self._write_certificate()
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write("\n".join(conf) + "\n")
        hba = ["local all all trust"]
        for role, (_, method) in UPSTREAM_ROLES.items():
            hba.append(f"host all {role} 127.0.0.1/32 {method}")
        hba.append("host all all 127.0.0.1/32 scram-sha-256")
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _write_certificate(self) -> None:
        cert, key = make_self_signed_certificate("localhost")
        for name, data in (("server.crt", cert), ("server.key", key)):
            path = self.datadir / name
            path.write_bytes(data)
            path.chmod(0o600)
            if self._run_as is not None:
                entry = pwd.getpwnam(self._run_as)
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _create_roles(self) -> None:
        statements = []
        for role, (password, method) in UPSTREAM_ROLES.items():
            encryption = "md5" if method == "md5" else "scram-sha-256"
            statements.append(
                f"SET password_encryption = '{encryption}'; "
                f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') "
                f"THEN CREATE ROLE {role} LOGIN SUPERUSER; END IF; END $$; "
                f"ALTER ROLE {role} PASSWORD '{password}';"
            )
        self.psql(" ".join(statements))


def make_self_signed_certificate(hostname: str) -> tuple[bytes, bytes]:
    """A throwaway certificate and key (PEM) for ``hostname`` and 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _open_path_to(path: Path) -> None:
    """Let the server's user traverse every directory down to ``path``."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)
