"""Validate the custom resources of rendered manifests (KEDA ScaledObject, Prometheus Operator
ServiceMonitor) against models generated from their CRDs; kubernetes-validate knows only the
built-in kinds. Run with the deploy tools' Python: `.venv-deploy/bin/python validate_crds.py
rendered.yaml ...`. Prints one line per resource; exits 1 on any error.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

MODELS: dict[tuple[str, str], Any] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
}


def unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Fields of `given` that the model dropped: the generated models ignore what the CRD's
    schema does not define, where the API server (with field validation) refuses it."""
    if isinstance(given, dict) and isinstance(kept, dict):
        found = [f"{path}.{key}" for key in given if key not in kept]
        for key in given.keys() & kept.keys():
            found += unknown_fields(given[key], kept[key], f"{path}.{key}")
        return found
    if isinstance(given, list) and isinstance(kept, list):
        return [
            f
            for i, (g, k) in enumerate(zip(given, kept, strict=True))
            for f in unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


def main(paths: list[str]) -> int:
    errors = 0
    for path in paths:
        with open(path) as f:
            documents = [d for d in yaml.safe_load_all(f) if d]
        for doc in documents:
            model = MODELS.get((doc.get("apiVersion"), doc.get("kind")))
            if model is None:
                continue
            name = f"{path}: {doc['kind']}/{doc['metadata']['name']}"
            try:
                parsed = model.model_validate(doc)
            except Exception as exc:  # pydantic's ValidationError, printed as it is
                print(f"FAIL {name}: {exc}")
                errors += 1
                continue
            extra = unknown_fields(doc, parsed.model_dump(by_alias=True, exclude_unset=True))
            if extra:
                print(f"FAIL {name}: fields not in the CRD's schema: {', '.join(extra)}")
                errors += 1
            else:
                print(f"PASS {name}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
