// The patient's course at a glance: inputs over time (uPlot, vendored), the hourly grade of every
// scale as bands written with their grade, current results, the daily maximum and risk scores.
import { api, appConfig, el, fmtTime, gradeBadge, offsetSeconds, showError } from './common.js';

/* global uPlot */
const pid = decodeURIComponent(location.pathname.split('/').filter(Boolean).pop());
const status = document.getElementById('status');
const tooltip = document.getElementById('tooltip');
const SYNC = uPlot.sync('course');
const HEIGHT = 170;
// Grade colours repeat the written grade (never the only signal); ? = indeterminate (hatched).
const GRADE_FILL = ['#d3f9d8', '#fff3bf', '#ffd8a8', '#ffa8a8', '#eebefa'];
const STROKES = ['#1c7ed6', '#e8590c', '#2b8a3e', '#862e9c', '#c92a2a'];
const DASHES = [[], [6, 3], [2, 3], [10, 4, 2, 4]];
const PANELS = [
  ['temperature', 'Temperature'],
  ['circulation', 'Blood pressure'],
  ['oxygen', 'Oxygen'],
  ['neuro', 'Neurological assessment'],
];

const secs = (iso) => Date.parse(iso) / 1000;
// Every chart has the same gutters, so one instant is at the same x in every panel.
const LEFT = 120;
const RIGHT = 64;
const pad = (n) => String(n).padStart(2, '0');

function timeAxis(view) {
  const tz = tzDate(view);
  return {
    stroke: '#343a40',
    // 24-hour clock; a date at midnight
    values: (u, splits) => splits.map((v) => {
      const d = tz(v);
      return d.getHours() === 0 && d.getMinutes() === 0 ? `${pad(d.getMonth() + 1)}-${pad(d.getDate())}` : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    }),
  };
}

const blankAxis = (scale, side) => ({ scale, side, size: side === 3 ? LEFT : RIGHT, values: () => [], grid: { show: false }, ticks: { show: false } });

function tzDate(view) {
  if (view.tz) return (ts) => uPlot.tzDate(new Date(ts * 1e3), view.tz);
  const off = offsetSeconds(view.at); // the offset the data carry
  return (ts) => {
    const d = new Date((ts + off) * 1e3);
    return new Date(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate(), d.getUTCHours(), d.getUTCMinutes(), d.getUTCSeconds());
  };
}

function width() {
  return Math.max(320, document.getElementById('panels').clientWidth - 8);
}

function showTip(u, lines) {
  if (!lines.length) {
    tooltip.hidden = true;
    return;
  }
  tooltip.textContent = '';
  for (const l of lines) tooltip.append(el('div', { text: l }));
  const rect = u.over.getBoundingClientRect();
  tooltip.style.left = `${window.scrollX + rect.left + u.cursor.left + 14}px`;
  tooltip.style.top = `${window.scrollY + rect.top + u.cursor.top + 14}px`;
  tooltip.hidden = false;
}

async function openResource(ref) {
  const dialog = document.getElementById('resource');
  const body = document.getElementById('resource-body');
  document.getElementById('resource-h').textContent = ref;
  body.textContent = 'Loading…';
  dialog.showModal();
  try {
    body.textContent = JSON.stringify(await api(`/app/api/resource/${ref}`), null, 2);
  } catch (err) {
    body.textContent = `Could not load ${ref}: ${err.message}`;
  }
}

function refLink(ref, text) {
  const a = el('a', { href: `/fhir/${ref}`, 'data-ref': ref, text: text || ref });
  a.addEventListener('click', (ev) => {
    ev.preventDefault();
    openResource(ref);
  });
  return a;
}

function day0Hook(view) {
  return (u) => {
    if (!view.day0) return;
    const x = u.valToPos(secs(view.day0), 'x', true);
    const { ctx } = u;
    ctx.save();
    ctx.strokeStyle = '#495057';
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(x, u.bbox.top);
    ctx.lineTo(x, u.bbox.top + u.bbox.height);
    ctx.stroke();
    ctx.restore();
  };
}

