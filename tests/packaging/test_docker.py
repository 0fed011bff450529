"""docker/: the compose file, the example configuration and the image recipe, checked as files.

Where Docker Compose exists, ``docker compose config`` validates the file as well; everywhere, a
structural check of what the deployment needs (no image is built here).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgguard.settings import Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    found = compose["services"][name]
    assert isinstance(found, dict)
    return found


def environment(svc: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in svc.get("environment", {}).items()}


def test_services_and_start_order(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "state-init", "pgguard"}
    postgres = service(compose, "postgres")
    assert "healthcheck" in postgres
    init = service(compose, "state-init")
    assert init["entrypoint"][:4] == ["pgguard", "state", "init", "--apply"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    pgguard = service(compose, "pgguard")
    assert pgguard["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pgguard["depends_on"]["state-init"]["condition"] == "service_completed_successfully"


def test_pgguard_publishes_both_ports_and_checks_readyz(compose: dict[str, Any]) -> None:
    pgguard = service(compose, "pgguard")
    settings = example_settings(pgguard)
    published = {str(p).split(":")[-1].split("/")[0] for p in pgguard["ports"]}
    assert published == {str(settings.listen.port), str(settings.http.port)}
    assert settings.listen.host == "0.0.0.0"
    assert settings.http.host == "0.0.0.0"  # else the approval page is unreachable
    check = " ".join(pgguard["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.http.port}/readyz" in check


def test_keys_and_spool_live_on_a_named_volume(compose: dict[str, Any]) -> None:
    pgguard = service(compose, "pgguard")
    settings = example_settings(pgguard)
    mounts = {m.split(":")[1]: m.split(":")[0] for m in pgguard["volumes"]}
    volume = mounts[str(settings.data_dir)]
    assert volume in compose["volumes"]  # named, not a path: it outlives the container
    assert settings.ledger.spool_dir.is_relative_to(settings.data_dir)
    assert settings.ledger_signing_key_file().is_relative_to(settings.data_dir)
    assert mounts["/etc/pgguard/pgguard.toml"] == "./pgguard.toml"
    assert (DOCKER / "pgguard.toml").is_file()


def test_image_installs_the_wheel_without_the_demo_extra() -> None:
    recipe = (DOCKER / "Dockerfile").read_text()
    assert "pip install -e" not in recipe
    assert "pip wheel" in recipe
    assert "pgserver" not in recipe
    assert "[demo]" not in recipe
    assert "EXPOSE 6432 8080" in recipe


def example_settings(pgguard: dict[str, Any]) -> Settings:
    """docker/pgguard.toml with compose's environment for the pgguard service: valid."""
    env = environment(pgguard)
    overrides: dict[str, Any] = {"data_dir": env["PGGUARD_DATA_DIR"]}
    overrides["upstream"] = {"dsn": env["PGGUARD_UPSTREAM__DSN"]}
    overrides["state"] = {"dsn": env["PGGUARD_STATE__DSN"]}
    settings = Settings.load(DOCKER / "pgguard.toml", **overrides)
    assert settings.approvals_enabled()
    assert settings.agents
    return settings


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker here")
def test_docker_compose_config_accepts_it() -> None:
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip("docker has no compose plugin here")
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
