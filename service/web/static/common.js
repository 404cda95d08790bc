// Shared by the clinician app's pages: configuration, the session's token, API calls, formatting.
// No framework and no CDN: every script is served by iectox (hospital networks block CDNs).

const TOKEN_KEY = 'iectox.token';

export async function appConfig() {
  const r = await fetch('/app/config.json');
  if (!r.ok) throw new Error(`configuration unavailable (${r.status})`);
  return r.json();
}

export function session() {
  const raw = sessionStorage.getItem(TOKEN_KEY);
  if (!raw) return null;
  const s = JSON.parse(raw);
  return s.expires && Date.now() > s.expires ? null : s;
}

export function keepSession(token) {
  const expires = token.expires_in ? Date.now() + token.expires_in * 1000 : null;
  const kept = { access_token: token.access_token, scope: token.scope || '', patient: token.patient || null, expires };
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify(kept));
}

export class NeedsLaunch extends Error {}

/** GET JSON from iectox with the session's token (none in dev mode). */
export async function api(path) {
  const s = session();
  const headers = { Accept: 'application/json' };
  if (s) headers.Authorization = `Bearer ${s.access_token}`;
  const r = await fetch(path, { headers });
  if (r.status === 401) throw new NeedsLaunch('sign-in needed: open iectox from the EHR (SMART launch)');
  if (!r.ok) {
    let why = `${r.status}`;
    try {
      const oo = await r.json();
      why = (oo.issue || []).map((i) => i.diagnostics).filter(Boolean).join('; ') || why;
    } catch { /* not JSON */ }
    throw new Error(why);
  }
  return r.json();
}

/** A SMART scope check the same way the server checks (v1 and v2, user/ or system/). */
export function scopeAllowsRead(granted, resourceType) {
  return String(granted || '').split(/\s+/).some((s) => {
    const m = /^(user|system)\/([A-Za-z]+|\*)\.([a-z*]+)$/.exec(s);
    if (!m || (m[2] !== '*' && m[2] !== resourceType)) return false;
    const p = m[3];
    return p === 'read' || p === '*' || (/^c?r?u?d?s?$/.test(p) && /[rs]/.test(p));
  });
}

/** "2026-01-06 10:00 −05:00": the time as recorded, with its offset (never converted silently). */
export function fmtTime(iso) {
  if (!iso) return '—';
  const m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(?::\d\d(?:\.\d+)?)?(Z|[+-]\d\d:\d\d)?$/.exec(iso);
  if (!m) return iso;
  const off = !m[3] || m[3] === 'Z' ? '+00:00' : m[3];
  return `${m[1]} ${m[2]} ${off.replace('-', '−')}`;
}

/** Seconds of the UTC offset an ISO time carries. */
export function offsetSeconds(iso) {
  const m = /([+-])(\d\d):(\d\d)$/.exec(iso || '');
  return m ? (m[1] === '-' ? -1 : 1) * (Number(m[2]) * 3600 + Number(m[3]) * 60) : 0;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

/** A grade as text first (colour only repeats it): "grade 3", "indeterminate (≥ 2)". */
export function gradeBadge(result) {
  const g = result ? result.grade : null;
  const floor = result ? result.floor : null;
  const text = g !== null && g !== undefined ? `grade ${g}` : floor ? `indeterminate (at least grade ${floor})` : 'indeterminate';
  const cls = g !== null && g !== undefined ? `badge g${g}` : 'badge gi';
  return el('span', { class: cls, text });
}

export function showError(target, err, config) {
  target.textContent = '';
  target.classList.add('error');
  if (err instanceof NeedsLaunch) {
    target.append(el('p', { text: 'Sign-in needed: open iectox from the patient chart in the EHR.' }));
    if (config && config.smart) {
      target.append(el('p', {}, el('a', { href: '/app/launch', text: 'Or sign in here (standalone launch)' })));
    }
  } else {
    target.append(el('p', { text: `Could not load: ${err.message}` }));
  }
}