function valuesTable(caption, rows) {
  const tbody = el('tbody');
  for (const r of rows) {
    tbody.append(el('tr', {}, el('td', { text: fmtTime(r.t) }), el('td', { text: r.label }), el('td', { text: r.value }), el('td', {}, refLink(r.ref))));
  }
  const head = el('thead', {}, el('tr', {}, ...['Time', 'Input', 'Value', 'Source'].map((h) => el('th', { scope: 'col', text: h }))));
  return el('details', { class: 'values' }, el('summary', { text: `${caption}: every value (${rows.length})` }), el('table', { class: 'grid' }, head, tbody));
}

function linePanel(view, key, title, xRange) {
  const series = view.series.filter((s) => s.panel === key);
  const events = view.events.filter((e) => e.panel === key);
  if (!series.length && !events.length) return null;
  const times = [...new Set(series.flatMap((s) => s.points.map((p) => p.t)))].sort((a, b) => secs(a) - secs(b));
  const xs = times.map(secs);
  const index = new Map(times.map((t, i) => [t, i]));
  const data = [xs];
  const meta = [];
  const units = [...new Set(series.map((s) => s.unit))];
  for (const s of series) {
    const ys = new Array(xs.length).fill(null);
    const ms = new Array(xs.length).fill(null);
    for (const p of s.points) {
      ys[index.get(p.t)] = p.v;
      ms[index.get(p.t)] = p;
    }
    data.push(ys);
    meta.push(ms);
  }
  const seriesOpts = [{}].concat(
    series.map((s, i) => ({
      label: `${s.label} (${s.unit})`,
      stroke: STROKES[i % STROKES.length],
      dash: DASHES[i % DASHES.length],
      width: 2,
      spanGaps: true,
      scale: s.unit,
      points: { show: true, size: 5 },
      value: (u, v) => (v === null ? '—' : `${Math.round(v * 10) / 10} ${s.unit}`),
    })),
  );
  const axes = [timeAxis(view)].concat(
    units.slice(0, 2).map((unit, i) => ({ scale: unit, label: unit, side: i === 0 ? 3 : 1, size: i === 0 ? LEFT : RIGHT, stroke: '#343a40', grid: { show: i === 0 } })),
  );
  if (units.length === 1) axes.push(blankAxis(units[0], 1));
  if (!units.length) axes.push(blankAxis('y', 3), blankAxis('y', 1));
  const opts = {
    title,
    width: width(),
    height: HEIGHT,
    tzDate: tzDate(view),
    scales: { x: { time: true, range: () => xRange } },
    series: seriesOpts,
    axes,
    cursor: { sync: { key: SYNC.key }, drag: { x: false, y: false } },
    hooks: {
      draw: [
        day0Hook(view),
        (u) => {
          // coded events (device, consciousness, ...): written along the top of the plot
          const { ctx } = u;
          ctx.save();
          ctx.font = '11px system-ui, sans-serif';
          ctx.fillStyle = '#212529';
          // only where the value changes, one line per concept
          const seen = new Map();
          const rowOf = new Map([...new Set(events.map((e) => e.concept))].map((c, i) => [c, i]));
          for (const e of [...events].sort((a, b) => secs(a.t) - secs(b.t))) {
            if (seen.get(e.concept) === e.shown) continue;
            seen.set(e.concept, e.shown);
            const x = u.valToPos(secs(e.t), 'x', true);
            const y = u.bbox.top + (12 + 13 * rowOf.get(e.concept)) * devicePixelRatio;
            ctx.fillText(`▸ ${e.label}: ${e.shown}`, x, y);
          }
          ctx.restore();
        },
      ],
      setCursor: [
        (u) => {
          const i = u.cursor.idx;
          if (i === null || i === undefined || u.cursor.left < 0) return showTip(u, []);
          const lines = [];
          series.forEach((s, k) => {
            const p = meta[k][i];
            if (p) lines.push(`${s.label} ${Math.round(p.v * 10) / 10} ${s.unit} (as sent: ${p.shown}) at ${fmtTime(p.t)} · ${p.ref}`);
          });
          showTip(u, lines);
        },
      ],
    },
  };
  const box = el('figure', { class: 'panel', 'data-panel': key }, el('figcaption', { class: 'sr-only', text: title }));
  const chart = new uPlot(opts, data, box);
  chart.over.addEventListener('click', () => {
    const i = chart.cursor.idx;
    const p = i === null || i === undefined ? null : meta.map((m) => m[i]).find(Boolean);
    if (p) openResource(p.ref);
  });
  const rows = series.flatMap((s) => s.points.map((p) => ({ t: p.t, label: s.label, value: p.shown, ref: p.ref })));
  rows.push(...events.map((e) => ({ t: e.t, label: e.label, value: e.shown, ref: e.ref })));
  rows.sort((a, b) => secs(a.t) - secs(b.t));
  return [box, valuesTable(title, rows), chart];
}

