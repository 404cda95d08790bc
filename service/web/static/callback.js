// SMART App Launch, second half: the authorization code for a token (PKCE verifier), then the
// granted scopes are checked before anything is shown.
import { appConfig, el, keepSession, scopeAllowsRead } from './common.js';

const status = document.getElementById('status');

async function callback() {
  const cfg = await appConfig();
  const params = new URLSearchParams(location.search);
  const pending = JSON.parse(sessionStorage.getItem('iectox.launch') || 'null');
  sessionStorage.removeItem('iectox.launch');
  if (params.get('error')) throw new Error(`the EHR refused: ${params.get('error')} ${params.get('error_description') || ''}`);
  if (!pending || params.get('state') !== pending.state) throw new Error('the sign-in response does not match this launch (state)');
  const body = new URLSearchParams({
    grant_type: 'authorization_code',
    code: params.get('code') || '',
    redirect_uri: `${location.origin}/app/callback`,
    client_id: cfg.client_id,
    code_verifier: pending.verifier,
  });
  const r = await fetch(pending.token_endpoint, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' },
    body,
  });
  const token = await r.json().catch(() => ({}));
  if (!r.ok || !token.access_token) throw new Error(`no token: ${token.error || r.status} ${token.error_description || ''}`);
  const missing = cfg.needs.filter((need) => !scopeAllowsRead(token.scope, need.split('/')[1].split('.')[0]));
  if (missing.length) {
    throw new Error(`your access does not allow what this page shows (missing ${missing.join(', ')}); nothing is shown`);
  }
  keepSession(token);
  history.replaceState(null, '', '/app/callback');  // the code leaves the address bar
  location.replace(token.patient ? `/app/Patient/${encodeURIComponent(token.patient)}` : '/app/');
}

callback().catch((err) => {
  status.textContent = '';
  status.classList.add('error');
  status.append(el('p', { text: `Sign-in failed: ${err.message}` }));
});
