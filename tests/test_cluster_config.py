"""cluster.yaml passes the validation `ray up` runs (Ray's launcher schema, after Ray fills its
defaults), and a misspelled key fails it."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import REPO


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_up_validation(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))
    assert cluster["provider"]["type"] == "aws"
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["max_workers"] > gpu["min_workers"]
    head = "\n".join(cluster["head_start_ray_commands"])
    assert "mlflow server" in head and "--allowed-hosts" in head and "0.0.0.0:5000" not in head
    allowed = head.split("--allowed-hosts", 1)[1].split('"')[1].split(",")
    assert "*" not in "".join(allowed) and "localhost" in allowed and "$HEAD_IP" in allowed
    assert "security_group" not in cluster["provider"]  # Ray's default group: SSH plus intra-cluster only
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install -q uv" in setup and "uv sync" in setup  # installed as the README does


@pytest.mark.parametrize("where,key", [((), "idle_timeout_minute"), (("available_node_types", "gpu_worker"), "min_worker"),
                                       (("auth",), "ssh_usr")])
def test_a_misspelled_key_fails_validation(cluster, where, key):
    bad = copy.deepcopy(cluster)
    node = bad
    for k in where:
        node = node[k]
    node[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=key):
        validate_config(prepare_config(bad))