function rowsPanel(view, key, title, rows, xRange, drawRow, tipAt) {
  // A chart of labelled rows (drugs, grade bands) drawn on the same time axis as the others.
  const height = 28 + rows.length * 22;
  const opts = {
    title,
    width: width(),
    height: height + 40,
    tzDate: tzDate(view),
    scales: { x: { time: true, range: () => xRange }, y: { range: [0, 1] } },
    series: [{}, { label: '', show: false }],
    legend: { show: false },
    axes: [timeAxis(view), blankAxis('y', 3), blankAxis('y', 1)],
    cursor: { sync: { key: SYNC.key }, drag: { x: false, y: false }, y: false },
    hooks: {
      draw: [
        (u) => {
          const { ctx } = u;
          const rowH = u.bbox.height / rows.length;
          ctx.save();
          ctx.font = `${Math.round(11 * devicePixelRatio)}px system-ui, sans-serif`;
          rows.forEach((row, r) => {
            const y = u.bbox.top + r * rowH;
            drawRow(u, ctx, row, y, rowH);
            ctx.fillStyle = '#212529';
            ctx.fillText(row.label, u.bbox.left - (LEFT - 6) * devicePixelRatio, y + rowH * 0.7);
          });
          ctx.restore();
        },
        day0Hook(view),
      ],
      setCursor: [
        (u) => {
          if (u.cursor.left < 0 || u.cursor.left === undefined) return showTip(u, []);
          showTip(u, tipAt(u.posToVal(u.cursor.left, 'x')));
        },
      ],
    },
  };
  const box = el('figure', { class: 'panel', 'data-panel': key }, el('figcaption', { class: 'sr-only', text: title }));
  const chart = new uPlot(opts, [xRange, [null, null]], box);
  return [box, chart];
}

function drugsPanel(view, xRange) {
  const concepts = [...new Set(view.drugs.filter((d) => d.concept !== 'lymphodepletion').map((d) => d.concept))];
  if (!concepts.length) return null;
  const rows = concepts.map((c) => ({ label: view.drugs.find((d) => d.concept === c).label, items: view.drugs.filter((d) => d.concept === c) }));
  const draw = (u, ctx, row, y, h) => {
    for (const d of row.items) {
      const x0 = u.valToPos(secs(d.start), 'x', true);
      const end = d.end ? secs(d.end) : secs(view.at);
      const x1 = Math.max(x0 + 4 * devicePixelRatio, u.valToPos(end, 'x', true));
      ctx.fillStyle = d.kind === 'vasopressor' ? '#ffa8a8' : '#a5d8ff';
      ctx.fillRect(x0, y + 3, x1 - x0, h - 6);
      if (d.rate !== null && x1 - x0 > 28 * devicePixelRatio) {
        ctx.fillStyle = '#212529';
        ctx.fillText(`${d.rate} ${d.unit}`, x0 + 2, y + h * 0.7);
      }
    }
  };
  const tip = (x) => view.drugs
    .filter((d) => secs(d.start) <= x + 1800 && (d.end ? secs(d.end) : secs(view.at)) >= x - 1800)
    .map((d) => `${d.label}${d.rate !== null ? ` ${d.rate} ${d.unit}` : ''} ${fmtTime(d.start)}${d.end && d.end !== d.start ? ` to ${fmtTime(d.end)}` : ''}${d.end ? '' : ' (running)'} · ${d.ref}`);
  const [box, chart] = rowsPanel(view, 'drugs', 'Drugs (vasopressor rates written in the bar)', rows, xRange, draw, tip);
  const table = valuesTable('Drugs', view.drugs.map((d) => ({ t: d.start, label: d.label, value: [d.shown || (d.rate !== null ? `${d.rate} ${d.unit}` : ''), d.end && d.end !== d.start ? `until ${fmtTime(d.end)}` : d.end ? '' : 'running'].filter(Boolean).join(', ') || 'given', ref: d.ref })));
  return [box, table, chart];
}

