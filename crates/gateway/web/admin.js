// The admin dashboard: polls /api/admin/overview every 2 s and draws it.
// Charts are plain SVG built here (no library, no external request).

import { takeTokenFromUrl, getToken, clearToken, askForToken, api, el, errorText, formatMs } from './common.js';

const POLL_MS = 2000;
const SVG = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);

let pollTimer = null;
let drainArmed = false;

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function ago(unixSeconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function stateChip(state, n) {
  const kind = { RUNNING: 'good', IDLE: 'ok', CREATING: 'busy', PENDING: 'busy', ACTIVATING: 'busy', STOPPING: 'busy', STOPPED: 'idle' }[state] || 'idle';
  return el('span', { class: `chip chip-${kind}`, dataset: { state } }, n === undefined ? state : `${state} ${n}`);
}

/** A scatter of [t, ms] points over the window, with p50/p90/p99 lines. */
function drawChart(container, series, windowS) {
  container.replaceChildren();
  if (!series || !series.count) {
    container.append(el('div', { class: 'chart-empty muted' }, 'no data in the last hour'));
    return;
  }
  const W = 360;
  const H = 150;
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  const now = Date.now();
  // Zoom to the data: at least the last 5 minutes, at most the whole window.
  const oldest = Math.min(...series.points.map(([t]) => t));
  const spanMs = Math.min(windowS * 1000, Math.max(5 * 60 * 1000, (now - oldest) * 1.1));
  const t0 = now - spanMs;
  const maxMs = Math.max(series.max_ms, 1) * 1.1;
  const x = (t) => pad.l + ((t - t0) / (now - t0)) * (W - pad.l - pad.r);
  const y = (ms) => H - pad.b - (ms / maxMs) * (H - pad.t - pad.b);
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart-svg', role: 'img', 'aria-label': `${series.count} samples` });
  root.append(svg('line', { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, class: 'axis' }));
  root.append(svg('line', { x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b, class: 'axis' }));
  // The top label is the measured maximum, at its height (the scale has
  // headroom above it, so the frame's top is not a value anyone measured).
  root.append(svg('text', { x: pad.l - 4, y: y(series.max_ms) + 4, class: 'tick axis-max', 'text-anchor': 'end' }, formatMs(series.max_ms)));
  root.append(svg('text', { x: pad.l - 4, y: H - pad.b, class: 'tick', 'text-anchor': 'end' }, '0'));
  root.append(svg('text', { x: pad.l, y: H - 4, class: 'tick' }, `-${Math.round(spanMs / 60000)} min`));
  root.append(svg('text', { x: W - pad.r, y: H - 4, class: 'tick', 'text-anchor': 'end' }, 'now'));
  for (const [name, v] of [['p50', series.p50_ms], ['p90', series.p90_ms], ['p99', series.p99_ms]]) {
    if (v === null || v === undefined) continue;
    root.append(svg('line', { x1: pad.l, y1: y(v), x2: W - pad.r, y2: y(v), class: `pline ${name}` }));
  }
  for (const [t, ms] of series.points) {
    if (t < t0) continue;
    root.append(svg('circle', { cx: x(t).toFixed(1), cy: y(ms).toFixed(1), r: 2.5, class: 'dot' }));
  }
  container.append(root, el('div', { class: 'chart-legend' },
    el('span', {}, `${series.count} ${series.count === 1 ? 'sample' : 'samples'}`),
    el('span', { class: 'p50' }, `p50 ${formatMs(series.p50_ms)}`),
    el('span', { class: 'p90' }, `p90 ${formatMs(series.p90_ms)}`),
    el('span', { class: 'p99' }, `p99 ${formatMs(series.p99_ms)}`),
    el('span', {}, `max ${formatMs(series.max_ms)}`)));
}

function render(d) {
  $('dashboard').hidden = false;
  $('admin-error').hidden = true;
  $('updated').textContent = `live · ${new Date().toLocaleTimeString()}`;
  $('updated').className = 'status status-ok';
  let cluster = '';
  if (d.gateways) {
    // Several gateways on one database: this one, and how the others are.
    const me = d.gateways.find((g) => g.this);
    const others = d.gateways.filter((g) => !g.this)
      .map((g) => `${g.gateway_id} ${g.alive ? 'up' : `silent ${g.heartbeat_age_s}s`} (${g.leases} sessions)`);
    cluster = ` · gateway ${me ? me.gateway_id : '?'} (${me ? me.leases : 0} sessions)` +
      (others.length ? ` · others: ${others.join(', ')}` : '');
  }
  $('gateway-info').textContent = `v${d.version} · ${d.backend} backend · up ${Math.round(d.uptime_s / 60)} min${cluster}`;

  const s = d.sessions;
  $('sessions-total').textContent = s.total;
  $('sessions-live').textContent = s.live;
  $('sessions-by-state').replaceChildren(...Object.entries(s.by_state).map(([k, n]) => stateChip(k, n)));

  const p = d.pool;
  $('pool-ready').textContent = p.ready;
  $('pool-launching').textContent = p.launching;
  $('pool-target').textContent = p.target;
  $('pool-max').textContent = p.max;
  $('pool-hit').textContent = p.claim_hit;
  $('pool-miss').textContent = p.claim_miss;
  const claims = p.claim_hit + p.claim_miss;
  $('pool-rate').textContent = claims ? `${Math.round((100 * p.claim_hit) / claims)} % warm` : 'no claims yet';
  $('pool-breaker').hidden = !p.breaker_open;
  const targetInput = $('pool-new-target');
  if (document.activeElement !== targetInput) targetInput.value = p.target;
  targetInput.max = p.max;
  $('pool-form').hidden = !p.enabled;
  if (!p.enabled) $('pool-message').textContent = 'The warm pool is disabled on this gateway.';

  $('runners').textContent = d.runners_connected;
  $('clients').textContent = d.clients_connected;

  const errors = Object.entries(d.errors.by_code).sort((a, b) => b[1] - a[1]);
  $('errors-total').textContent = errors.reduce((n, [, c]) => n + c, 0);
  $('errors-table').replaceChildren(...errors.map(([code, n]) => el('tr', { dataset: { code } }, el('td', {}, el('code', {}, code)), el('td', { class: 'num' }, n))));

  drawChart($('chart-warm'), d.latency.start_warm, d.window_s);
  drawChart($('chart-cold'), d.latency.start_cold, d.window_s);
  drawChart($('chart-first'), d.latency.first_event, d.window_s);

  const tbody = $('sessions-table').querySelector('tbody');
  tbody.replaceChildren(...s.list.map((row) => el('tr', { dataset: { session: row.session_id } },
    el('td', {}, el('code', {}, row.session_id)),
    el('td', {}, row.user_id),
    el('td', {}, stateChip(row.state)),
    el('td', {}, row.task_id ? el('code', {}, row.task_id) : el('span', { class: 'muted' }, 'none')),
    el('td', {}, ago(row.updated_at)),
    el('td', {}, row.live && row.task_id
      ? el('button', { type: 'button', class: 'danger small', onclick: () => stopSession(row.session_id) }, 'Stop')
      : null))));
  if (!s.list.length) tbody.append(el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'no sessions yet')));

  $('users-table').querySelector('tbody').replaceChildren(...s.by_user.map((u) => el('tr', { dataset: { user: u.user_id } },
    el('td', {}, u.user_id),
    el('td', { class: 'num' }, u.total),
    el('td', {}, ...Object.entries(u.by_state).map(([k, n]) => stateChip(k, n))))));
}

