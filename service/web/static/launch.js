// SMART App Launch (EHR launch and standalone launch) with PKCE (S256), as a public client.
// SMART App Launch 2.x, hl7.org/fhir/smart-app-launch/app-launch.html
import { appConfig, el } from './common.js';

const status = document.getElementById('status');

function b64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function randomString(n) {
  return b64url(crypto.getRandomValues(new Uint8Array(n)));
}

async function challengeOf(verifier) {
  return b64url(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier)));
}

async function launch() {
  const cfg = await appConfig();
  const params = new URLSearchParams(location.search);
  if (cfg.dev) {
    location.replace(params.get('patient') ? `/app/Patient/${encodeURIComponent(params.get('patient'))}` : '/app/');
    return;
  }
  if (!cfg.smart) throw new Error('the clinician app is not configured on this server (IECTOX_APP_*)');
  const iss = (params.get('iss') || cfg.fhir_base).replace(/\/+$/, '');
  if (iss !== cfg.fhir_base.replace(/\/+$/, '')) throw new Error(`launched from an EHR this server does not trust (${iss})`);
  const r = await fetch(`${iss}/.well-known/smart-configuration`, { headers: { Accept: 'application/json' } });
  if (!r.ok) throw new Error(`the EHR's SMART configuration could not be read (${r.status})`);
  const smart = await r.json();
  if (!(smart.code_challenge_methods_supported || []).includes('S256')) throw new Error('the EHR does not support PKCE (S256)');
  const launchId = params.get('launch');
  const state = randomString(24);
  const verifier = randomString(48);
  sessionStorage.setItem('iectox.launch', JSON.stringify({ state, verifier, token_endpoint: smart.token_endpoint, iss }));
  const scope = `${launchId ? 'launch' : 'launch/patient'} ${cfg.scope}`;
  const query = new URLSearchParams({
    response_type: 'code',
    client_id: cfg.client_id,
    redirect_uri: `${location.origin}/app/callback`,
    scope,
    state,
    aud: iss,
    code_challenge: await challengeOf(verifier),
    code_challenge_method: 'S256',
  });
  if (launchId) query.set('launch', launchId);
  location.assign(`${smart.authorization_endpoint}?${query}`);
}

launch().catch((err) => {
  status.textContent = '';
  status.classList.add('error');
  status.append(el('p', { text: `The launch failed: ${err.message}` }));
});