function gradesPanel(view, xRange) {
  const hours = view.hours.map(secs);
  const ordered = [...view.scales.filter((s) => s.headline), ...view.scales.filter((s) => !s.headline)];
  const rows = ordered.map((s) => ({ label: s.method, scale: s }));
  const draw = (u, ctx, row, y, h) => {
    const g = row.scale.hourly;
    const xAt = (i) => (i < hours.length ? u.valToPos(hours[i], 'x', true) : u.valToPos(hours[hours.length - 1], 'x', true) + 2);
    // one block per run of equal grades, the grade written in its middle
    for (let i = 0; i < hours.length; ) {
      let j = i;
      while (j + 1 < hours.length && g[j + 1] === g[i]) j++;
      const x0 = xAt(i);
      const x1 = xAt(j + 1);
      ctx.fillStyle = g[i] === null ? '#dee2e6' : GRADE_FILL[g[i]];
      ctx.fillRect(x0, y + 2, Math.max(1, x1 - x0), h - 4);
      if (x1 - x0 >= 9 * devicePixelRatio) {
        ctx.fillStyle = '#212529';
        ctx.fillText(g[i] === null ? '?' : String(g[i]), (x0 + x1) / 2 - 3 * devicePixelRatio, y + h * 0.7);
      }
      i = j + 1;
    }
  };
  const tip = (x) => {
    let i = hours.findIndex((t) => t > x) - 1;
    if (i < 0) i = x >= hours[hours.length - 1] ? hours.length - 1 : -1;
    if (i < 0) return [];
    return [`${fmtTime(view.hours[i])}`].concat(ordered.map((s) => `${s.method}: ${s.hourly[i] === null ? 'indeterminate' : `grade ${s.hourly[i]}`}`));
  };
  const [box, chart] = rowsPanel(view, 'grades', 'Hourly grade of each scale (ASTCT CRS and ICANS first); ? = indeterminate', rows, xRange, draw, tip);
  box.setAttribute('aria-label', 'Hourly grades; the daily maximum table below gives the same in text');
  return [box, chart];
}

function headline(view) {
  const box = document.getElementById('headline');
  for (const s of view.scales.filter((x) => x.headline)) {
    const c = s.current;
    const name = s.method === 'astct-crs' ? 'CRS' : 'ICANS';
    const card = el('article', { class: `result ${c.grade === null ? 'gi' : `g${c.grade}`}`, 'data-method': s.method });
    card.append(el('h3', {}, `${name}: `, gradeBadge(c)));
    card.append(el('p', { class: 'verdict', text: c.verdict }));
    if (c.fever_masked) {
      card.append(el('p', { class: 'note', text: 'Fever masked: an antipyretic or anti-cytokine drug was given, so fever is no longer required; the grade rests on hypotension and hypoxia (ASTCT 2019).' }));
    }
    if (c.basis.length) {
      const list = el('ul', { class: 'refs' });
      for (const ref of c.basis) list.append(el('li', {}, refLink(ref)));
      card.append(el('p', { text: 'Deciding inputs:' }), list);
    }
    if (c.missing.length) card.append(el('p', { class: 'missing', text: `Missing: ${c.missing.join(', ')}. This is not grade 0.` }));
    const peak = s.peak;
    if (peak && peak.grade !== c.grade) {
      // when and why the maximum was reached
      const day = view.day0 ? Math.floor((Date.parse(peak.at) - Date.parse(view.day0)) / 864e5) : null;
      const when = `${fmtTime(peak.at)}${day !== null ? ` (day ${day})` : ''}`;
      const span = s.course.sampled_from ? `Maximum since ${fmtTime(s.course.sampled_from)} (the course was sampled from there only)` : 'Maximum since day 0';
      const box = el('div', { class: 'peak' }, el('h4', {}, `${span}: `, gradeBadge(peak), ` first at ${when}`));
      box.append(el('p', { class: 'verdict', text: peak.verdict }));
      if (peak.basis.length) {
        const list = el('ul', { class: 'refs' });
        for (const ref of peak.basis) list.append(el('li', {}, refLink(ref)));
        box.append(list);
      }
      card.append(box);
    }
    card.append(el('p', { class: 'scale', text: `${s.scale}, at ${fmtTime(view.at)}` }));
    box.append(card);
  }
  const tbody = document.querySelector('#others tbody');
  for (const s of view.scales) {
    const c = s.course;
    tbody.append(
      el(
        'tr',
        { 'data-method': s.method },
        el('th', { scope: 'row', title: s.scale, text: s.method }),
        el('td', {}, gradeBadge(s.current)),
        el('td', {}, gradeBadge({ grade: c.peak_grade, floor: null })),
        el('td', { text: fmtTime(c.onset) }),
        el('td', { text: c.resolution ? fmtTime(c.resolution) : c.onset ? 'not yet' : '—' }),
        el('td', { text: s.current.missing.join(', ') || '—' }),
      ),
    );
  }
}