async function refresh() {
  clearTimeout(pollTimer);
  let res;
  try {
    res = await api('/api/admin/overview');
  } catch {
    $('updated').textContent = 'gateway unreachable; retrying';
    $('updated').className = 'status status-offline';
    pollTimer = setTimeout(refresh, POLL_MS * 2);
    return;
  }
  if (res.status === 401) {
    clearToken();
    await askForToken(errorText(res.body, 'This page needs an admin token.'));
    return refresh();
  }
  if (res.status === 403) {
    // Not an admin: say so and stop polling.
    $('dashboard').hidden = true;
    $('admin-error').hidden = false;
    $('admin-error').textContent = `403 ${errorText(res.body, 'FORBIDDEN: the dashboard needs an admin token.')}`;
    $('updated').textContent = 'forbidden';
    return;
  }
  if (res.status !== 200) {
    $('admin-error').hidden = false;
    $('admin-error').textContent = errorText(res.body, `HTTP ${res.status}`);
  } else {
    render(res.body);
  }
  pollTimer = setTimeout(refresh, POLL_MS);
}

async function stopSession(id) {
  const { status, body } = await api(`/api/admin/sessions/${encodeURIComponent(id)}/stop`, { method: 'POST' });
  $('pool-message').textContent = status === 202 ? `stopping ${id}` : errorText(body, `HTTP ${status}`);
  refresh();
}

async function poolAction(action) {
  const { status, body } = await api('/api/admin/pool', { method: 'POST', body: action });
  $('pool-message').textContent = status === 200
    ? (action.action === 'drain' ? 'drained: no warm tasks kept (resize to refill)' : `target set to ${body.pool.target}`)
    : errorText(body, `HTTP ${status}`);
  refresh();
}

/** Open today's report (HTML from /api/admin/report) in a new tab. */
async function openReport() {
  // Opened before the fetch, while the click still counts as the user's:
  // popup blockers allow it then.
  const tab = window.open('', '_blank');
  $('report-message').textContent = 'building…';
  let res;
  try {
    res = await api('/api/admin/report', { raw: true });
  } catch {
    res = { status: 0 };
  }
  if (res.status === 200) {
    const html = await res.res.blob();
    const url = URL.createObjectURL(new Blob([html], { type: 'text/html' }));
    if (tab) tab.location.href = url;
    else window.location.href = url;
    $('report-message').textContent = '';
    return;
  }
  if (tab) tab.close();
  let body = null;
  try { body = await res.res.json(); } catch { /* not JSON */ }
  $('report-message').textContent = errorText(body, res.status ? `HTTP ${res.status}` : 'gateway unreachable');
}

function wire() {
  $('open-report').addEventListener('click', openReport);
  $('pool-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const target = Number.parseInt($('pool-new-target').value, 10);
    if (Number.isFinite(target) && target >= 0) poolAction({ action: 'resize', target });
  });
  // Two clicks, no confirm() dialog: draining stops every ready sandbox.
  $('pool-drain').addEventListener('click', () => {
    if (!drainArmed) {
      drainArmed = true;
      $('pool-drain').textContent = 'Really drain?';
      setTimeout(() => { drainArmed = false; $('pool-drain').textContent = 'Drain'; }, 4000);
      return;
    }
    drainArmed = false;
    $('pool-drain').textContent = 'Drain';
    poolAction({ action: 'drain' });
  });
}

async function main() {
  takeTokenFromUrl();
  wire();
  if (!getToken()) await askForToken('Paste an admin token, or open the URL that `aishell serve` printed and follow the Dashboard link.');
  refresh();
}

main();
