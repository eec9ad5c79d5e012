// Shared by the chat page and the admin dashboard: the bearer token (kept in
// session storage, never left in the address bar), API calls and a tiny DOM
// builder. No framework, no build step, no external requests.

const TOKEN_KEY = 'aishell.token';

// Uncaught errors of this page, for the browser tests (and the console).
window.aishellErrors = [];
window.addEventListener('error', (ev) => window.aishellErrors.push(String(ev.message)));
window.addEventListener('unhandledrejection', (ev) => window.aishellErrors.push(String(ev.reason)));

/** Move `?token=` from the address bar into session storage. */
export function takeTokenFromUrl() {
  const url = new URL(window.location.href);
  const token = url.searchParams.get('token');
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    url.searchParams.delete('token');
    const rest = url.searchParams.toString();
    // replaceState: the token never appears in history or a bookmark.
    window.history.replaceState(null, '', url.pathname + (rest ? '?' + rest : '') + url.hash);
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Call the gateway's JSON API with the token; returns {status, body}. */
export async function api(path, { method = 'GET', body, raw = false, headers = {} } = {}) {
  const h = { ...headers };
  const token = getToken();
  if (token) h.Authorization = 'Bearer ' + token;
  let payload = body;
  if (body !== undefined && !(body instanceof Blob) && typeof body !== 'string') {
    h['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  const res = await fetch(path, { method, headers: h, body: payload, cache: 'no-store' });
  if (raw) return { status: res.status, res };
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = { text }; }
  return { status: res.status, body: data };
}

/** The sentence of an API error body, with its code. */
export function errorText(body, fallback) {
  const e = body && body.error;
  return e ? `${e.code}: ${e.message}` : fallback;
}

/** el('div', {class: 'x', onclick: f}, 'text', child...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (k === 'class') node.className = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (v === true) node.setAttribute(k, '');
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/**
 * Show the token form in `#login` and resolve with the token the user enters.
 * `message` says why (no token yet, token rejected...).
 */
export function askForToken(message) {
  const box = document.getElementById('login');
  const msg = document.getElementById('login-message');
  const input = document.getElementById('login-token');
  const form = document.getElementById('login-form');
  msg.textContent = message;
  input.value = '';
  box.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      setToken(token);
      box.hidden = true;
      resolve(token);
    };
  });
}

export function formatMs(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1) return ms.toFixed(2) + ' ms';
  if (ms < 1000) return Math.round(ms) + ' ms';
  return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';
}

export function formatBytes(n) {
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
  return (n / 1024 / 1024).toFixed(1) + ' MiB';
}
