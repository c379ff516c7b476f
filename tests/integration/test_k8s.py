"""``ps-launch k8s``: the manifests validate against Kubernetes' schemas (offline), and the job they
describe trains when each pod's command runs here as a process with exactly the environment the
manifests declare. No Kubernetes cluster runs here: the pod IP is 127.0.0.1, the scheduler's
Service name is 127.0.0.1, the Secret's mount a local directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from psframework.launch.cli import main
from tests.integration.launch_helpers import REPO, TRAIN_SCRIPT, assert_no_leftovers, reference_params
from tests.ports import free_port

pytestmark = pytest.mark.timeout(120)

K8S_VERSION = "1.30.0"
PY = sys.executable


def _generate(tmp_path: Path, name: str, *options: str) -> list[dict]:
    out = tmp_path / "job.yaml"
    result = CliRunner().invoke(main, ["k8s", "--name", name, "--image", "registry.example/train:1", "-o", str(out),
                                       *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o077 == 0, "the file holds the job secret"
    return [json.loads(doc) for doc in out.read_text().split("---\n") if doc.strip()]


def test_manifests_validate_against_the_kubernetes_schemas(tmp_path):
    kv = pytest.importorskip("kubernetes_validate")
    docs = _generate(tmp_path, "digits", "-n", "4", "-s", "2", "--gpus-per-worker", "1", "--", "python", "train.py")
    assert [d["kind"] for d in docs] == ["Secret", "Service", "Job", "Job", "Job"]
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)
    workers = docs[-1]["spec"]
    assert (workers["completions"], workers["completionMode"]) == (4, "Indexed")
    assert workers["template"]["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    broken = json.loads(json.dumps(docs[-1]))
    broken["spec"]["template"]["spec"]["containers"][0]["enviroment"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_bad_name_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["k8s", "--name", "Bad_Name", "--image", "x", "--", "python", "t.py"])
    assert result.exit_code == 2 and "Kubernetes name" in result.output


def _pod_env(container: dict, job_name: str, index: int, secret_dir: Path, service: str) -> dict[str, str]:
    """The container's env as the kubelet would make it, with this machine standing in for the cluster."""
    field_values = {"status.podIP": "127.0.0.1", "metadata.name": f"{job_name}-{index}",
                    "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index)}
    env = {}
    for item in container["env"]:
        value = item["value"] if "value" in item else field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
        for mount in container.get("volumeMounts", []):
            value = value.replace(mount["mountPath"], str(secret_dir))
        env[item["name"]] = value.replace(f"tcp://{service}:", "tcp://127.0.0.1:")
    return env


def _emulate(docs: list[dict], tmp_path: Path) -> dict[str, list[subprocess.Popen]]:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    for doc in docs:
        if doc["kind"] == "Secret":
            for key, text in doc["stringData"].items():
                (secret_dir / key).write_text(text)
                (secret_dir / key).chmod(0o400)  # the Secret's defaultMode
    service = next(d for d in docs if d["kind"] == "Service")["metadata"]["name"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    base["PYTHONPATH"] = str(REPO)
    pods: dict[str, list[subprocess.Popen]] = {}
    for job in (d for d in docs if d["kind"] == "Job"):
        container = job["spec"]["template"]["spec"]["containers"][0]
        role = container["name"]
        for index in range(job["spec"]["completions"]):
            env = _pod_env(container, job["metadata"]["name"], index, secret_dir, service)
            argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], word) for word in container["command"]]
            log = open(tmp_path / f"{role}-{index}.log", "w")
            pods.setdefault(role, []).append(subprocess.Popen(argv, env={**base, **env}, cwd=REPO, stdout=log,
                                                              stderr=subprocess.STDOUT, start_new_session=True))
    return pods


def test_the_manifests_job_trains(tmp_path):
    name = f"pstest-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    out.mkdir()
    docs = _generate(tmp_path, name, "-n", "2", "-s", "2", "--port", str(free_port()), "--python", PY,
                     "--server-device", "cpu", "--", PY, str(TRAIN_SCRIPT), str(out))
    pods = _emulate(docs, tmp_path)
    try:
        deadline = time.monotonic() + 90
        for pod in (*pods["worker"], *pods["server"], *pods["scheduler"]):
            code = pod.wait(timeout=max(1.0, deadline - time.monotonic()))
            logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
            assert code == 0, logs
    finally:
        for pod in (p for group in pods.values() for p in group):
            if pod.poll() is None:
                os.killpg(pod.pid, 9)
                pod.wait()
    reference = reference_params()
    for rank in range(2):
        info = json.loads((out / f"worker-{rank}.json").read_text())
        assert (info["host"], info["bind"]) == (f"{name}-workers-{rank}", "127.0.0.1")
        params = torch.load(out / f"worker-{rank}.pt")
        for key, value in reference.items():
            assert torch.allclose(params[key], value, atol=1e-6), key
    assert_no_leftovers(name)
