import { api, appConfig, el, fmtTime, gradeBadge, showError } from './common.js';

const status = document.getElementById('status');
const table = document.getElementById('worklist');

function peakCell(row) {
  const parts = [];
  for (const [method, name] of [['astct-crs', 'CRS'], ['astct-icans', 'ICANS']]) {
    const p = (row.peak || {})[method];
    if (!p) continue;
    const g = p.grade === null ? 'indeterminate' : `grade ${p.grade}`;
    const since = p.sampled_from ? ` since ${fmtTime(p.sampled_from)} only` : '';
    parts.push(`${name} ${g}${p.day !== null && p.grade ? ` (day ${p.day})` : ''}${since}`);
  }
  return parts.join('; ');
}

async function main() {
  let cfg = null;
  try {
    cfg = await appConfig();
    const rows = await api('/app/api/worklist');
    const body = table.tBodies[0];
    for (const row of rows) {
      const who = row.name ? `${row.name} (${row.id})` : row.id;
      const tr = el(
        'tr',
        { 'data-patient': row.id },
        el('th', { scope: 'row' }, el('a', { href: `/app/Patient/${encodeURIComponent(row.id)}`, text: who })),
        el('td', { text: row.day === null ? '—' : `day ${row.day}` }),
        el('td', { text: row.product || '—' }),
        el('td', { class: 'crs' }, gradeBadge(row.crs)),
        el('td', { class: 'icans' }, gradeBadge(row.icans)),
        el('td', { text: peakCell(row) }),
        el('td', { text: row.changes.length ? row.changes.join('; ') : 'no change' }),
        el('td', { text: fmtTime(row.at) + (row.left_out ? ` · ${row.left_out} input(s) left out` : '') }),
      );
      body.append(tr);
    }
    status.textContent = rows.length ? `${rows.length} patient(s)` : 'No patients yet.';
    table.hidden = rows.length === 0;
    document.body.dataset.ready = 'true';
  } catch (err) {
    showError(status, err, cfg);
    document.body.dataset.ready = 'error';
  }
}

main();
