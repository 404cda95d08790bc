"""The Kubernetes manifests (deploy/k8s): the base and the PostgreSQL overlay, built as kustomize
builds them (resources, images, labels, strategic-merge patches of these simple shapes),
validate against the Kubernetes schemas (kubernetes-validate, offline, strict), and every
environment variable they set is a setting iectox reads. No cluster is needed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    """A strategic-merge patch of the shapes used here: maps merge, lists of named items merge
    by name, other values replace."""
    for key, value in patch.items():
        old = into.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value)
        elif (
            isinstance(old, list)
            and isinstance(value, list)
            and all(isinstance(v, dict) and "name" in v for v in value)
        ):
            by_name = {item.get("name"): item for item in old if isinstance(item, dict)}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    old.append(item)
        else:
            into[key] = copy.deepcopy(value)


def build(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for ref in kustomization.get("resources", []):
        path = folder / ref
        out += build(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for image in kustomization.get("images", []):
        for doc in out:
            for pod in _pod_specs(doc):
                for c in pod.get("containers", []):
                    if c["image"] == image["name"]:
                        c["image"] = f"{image['newName']}:{image['newTag']}"
    for group in kustomization.get("labels", []):
        for doc in out:
            doc["metadata"].setdefault("labels", {}).update(group["pairs"])
    for patch in kustomization.get("patches", []):
        p = yaml.safe_load((folder / patch["path"]).read_text())
        (target,) = [d for d in out if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
        _merge(target, p)
    return out


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


@pytest.mark.parametrize("variant", ["base", "overlays/postgres"])
def test_manifests_validate_against_the_kubernetes_schemas(variant: str) -> None:
    docs = build(K8S / variant)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", "iectox-config"),
        ("Deployment", "iectox-api"),
        ("Deployment", "iectox-poll"),
        ("Deployment", "iectox-worker"),
        ("HorizontalPodAutoscaler", "iectox-api"),
        ("Job", "iectox-migrate"),
        ("Service", "iectox-api"),
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", ["base", "overlays/postgres"])
def test_every_environment_variable_is_a_setting(variant: str) -> None:
    docs = build(K8S / variant)
    names = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
        for pod in _pod_specs(doc):
            for c in pod["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    fields = {f"IECTOX_{name.upper()}" for name in Settings.model_fields}
    fields.add("IECTOX_LOG_FORMAT")  # read by service/observe/logs.py, before the settings
    assert names and names <= fields, sorted(names - fields)


def test_pods_run_as_non_root_with_limits_and_probes() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in build(K8S / "base")}
    for doc in docs.values():
        for pod in _pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and set(c["resources"]["limits"])
                assert c["image"] == "registry.example.org/iectox:0.1.0"
    api = docs[("Deployment", "iectox-api")]["spec"]["template"]["spec"]["containers"][0]
    assert (
        api["readinessProbe"]["httpGet"]["path"] == "/readyz" and api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    config = docs[("ConfigMap", "iectox-config")]["data"]
    assert config["IECTOX_AUTO_MIGRATE"] == "false"  # the Job migrates
    overlay = {(d["kind"], d["metadata"]["name"]): d for d in build(K8S / "overlays/postgres")}
    assert overlay[("Deployment", "iectox-worker")]["spec"]["replicas"] == 2
    assert overlay[("ConfigMap", "iectox-config")]["data"]["IECTOX_AUTH_MODE"] == "jwt"  # kept from the base