function dailyTable(view) {
  const days = [...new Set(view.scales.flatMap((s) => s.course.daily_max.map((d) => d.day)))].sort((a, b) => a - b);
  const table = document.getElementById('daily-table');
  table.tHead.append(el('tr', {}, el('th', { scope: 'col', text: 'Scale' }), ...days.map((d) => el('th', { scope: 'col', text: `day ${d}` }))));
  for (const s of view.scales) {
    const by = new Map(s.course.daily_max.map((d) => [d.day, d.grade]));
    table.tBodies[0].append(el('tr', {}, el('th', { scope: 'row', text: s.method }), ...days.map((d) => {
      const g = by.get(d);
      return el('td', { class: g === null || g === undefined ? 'gi' : `g${g}`, text: g === null || g === undefined ? '?' : String(g) });
    })));
  }
}

function scoresTable(view) {
  const tbody = document.querySelector('#scores-table tbody');
  for (const s of view.scores) {
    const preds = s.predictions.map((p) => [p.text, p.probability !== null ? `${Math.round(p.probability * 100)}%` : null, p.qualitative, p.relative_risk !== null ? `RR ${p.relative_risk}` : null].filter(Boolean).join(' ')).join('; ');
    const value = s.indeterminate ? `not computable (missing ${s.missing.join(', ')})` : s.value !== null ? String(Math.round(s.value * 100) / 100) : '—';
    tbody.append(el('tr', {}, el('th', { scope: 'row', text: s.method }), el('td', { text: `${s.label} (${fmtTime(s.at)})` }), el('td', { text: value }), el('td', { text: preds || '—' }), el('td', { text: s.citation })));
  }
}

async function main() {
  let cfg = null;
  try {
    cfg = await appConfig();
    const view = await api(`/app/api/Patient/${encodeURIComponent(pid)}`);
    document.title = `iectox · ${view.patient.name || pid}`;
    document.getElementById('title').textContent = view.patient.name ? `${view.patient.name} (${pid})` : pid;
    const facts = [
      view.day !== null ? `Day ${view.day} since infusion${view.product ? ` of ${view.product}` : ''} (${fmtTime(view.day0)})` : 'No infusion recorded',
      `graded at ${fmtTime(view.at)}, the latest input`,
    ];
    document.getElementById('facts').textContent = facts.join(' · ');
    headline(view);
    const first = view.hours.length ? secs(view.hours[0]) : secs(view.at) - 86400;
    const xRange = [first, secs(view.at)];
    const panels = document.getElementById('panels');
    const charts = [];
    for (const [key, title] of PANELS) {
      const made = linePanel(view, key, title, xRange);
      if (made) {
        panels.append(made[0], made[1]);
        charts.push(made[2]);
      }
    }
    const drugs = drugsPanel(view, xRange);
    if (drugs) {
      panels.append(drugs[0], drugs[1]);
      charts.push(drugs[2]);
    }
    const grades = gradesPanel(view, xRange);
    panels.append(grades[0]);
    charts.push(grades[1]);
    dailyTable(view);
    scoresTable(view);
    if (view.left_out.length) {
      const list = document.getElementById('leftout-list');
      for (const lo of view.left_out) list.append(el('li', {}, refLink(lo.ref), ` at ${lo.path}: ${lo.reason}`));
      document.getElementById('leftout').hidden = false;
    }
    for (const id of ['head', 'current', 'timeline', 'daily', 'scores']) document.getElementById(id).hidden = false;
    window.addEventListener('resize', () => charts.forEach((c) => c.setSize({ width: width(), height: c.height })));
    charts.forEach((c) => c.setSize({ width: width(), height: c.height }));
    status.textContent = '';
    document.body.dataset.ready = 'true';
  } catch (err) {
    showError(status, err, cfg);
    document.body.dataset.ready = 'error';
  }
}

main();
