"""The Kubernetes manifests of a job (``ps-launch k8s``): pure functions from a ``K8sJob`` to dicts.

Example::

    >>> job = K8sJob(name="digits", image="me/train:1", command=("python", "train.py"), num_workers=2)
    >>> [(d["kind"], d["metadata"]["name"]) for d in manifests(job, secret_json="{}")]
    [('Secret', 'digits-secret'), ('Service', 'digits-scheduler'), ('Job', 'digits-scheduler'), ('Job', 'digits-servers'), ('Job', 'digits-workers')]

The scheduler is a Job of one pod behind a headless Service (``NAME-scheduler``: servers and workers
find it by that name); servers and workers are Indexed Jobs whose completion index is their
``PS_RANK``. Every pod binds and advertises its pod IP. The job secret is a Secret mounted read-only.
Every Job has ``backoffLimit: 0``: a pod that fails is not retried, its Job fails, and the others
fail in turn once they lose it (there is no launcher in the cluster to stop them sooner).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import SchedulerConfig, Timing, config_to_env
from ..errors import ConfigError

DEFAULT_PORT = 29400
SECRET_DIR = "/etc/psframework"
SECRET_FILE = f"{SECRET_DIR}/secret.json"
_INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_NAME = 40  # Kubernetes names are at most 63; the pods' names add suffixes


@dataclass(frozen=True)
class K8sJob:
    """What to generate: the job's name, image, worker command, sizes and resources."""

    name: str
    image: str
    command: tuple[str, ...]
    num_workers: int = 1
    num_servers: int = 1
    mode: str = "sync"
    staleness: int = 2
    server_device: Optional[str] = None
    gpus_per_worker: int = 0
    port: int = DEFAULT_PORT
    python: str = "python"  # the interpreter in the image, for the scheduler and servers
    auth: str = "token"
    env: tuple[tuple[str, str], ...] = ()
    timing: Timing = field(default_factory=lambda: Timing(start_timeout=300.0))  # pods wait for images

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name) or len(self.name) > _MAX_NAME:
            raise ConfigError(f"--name {self.name!r}: a Kubernetes name is lower-case letters, digits and '-', "
                              f"starting and ending with a letter or digit, at most {_MAX_NAME} characters here")
        if not self.command:
            raise ConfigError("no command to run: put the worker command after the options, "
                              "e.g. ps-launch k8s --name j --image IMG -- python train.py")
        for count, option in ((self.num_workers, "-n"), (self.num_servers, "-s")):
            if count < 1:
                raise ConfigError(f"{option} {count}: a job needs at least 1")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.auth not in ("token", "curve", "none"):
            raise ConfigError(f"--auth must be token, curve or none; got {self.auth!r}")
        self.scheduler_config()  # mode, staleness and device by the core's own rules

    @property
    def scheduler_address(self) -> str:
        return f"tcp://{self.name}-scheduler:{self.port}"

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(num_workers=self.num_workers, num_servers=self.num_servers, mode=self.mode,
                               staleness=self.staleness, port=self.port, server_device=self.server_device,
                               timing=self.timing, secret_file=SECRET_FILE if self.auth != "none" else None)


def manifests(job: K8sJob, secret_json: Optional[str]) -> list[dict[str, Any]]:
    """The Secret (when ``secret_json`` is given), the Service and the three Jobs, in apply order."""
    docs = [_secret(job, secret_json)] if secret_json is not None else []
    python = [job.python, "-m", "psframework"]
    docs += [
        _service(job),
        _job(job, "scheduler", 1, [*python, "scheduler", "--bind", "$(PS_BIND)", "--port", str(job.port)]),
        _job(job, "server", job.num_servers, [*python, "server", "--rank", "$(PS_RANK)", "--scheduler",
                                              "$(PS_SCHEDULER)", "--bind", "$(PS_BIND)"]),
        _job(job, "worker", job.num_workers, list(job.command)),
    ]
    return docs


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """One YAML stream for ``kubectl apply -f``: JSON is YAML, so no YAML library is needed."""
    return "".join(f"---\n{json.dumps(doc, indent=2)}\n" for doc in docs)


def _labels(job: K8sJob, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "psframework", "psframework/job": job.name, "psframework/role": role}


def _secret(job: K8sJob, secret_json: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"{job.name}-secret", "labels": _labels(job, "secret")},
            "stringData": {"secret.json": secret_json}}


def _service(job: K8sJob) -> dict[str, Any]:
    # headless, and published before the scheduler is ready: nodes resolve it while they retry
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{job.name}-scheduler", "labels": _labels(job, "scheduler")},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": _labels(job, "scheduler"), "ports": [{"name": "ps", "port": job.port}]}}


def _job(job: K8sJob, role: str, count: int, argv: list[str]) -> dict[str, Any]:
    name = f"{job.name}-{role if role == 'scheduler' else role + 's'}"
    spec: dict[str, Any] = {"completions": count, "parallelism": count, "backoffLimit": 0,
                            "template": {"metadata": {"labels": _labels(job, role)}, "spec": _pod(job, role, argv)}}
    if role != "scheduler":
        spec["completionMode"] = "Indexed"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": _labels(job, role)},
            "spec": spec}


def _pod(job: K8sJob, role: str, argv: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": role, "image": job.image, "command": argv, "env": container_env(job, role)}
    if role == "worker" and job.gpus_per_worker:
        container["resources"] = {"limits": {"nvidia.com/gpu": job.gpus_per_worker}}
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if job.auth != "none":
        container["volumeMounts"] = [{"name": "ps-secret", "mountPath": SECRET_DIR, "readOnly": True}]
        pod["volumes"] = [{"name": "ps-secret", "secret": {"secretName": f"{job.name}-secret", "defaultMode": 0o400}}]
    return pod


def container_env(job: K8sJob, role: str) -> list[dict[str, Any]]:
    """The container's environment: what ps-launch would set, the pod's own values from the API."""
    fixed = {**dict(job.env), **config_to_env(job.scheduler_config()), "PS_JOB_ID": job.name, "PS_ROLE": role,
             "PYTHONUNBUFFERED": "1"}
    if role != "scheduler":
        fixed["PS_SCHEDULER"] = job.scheduler_address
    env = [{"name": k, "value": v} for k, v in fixed.items()]
    env += [_field("PS_BIND", "status.podIP"), _field("PS_HOST", "metadata.name")]
    if role != "scheduler":
        env.append(_field("PS_RANK", _INDEX_ANNOTATION))
    return env


def _field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


__all__ = ["DEFAULT_PORT", "K8sJob", "SECRET_FILE", "container_env", "manifests", "to_yaml"]
