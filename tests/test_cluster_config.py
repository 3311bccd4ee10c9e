"""cluster.yaml, checked offline against the autoscaler schema inside the installed Ray wheel."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_rays_own_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any field the launcher would refuse
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_workers"]["resources"]["GPU"] = 0.5  # node resources are integers
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        validate_config(prepare_config(broken))


def test_head_runs_no_work_and_keeps_the_dashboard_on_loopback_with_tokens(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    permissions = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in permissions] == [(22, 22)]  # SSH only from outside
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in permissions for r in p["IpRanges"])


def test_worker_groups_scale_from_zero_and_gpus_live_on_gpu_nodes(config):
    types = config["available_node_types"]
    cpu, gpu = types["cpu_workers"], types["gpu_workers"]
    assert cpu["min_workers"] == 0 and gpu["min_workers"] == 0 and config["idle_timeout_minutes"] > 0
    assert gpu["resources"]["GPU"] >= 1 and gpu["labels"] == {"facejobs-pool": "gpu"}
    assert "GPU" not in cpu["resources"] and cpu["labels"] == {"facejobs-pool": "cpu"}


def test_every_node_installs_this_checkout_and_no_credentials_appear(config):
    assert config["file_mounts"] == {"/home/ubuntu/facejobs": ".",
                                     "/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"}  # the token, not in git
    assert any("-e ~/facejobs" in command for command in config["setup_commands"])
    for start in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        # Submitted jobs run `facejobs run`: the environment's bin is on the PATH Ray's processes inherit.
        assert "export PATH=$HOME/facejobs-env/bin:$PATH;" in start and start.index("PATH") < start.index("ray start")
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"(?i)aws_(secret_)?access_key|secret_access|session_token|AKIA[0-9A-Z]{16}", text)
    for node_type in config["available_node_types"].values():
        assert "IamInstanceProfile" in node_type["node_config"]  # the instance role gives credentials


# -- the KubeRay alternative, kept in step with cluster.yaml ---------------------

@pytest.fixture(scope="module")
def kuberay() -> dict:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "raycluster.yaml").read_text()))
    return {document["kind"]: document for document in documents}


def test_kuberay_cluster_matches_cluster_yaml(kuberay, config):
    import ray

    cluster = kuberay["RayCluster"]["spec"]
    assert kuberay["RayCluster"]["apiVersion"] == "ray.io/v1" and cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    launcher = config["available_node_types"]
    for name, node_type in (("cpu-workers", "cpu_workers"), ("gpu-workers", "gpu_workers")):
        group = groups[name]
        assert group["minReplicas"] == launcher[node_type]["min_workers"] == 0
        assert group["maxReplicas"] == launcher[node_type]["max_workers"]
        labels = dict(pair.split("=") for pair in group["rayStartParams"]["labels"].split(","))
        assert labels == launcher[node_type]["labels"]
    gpu_limits = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1" == str(launcher["gpu_workers"]["resources"]["GPU"])
    assert "nvidia.com/gpu" not in groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] and cluster["autoscalerOptions"]["idleTimeoutSeconds"] == (
        60 * config["idle_timeout_minutes"])

    pods = [head["template"]["spec"]] + [group["template"]["spec"] for group in groups.values()]
    assert len({pod["containers"][0]["image"] for pod in pods}) == 1  # one image, every node the same
    sidecar = {item["name"]: item for item in cluster["autoscalerOptions"]["env"]}
    assert sidecar["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in sidecar
    for pod in pods:
        assert pod["serviceAccountName"] == kuberay["ServiceAccount"]["metadata"]["name"]  # IAM role credentials
        env = {item["name"]: item for item in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "facejobs-ray-token"
    text = (ROOT / "deploy" / "raycluster.yaml").read_text()
    assert not re.search(r"(?i)aws_(secret_)?access_key|secret_access|session_token|AKIA[0-9A-Z]{16}", text)


def test_the_image_pins_the_ray_the_project_runs(kuberay):
    import ray

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base and base.group(1) == ray.__version__ == kuberay["RayCluster"]["spec"]["rayVersion"]
    assert re.search(r"pip install .*\s\.\s", dockerfile)  # this checkout, installed
