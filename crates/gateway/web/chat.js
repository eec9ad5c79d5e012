// The chat page: one WebSocket to /ws speaking the client protocol (docs/protocol/client.md).
//
// Connection life cycle, like a production client:
// * heartbeat: `ping` every 30 s; no `pong` within 10 s counts as a dead
//   socket (closed and reconnected);
// * reconnect with backoff 2, 4, 8, 16, 30 s (±10 % jitter), then every 30 s,
//   with a "Reconnect now" button all along;
// * resume with `session_id` + `last_seq`: the gateway replays every later
//   event exactly once; frames at or below `last_seq` are dropped anyway, so a
//   replay overlapping what we saw can never show a delta twice;
// * `UNAUTHORIZED` (an error frame, close 4401, or a refused upgrade that
//   `/api/me` confirms) stops retrying and asks for a token.
// Messages typed while offline wait in order and are sent (with their client
// ids, so the gateway never runs one twice) once the session is back.

import { takeTokenFromUrl, getToken, clearToken, askForToken, api, el, errorText, formatBytes } from './common.js';

const HEARTBEAT_MS = 30000;
const PONG_TIMEOUT_MS = 10000;
const BACKOFF_S = [2, 4, 8, 16, 30];
const STEADY_RETRY_S = 30;
const STORE_KEY = 'aishell.chat';

const $ = (id) => document.getElementById(id);

// ---- state ----------------------------------------------------------------

/** Everything the tab remembers (session storage, so a reload resumes). */
const state = {
  sessionId: null,
  lastSeq: 0,
  userId: null,
  agentKind: null, // the agent new sessions get (`/api/me`), for the first hints
  current: null, // conversation id shown, null = a new one
  /** id -> {id, title, turns: [{id, user, blocks, done, usage}]} */
  conversations: new Map(),
  /** conversation ids in the order the list shows them */
  order: [],
};

/** What only this page load knows. */
const conn = {
  ws: null,
  opened: false, // the `session` frame arrived on this socket
  attempt: 0,
  retryTimer: null,
  countdownTimer: null,
  retryAt: 0,
  heartbeat: null,
  pongTimer: null,
  pingId: 0,
  stopped: false, // UNAUTHORIZED: no more retries until a new token
  everConnected: false,
};

/** Counters the browser tests read (and a curious user can, in the console). */
const stats = { framesSeen: 0, duplicatesDropped: 0, deltas: 0, connects: 0, resumes: 0, pongs: 0, heartbeatTimeouts: 0, statusHistory: [] };

function save() {
  const conversations = [...state.conversations.values()].map((c) => ({
    id: c.id,
    title: c.title,
    turns: c.turns.map((t) => ({ ...t, blocks: t.blocks.map(stripDom) })),
  }));
  const snapshot = { sessionId: state.sessionId, lastSeq: state.lastSeq, current: state.current, order: state.order, conversations };
  try {
    sessionStorage.setItem(STORE_KEY, JSON.stringify(snapshot));
  } catch {
    // Storage full: the transcript stays on screen; a reload would lose it.
  }
}

let saveTimer = null;
function saveSoon() {
  if (saveTimer) return;
  saveTimer = setTimeout(() => { saveTimer = null; save(); }, 300);
}

function stripDom(block) {
  const { node, ...rest } = block;
  return rest;
}

function load() {
  try {
    const snap = JSON.parse(sessionStorage.getItem(STORE_KEY) || 'null');
    if (!snap) return;
    state.sessionId = snap.sessionId;
    state.lastSeq = snap.lastSeq || 0;
    state.current = snap.current;
    state.order = snap.order || [];
    for (const c of snap.conversations || []) state.conversations.set(c.id, c);
  } catch {
    sessionStorage.removeItem(STORE_KEY);
  }
}

function newId(prefix) {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return prefix + [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function conversation(id, create = true) {
  let c = state.conversations.get(id);
  if (!c && create) {
    c = { id, title: null, turns: [] };
    state.conversations.set(id, c);
    state.order.unshift(id);
    renderConversationList();
  }
  return c;
}

// ---- connection -----------------------------------------------------------

function wsUrl() {
  const proto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  const q = new URLSearchParams({ token: getToken() });
  if (state.sessionId) {
    q.set('session_id', state.sessionId);
    q.set('last_seq', String(state.lastSeq));
  }
  return `${proto}//${window.location.host}/ws?${q}`;
}

function connect() {
  clearRetry();
  if (conn.stopped) return;
  if (conn.ws) {
    conn.ws.onclose = null;
    conn.ws.close();
  }
  setStatus(conn.everConnected ? 'reconnecting…' : 'connecting…', 'offline');
  conn.opened = false;
  stats.connects += 1;
  const ws = new WebSocket(wsUrl());
  conn.ws = ws;
  ws.onmessage = (ev) => {
    if (conn.ws !== ws) return;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    onFrame(frame);
  };
  ws.onclose = (ev) => {
    if (conn.ws !== ws) return;
    conn.ws = null;
    stopHeartbeat();
    onClosed(ev.code, ev.reason, conn.opened);
  };
}

async function onClosed(code, reason, wasOpen) {
  if (conn.stopped) return;
  if (code === 4401) return unauthorized('Your token expired or was revoked.');
  if (code === 4403 || code === 4404) {
    // That session is gone or not ours: start a fresh one (the transcript on
    // screen stays, but new replies land in a new session).
    const note = code === 4404 ? 'Your previous session no longer exists; a new one was started.' : 'That session belongs to another user; a new one was started.';
    endTurnsOfLostSession();
    state.sessionId = null;
    state.lastSeq = 0;
    save();
    showInfo(note);
    return connect();
  }
  if (!wasOpen) {
    // The upgrade failed. A browser cannot see why, so ask the API whether
    // the token is still good before retrying.
    try {
      const { status } = await api('/api/me');
      if (status === 401) return unauthorized('The gateway does not accept this token.');
    } catch {
      // Gateway unreachable: retry below.
    }
  }
  if (code === 4408) {
    // Too slow for the live stream: resume at once from last_seq.
    return connect();
  }
  scheduleReconnect();
}

/** Wait before reconnect attempt `attempt` (0-based): 2, 4, 8, 16, 30 s, then 30 s; ±10 %. */
function reconnectDelayMs(attempt) {
  const base = attempt < BACKOFF_S.length ? BACKOFF_S[attempt] : STEADY_RETRY_S;
  return base * 1000 * (0.9 + Math.random() * 0.2);
}

function scheduleReconnect() {
  const delayMs = reconnectDelayMs(conn.attempt);
  conn.attempt += 1;
  conn.retryAt = Date.now() + delayMs;
  conn.retryTimer = setTimeout(connect, delayMs);
  setStatus('offline', 'offline');
  $('conn-banner').hidden = false;
  const tick = () => {
    const left = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
    $('conn-text').textContent = `Connection lost. Reconnecting in ${left} s (attempt ${conn.attempt})…`;
  };
  tick();
  conn.countdownTimer = setInterval(tick, 1000);
}

function clearRetry() {
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  conn.retryTimer = null;
  conn.countdownTimer = null;
}

function heartbeat() {
  if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return;
  conn.pingId += 1;
  send({ type: 'ping', id: conn.pingId });
  clearTimeout(conn.pongTimer);
  conn.pongTimer = setTimeout(() => {
    // No pong: the socket is dead (a half-open TCP connection, a frozen
    // gateway) even if the browser has not noticed. Its close event may take
    // minutes to come, so reconnect now on a new socket.
    stats.heartbeatTimeouts += 1;
    const dead = conn.ws;
    if (!dead) return;
    dead.onclose = null;
    dead.onmessage = null;
    conn.ws = null;
    stopHeartbeat();
    try { dead.close(4000, 'heartbeat timeout'); } catch { /* already closing */ }
    onClosed(1006, 'heartbeat timeout', true);
  }, PONG_TIMEOUT_MS);
}

function startHeartbeat() {
  stopHeartbeat();
  conn.heartbeat = setInterval(heartbeat, HEARTBEAT_MS);
}

function stopHeartbeat() {
  clearInterval(conn.heartbeat);
  clearTimeout(conn.pongTimer);
}

async function unauthorized(why) {
  conn.stopped = true;
  clearRetry();
  stopHeartbeat();
  if (conn.ws) {
    conn.ws.onclose = null;
    conn.ws.close();
    conn.ws = null;
  }
  clearToken();
  setStatus('signed out', 'offline');
  $('conn-banner').hidden = true;
  await askForToken(`${why} Paste a token to continue.`);
  conn.stopped = false;
  conn.attempt = 0;
  await whoAmI();
  connect();
}

function send(frame) {
  if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
  conn.ws.send(JSON.stringify(frame));
  return true;
}

/** Messages of turns that got no answer yet, in order (sent again on resume). */
function unansweredTurns() {
  const out = [];
  for (const c of state.conversations.values()) {
    for (const t of c.turns) if (!t.done && !t.answered) out.push([c.id, t]);
  }
  return out.sort((a, b) => a[1].sentAt - b[1].sentAt);
}

// ---- frames ----------------------------------------------------------------

function onFrame(f) {
  stats.framesSeen += 1;
  if (f.type === 'session') return onSession(f);
  if (f.ephemeral) return onEphemeral(f);
  if (typeof f.seq === 'number') {
    if (f.seq <= state.lastSeq) {
      stats.duplicatesDropped += 1;
      return;
    }
    state.lastSeq = f.seq;
  }
  onEvent(f);
  saveSoon();
}

/**
 * A new session replaces ours: turns the old one had begun will never
 * finish. (Turns it never answered are sent again in the new session.)
 */
function endTurnsOfLostSession() {
  for (const c of state.conversations.values()) {
    for (const t of c.turns) {
      if (t.done || !t.answered) continue;
      t.blocks.push({ kind: 'error', code: 'SESSION_NOT_FOUND', message: 'The session ended before this reply finished; send it again.' });
      finishTurn(c.id, t);
    }
  }
  if (state.current) renderTranscript();
}

function onSession(f) {
  const resumed = state.sessionId !== null && f.session_id === state.sessionId;
  if (!resumed) state.lastSeq = f.last_seq || 0;
  if (!resumed && state.sessionId !== null) endTurnsOfLostSession();
  state.sessionId = f.session_id;
  state.userId = f.user_id || state.userId;
  conn.opened = true;
  conn.everConnected = true;
  if (resumed) stats.resumes += 1;
  conn.attempt = 0;
  clearRetry();
  $('conn-banner').hidden = true;
  startHeartbeat();
  if (f.user_id) $('user').textContent = f.user_id;
  if (f.state === 'RUNNING' || f.state === 'IDLE') setStatus(statusText.ready || 'ready', 'ok');
  else if (resumed) setStatus('connected · session resumed', 'ok');
  else if (f.state === 'STOPPED') setStatus('connected · your sandbox starts with your first message', 'ok');
  else setStatus('connected · your sandbox is starting…', 'busy');
  save();
  send({ type: 'list_conversations' });
  // Anything the gateway may not have got: it ignores ids it already has.
  for (const [cid, turn] of unansweredTurns()) {
    send({ type: 'message', id: turn.id, conversation_id: cid, content: turn.user });
  }
}

function onEphemeral(f) {
  if (f.type === 'pong') {
    stats.pongs += 1;
    clearTimeout(conn.pongTimer);
    return;
  }
  if (f.type === 'conversations') {
    for (const s of f.conversations || []) {
      const c = conversation(s.conversation_id);
      if (s.title) c.title = s.title;
    }
    renderConversationList();
    // Conversations this tab did not see live (another tab, an earlier
    // visit): fetch their stored messages, a few at a time.
    const unseen = (f.conversations || []).map((s) => s.conversation_id).filter((id) => !state.conversations.get(id).turns.length);
    unseen.slice(0, 20).forEach(loadHistory);
    return;
  }
  if (f.type === 'info') {
    // A resent message the gateway already had: nothing to tell the user.
    if (/already accepted/.test(f.message || '')) return;
    return showInfo(f.message);
  }
  if (f.type === 'error') return onError(f);
}

const statusText = { ready: null };

function onEvent(f) {
  switch (f.type) {
    case 'status':
      return onStatus(f);
    case 'session_recovered':
      setStatus('restored your session', 'ok');
      return showInfo('Your sandbox was restarted and your conversations restored.');
    case 'init': {
      const name = [f.agent, f.version].filter(Boolean).join(' ');
      $('agent').textContent = name ? `agent: ${name}` : '';
      return;
    }
    case 'thinking':
      return addBlock(f.conversation_id, { kind: 'thinking', text: f.content || '' });
    case 'text_delta':
      stats.deltas += 1;
      return appendText(f.conversation_id, f.delta);
    case 'content':
      return onContent(f.conversation_id, f.content);
    case 'tool_call':
      return addBlock(f.conversation_id, { kind: 'tool', id: f.tool_call_id, name: f.tool_name, input: f.tool_input, result: null, isError: false });
    case 'tool_result':
      return onToolResult(f);
    case 'ask_question':
      return addBlock(f.conversation_id, { kind: 'question', requestId: f.request_id, question: f.question, options: f.options || [], answer: null });
    case 'progress': {
      const t = turnFor(f.conversation_id);
      if (t) { t.usage = f.token_usage; renderTurnFooter(t); }
      return;
    }
    case 'finish':
      return onFinish(f);
    case 'conversation_update': {
      const c = conversation(f.conversation_id);
      if (f.title) c.title = f.title;
      return renderConversationList();
    }
    case 'info':
      return showInfo(f.message);
    case 'error':
      return onError(f);
    default:
      return undefined;
  }
}

function onStatus(f) {
  const eta = f.eta_ms ? Math.max(1, Math.round(f.eta_ms / 1000)) : null;
  if (f.state === 'starting' || f.state === 'restarting') {
    const again = f.state === 'restarting';
    if (f.source === 'warm') setStatus(again ? 'restarting (warm)…' : 'starting (warm)…', 'busy');
    else setStatus(`${again ? 'restarting your sandbox' : 'starting a new sandbox'}${eta ? ` (about ${eta} s)` : ''}…`, 'busy');
  } else if (f.state === 'ready') {
    statusText.ready = f.source === 'warm' ? 'ready (warm start)' : 'ready';
    if (!/restored/.test($('status').textContent)) setStatus(statusText.ready, 'ok');
  } else if (f.state === 'stopped') {
    statusText.ready = null;
    setStatus('sandbox stopped — your next message starts it again', 'idle');
  }
}

function onError(f) {
  const e = f.error || {};
  if (e.code === 'UNAUTHORIZED') return unauthorized(e.message || 'Your token was refused.');
  if (f.conversation_id) {
    addBlock(f.conversation_id, { kind: 'error', code: e.code, message: e.message });
    const t = turnFor(f.conversation_id);
    if (t) finishTurn(f.conversation_id, t);
    return;
  }
  if (e.code === 'SESSION_NOT_FOUND' || e.code === 'FORBIDDEN') return; // the close code handles it
  showBanner(e.code, e.message);
  // A failed start ends every turn waiting for it: the user may retry.
  if (['TASK_START_FAILED', 'TASK_RESTART_FAILED', 'TASK_CONNECT_TIMEOUT', 'QUOTA_EXCEEDED', 'AGENT_CRASHED'].includes(e.code)) {
    setStatus('not running', 'idle');
  }
}

// ---- transcript model -------------------------------------------------------

/** The turn an event belongs to: the oldest unfinished turn of its conversation. */
function turnFor(cid) {
  const c = cid ? conversation(cid) : runningConversation();
  if (!c) return null;
  const open = c.turns.find((t) => !t.done);
  if (open) return open;
  if (c.turns.length) return c.turns[c.turns.length - 1];
  // Events of a turn this tab did not start (another tab, or a replay).
  const t = { id: newId('m-'), user: null, blocks: [], done: false, sentAt: Date.now() };
  c.turns.push(t);
  if (c.id === state.current) renderTranscript();
  return t;
}

function runningConversation() {
  if (state.current && state.conversations.has(state.current)) return state.conversations.get(state.current);
  for (const c of state.conversations.values()) if (c.turns.some((t) => !t.done)) return c;
  return null;
}

function addBlock(cid, block) {
  const c = cid ? conversation(cid) : runningConversation();
  if (!c) return;
  const t = turnFor(c.id);
  t.answered = true;
  t.blocks.push(block);
  if (c.id === state.current) {
    renderBlockInto(t, block);
    renderTurnFooter(t);
    scrollDown();
  }
}

function appendText(cid, delta) {
  const c = conversation(cid);
  const t = turnFor(cid);
  if (!t.answered) {
    t.answered = true;
    renderTurnFooter(t);
  }
  const last = t.blocks[t.blocks.length - 1];
  if (last && last.kind === 'tool' && last.result === null) {
    // Text streamed while a tool runs is that tool's live output (the shell
    // agent streams a command's output, then sends it whole as the result):
    // show it inside the tool, not a second time as reply text.
    last.live = (last.live || '') + delta;
    const out = last.node && last.node.querySelector('.tool-live');
    if (out) out.firstChild.appendData(delta);
    else if (last.node) last.node.replaceWith(renderBlock(last));
  } else if (last && last.kind === 'text' && !last.final) {
    last.text += delta;
    last.deltaText = (last.deltaText || '') + delta;
    if (last.node) last.node.firstChild.appendData(delta);
  } else {
    const block = { kind: 'text', text: delta, deltaText: delta, final: false };
    t.blocks.push(block);
    if (c.id === state.current) renderBlockInto(t, block);
  }
  if (c.id === state.current) scrollDown();
}

/**
 * A complete content block. Agents that streamed it first (deltas, then the
 * whole text) must not show it twice; a different text is a new block.
 */
function onContent(cid, content) {
  const t = turnFor(cid);
  t.answered = true;
  const last = t.blocks[t.blocks.length - 1];
  if (last && last.kind === 'text' && !last.final && content.startsWith(last.text)) {
    last.text = content;
    last.final = true;
    if (last.node) last.node.firstChild.data = content;
    return;
  }
  const block = { kind: 'text', text: content, final: true };
  t.blocks.push(block);
  if (cid === state.current) {
    renderBlockInto(t, block);
    scrollDown();
  }
}

function onToolResult(f) {
  const t = turnFor(f.conversation_id);
  if (!t) return;
  const block = t.blocks.find((b) => b.kind === 'tool' && b.id === f.tool_call_id);
  if (!block) return addBlock(f.conversation_id, { kind: 'tool', id: f.tool_call_id, name: 'tool', input: null, result: f.content, isError: !!f.is_error });
  block.result = f.content;
  block.isError = !!f.is_error;
  if (block.node) block.node.replaceWith(renderBlock(block));
}

function onFinish(f) {
  const t = turnFor(f.conversation_id);
  if (!t) return;
  t.usage = f.token_usage;
  finishTurn(f.conversation_id, t);
}

function finishTurn(cid, t) {
  t.done = true;
  t.answered = true;
  for (const b of t.blocks) if (b.kind === 'text') b.final = true;
  renderTurnFooter(t);
  updateComposer();
  const c = state.conversations.get(cid);
  if (c && !c.title && t.user) {
    c.title = t.user.slice(0, 60);
    renderConversationList();
  }
  saveSoon();
}

// ---- sending -----------------------------------------------------------------

function sendMessage(text) {
  if (!text.trim()) return;
  if (!state.current) {
    state.current = newId('c-');
    conversation(state.current);
  }
  const c = conversation(state.current);
  const turn = { id: newId('m-'), user: text, blocks: [], done: false, answered: false, sentAt: Date.now() };
  c.turns.push(turn);
  if (!c.title) c.title = text.slice(0, 60);
  // Most recent first.
  state.order = [c.id, ...state.order.filter((id) => id !== c.id)];
  renderConversationList();
  renderTurn(turn);
  scrollDown();
  updateComposer();
  save();
  // Offline: it goes out on reconnect (see onSession).
  send({ type: 'message', id: turn.id, conversation_id: c.id, content: text });
}

function abortTurn() {
  if (!state.current) return;
  send({ type: 'abort', conversation_id: state.current });
}

function answerQuestion(block, answer) {
  if (block.answer !== null) return;
  if (!send({ type: 'answer_question', request_id: block.requestId, answer })) {
    return showBanner('OFFLINE', 'Not connected; answer again once the connection is back.');
  }
  block.answer = answer;
  if (block.node) block.node.replaceWith(renderBlock(block));
  for (const c of state.conversations.values()) {
    for (const t of c.turns) if (t.blocks.includes(block)) renderTurnFooter(t);
  }
  saveSoon();
}

// ---- rendering ---------------------------------------------------------------

function setStatus(text, kind) {
  if (stats.statusHistory[stats.statusHistory.length - 1] !== text) {
    stats.statusHistory.push(text);
    if (stats.statusHistory.length > 50) stats.statusHistory.shift();
  }
  const s = $('status');
  s.textContent = text;
  s.className = `status status-${kind}`;
}

function showBanner(code, message) {
  const box = el('div', { class: 'banner banner-error', role: 'alert', dataset: { code } },
    el('strong', {}, code), ' ', message || '',
    el('button', { type: 'button', class: 'icon-button', 'aria-label': 'Dismiss', onclick: () => box.remove() }, '✕'));
  $('messages').append(box);
  scrollDown();
}

function showInfo(message) {
  $('messages').append(el('div', { class: 'info-line' }, message));
  scrollDown();
}

// Follow new output while the user is at the bottom. At most once a frame:
// reading scrollHeight forces a layout, and doing that per delta makes a long
// stream quadratic.
let stickToBottom = true;
let scrollPending = false;
/** Where we last scrolled to; only a scroll above it is the user's. */
let autoScrollTop = 0;
function scrollDown() {
  if (scrollPending) return;
  scrollPending = true;
  requestAnimationFrame(() => {
    scrollPending = false;
    if (stickToBottom) scrollToEnd();
  });
}

function scrollToEnd() {
  const m = $('messages');
  m.scrollTop = m.scrollHeight;
  autoScrollTop = m.scrollTop;
}

function onMessagesScroll() {
  const m = $('messages');
  // Output keeps arriving between our scroll and its event, so distance from
  // the bottom alone cannot tell a user's scroll from ours.
  if (m.scrollHeight - m.scrollTop - m.clientHeight < 80) stickToBottom = true;
  else if (m.scrollTop < autoScrollTop - 4) stickToBottom = false;
}

function renderTranscript() {
  const m = $('messages');
  m.replaceChildren();
  const c = state.current ? state.conversations.get(state.current) : null;
  if (!c || c.turns.length === 0) {
    m.append(el('div', { id: 'empty', class: 'empty' },
      el('h1', {}, c ? 'New conversation' : 'Your agent shell'),
      el('p', {}, 'Type a message below. The agent runs in your own sandbox, in your own workspace.'),
      agentHint(),
      el('p', { class: 'muted' }, 'Enter sends · Shift+Enter adds a line')));
  } else {
    for (const t of c.turns) renderTurn(t);
  }
  stickToBottom = true;
  scrollToEnd();
  updateComposer();
}

/** What to try first, for the built-in demo agents. */
function agentHint() {
  const examples = { shell: ['ls -la', 'uname -a && df -h .', 'echo hello > notes.txt && cat notes.txt'], echo: ['hello', '/stream 20', '/ask Ship it?'] }[state.agentKind];
  if (!examples) return null;
  const what = state.agentKind === 'shell'
    ? 'This gateway runs the shell agent: each message runs as a shell command in your workspace. Try:'
    : 'This gateway runs the echo agent (for tests): it repeats what you send. Try:';
  const fill = (text) => { $('input').value = text; $('input').focus(); };
  return el('div', { class: 'hint' }, el('p', {}, what),
    el('div', { class: 'examples' }, examples.map((x) => el('button', { type: 'button', class: 'example', onclick: () => fill(x) }, x))));
}

function renderTurn(t) {
  $('empty')?.remove();
  const node = el('article', { class: 'turn', dataset: { turn: t.id } });
  if (t.user !== null && t.user !== undefined) node.append(el('div', { class: 'msg user' }, el('div', { class: 'bubble' }, t.user)));
  const reply = el('div', { class: 'msg assistant' });
  node.append(reply, el('div', { class: 'turn-footer' }));
  // Not enumerable: DOM nodes stay out of session storage.
  Object.defineProperty(t, 'node', { value: node, enumerable: false, writable: true, configurable: true });
  $('messages').append(node);
  for (const b of t.blocks) reply.append(renderBlock(b));
  renderTurnFooter(t);
}

function renderBlockInto(t, block) {
  if (!t.node || !t.node.isConnected) renderTurn(t);
  else t.node.querySelector('.assistant').append(renderBlock(block));
}

function renderBlock(b) {
  let node;
  switch (b.kind) {
    case 'text':
      node = el('div', { class: 'text' }, document.createTextNode(b.text));
      break;
    case 'thinking':
      node = el('div', { class: 'thinking' }, b.text ? `thinking: ${b.text}` : 'thinking…');
      break;
    case 'tool': {
      const input = b.input === null || b.input === undefined ? '' : (typeof b.input === 'object' && b.input.command ? b.input.command : JSON.stringify(b.input, null, 2));
      // Short results start open; long ones stay folded until clicked.
      const short = b.result !== null && b.result.split('\n').length <= 12 && b.result.length <= 1500;
      const result = b.result === null
        ? (b.live ? el('pre', { class: 'tool-live' }, document.createTextNode(b.live)) : el('div', { class: 'tool-running' }, 'running…'))
        : el('details', { class: 'tool-result' + (b.isError ? ' is-error' : ''), open: short },
          el('summary', {}, b.isError ? 'result (error)' : 'result', el('span', { class: 'muted' }, ` · ${formatBytes(new Blob([b.result]).size)}`)),
          el('pre', {}, b.result));
      node = el('div', { class: 'tool', dataset: { tool: b.name } },
        el('div', { class: 'tool-head' }, el('span', { class: 'tool-name' }, b.name), el('code', { class: 'tool-input' }, input)),
        result);
      break;
    }
    case 'question': {
      node = el('div', { class: 'question', dataset: { request: b.requestId } }, el('div', { class: 'question-text' }, b.question));
      if (b.answer !== null) {
        node.append(el('div', { class: 'answered' }, `You answered: ${b.answer}`));
      } else {
        const row = el('div', { class: 'question-options' });
        for (const o of b.options) row.append(el('button', { type: 'button', class: 'option', onclick: () => answerQuestion(b, o) }, o));
        const free = el('input', { type: 'text', placeholder: 'or type an answer', 'aria-label': 'Answer' });
        const form = el('form', { class: 'question-free', onsubmit: (ev) => { ev.preventDefault(); if (free.value.trim()) answerQuestion(b, free.value.trim()); } },
          free, el('button', { type: 'submit' }, 'Answer'));
        node.append(row, form);
      }
      break;
    }
    case 'error':
      node = el('div', { class: 'banner ' + (b.code === 'ABORTED' ? 'banner-muted' : 'banner-error'), role: 'alert', dataset: { code: b.code } },
        el('strong', {}, b.code), ' ', b.message || '');
      break;
    default:
      node = el('div', {}, '');
  }
  Object.defineProperty(b, 'node', { value: node, enumerable: false, writable: true, configurable: true });
  return node;
}

/** aishell's own folder in a workspace (saved conversations): shown, never offered for deletion. */
function isInternal(path) {
  return path === '.aishell' || path.startsWith('.aishell/');
}

/** How a finished turn ended: 'failed' under an error, 'stopped' when aborted, else 'done'. */
function turnOutcome(t) {
  const error = t.blocks.find((b) => b.kind === 'error');
  if (!error) return 'done';
  return error.code === 'ABORTED' ? 'stopped' : 'failed';
}

function renderTurnFooter(t) {
  if (!t.node) return;
  const footer = t.node.querySelector('.turn-footer');
  footer.replaceChildren();
  if (!t.done) {
    const asking = t.blocks.some((b) => b.kind === 'question' && b.answer === null);
    const text = asking ? 'waiting for your answer' : (t.answered ? 'working' : 'waiting for the agent');
    footer.append(el('span', { class: asking ? '' : 'working' }, text));
  } else {
    const u = t.usage || {};
    const tokens = (u.input_tokens || 0) + (u.output_tokens || 0);
    const outcome = turnOutcome(t);
    footer.append(el('span', { class: 'usage' + (outcome === 'failed' ? ' failed' : ''), dataset: { outcome } },
      tokens ? `${outcome} · ${u.input_tokens || 0} tokens in, ${u.output_tokens || 0} out` : outcome));
  }
  t.node.classList.toggle('done', !!t.done);
}

function renderConversationList() {
  const list = $('conversations');
  list.replaceChildren();
  for (const id of state.order) {
    const c = state.conversations.get(id);
    if (!c) continue;
    const running = c.turns.some((t) => !t.done);
    const item = el('li', { class: id === state.current ? 'active' : '', dataset: { conversation: id } },
      el('button', { type: 'button', class: 'conversation', onclick: () => switchTo(id) },
        running ? el('span', { class: 'dot', title: 'running' }) : null,
        c.title || 'Untitled'),
      el('button', { type: 'button', class: 'icon-button delete', title: 'Delete conversation', 'aria-label': 'Delete conversation', onclick: () => deleteConversation(id) }, '✕'));
    list.append(item);
  }
}

const historyLoaded = new Set();

/** Show a conversation's stored messages (user messages and final replies). */
async function loadHistory(cid) {
  if (historyLoaded.has(cid) || !state.sessionId) return;
  historyLoaded.add(cid);
  const c = state.conversations.get(cid);
  if (!c || c.turns.length) return;
  let res;
  try {
    res = await api(`/api/sessions/${encodeURIComponent(state.sessionId)}/conversations/${encodeURIComponent(cid)}/messages`);
  } catch {
    historyLoaded.delete(cid);
    return;
  }
  if (res.status !== 200 || c.turns.length) return;
  let turn = null;
  for (const m of res.body.messages) {
    if (m.role === 'user') {
      turn = { id: m.id || newId('m-'), user: m.content, blocks: [], done: true, answered: true, sentAt: m.created_at * 1000 };
      c.turns.push(turn);
    } else if (turn) {
      turn.blocks.push({ kind: 'text', text: m.content, final: true });
    }
  }
  if (!c.title && c.turns.length) c.title = c.turns[0].user.slice(0, 60);
  renderConversationList();
  if (state.current === cid) renderTranscript();
  saveSoon();
}

/** A new tab picks up the user's latest session, so their conversations are there. */
async function adoptLatestSession() {
  try {
    const { status, body } = await api('/api/sessions');
    if (status !== 200) return;
    const mine = body.sessions
      .filter((x) => x.user_id === state.userId && x.state !== 'TERMINATED')
      .sort((a, b) => b.updated_at - a.updated_at);
    if (mine.length && !state.sessionId) {
      state.sessionId = mine[0].session_id;
      // Events after what the store had are replayed; earlier turns come from history.
      state.lastSeq = mine[0].last_seq;
      save();
    }
  } catch {
    // No list: a new session it is.
  }
}

function switchTo(id) {
  loadHistory(id);
  state.current = id;
  document.body.classList.remove('show-sidebar');
  renderConversationList();
  renderTranscript();
  save();
}

function newConversation() {
  state.current = null;
  document.body.classList.remove('show-sidebar');
  renderConversationList();
  renderTranscript();
  save();
  $('input').focus();
}

function deleteConversation(id) {
  send({ type: 'delete_conversation', conversation_id: id });
  state.conversations.delete(id);
  state.order = state.order.filter((x) => x !== id);
  if (state.current === id) state.current = null;
  renderConversationList();
  renderTranscript();
  save();
}

function updateComposer() {
  const c = state.current ? state.conversations.get(state.current) : null;
  const running = !!c && c.turns.some((t) => !t.done);
  $('abort').hidden = !running;
  renderConversationList();
}

// ---- files panel -------------------------------------------------------------

const files = { dir: '', viewing: null };

function joinPath(dir, name) {
  return dir ? `${dir}/${name}` : name;
}

function encodePath(path) {
  return path.split('/').map(encodeURIComponent).join('/');
}

async function listFiles() {
  const err = $('files-error');
  err.hidden = true;
  const { status, body } = await api(`/api/files?dir=${encodeURIComponent(files.dir)}`);
  if (status !== 200) {
    err.textContent = errorText(body, `could not list files (HTTP ${status})`);
    err.hidden = false;
    return;
  }
  $('files-path').textContent = '/' + files.dir;
  const list = $('files-list');
  list.replaceChildren();
  if (files.dir) {
    const up = files.dir.split('/').slice(0, -1).join('/');
    list.append(el('li', {}, el('button', { type: 'button', class: 'file dir', onclick: () => { files.dir = up; listFiles(); } }, '..')));
  }
  const entries = [...body.entries].sort((a, b) => (a.type === 'dir' ? 0 : 1) - (b.type === 'dir' ? 0 : 1) || a.name.localeCompare(b.name));
  for (const e of entries) {
    const path = joinPath(files.dir, e.name);
    const open = e.type === 'dir'
      ? () => { files.dir = path; listFiles(); }
      : () => viewFile(path, e.size);
    list.append(el('li', { dataset: { name: e.name } },
      el('button', { type: 'button', class: 'file ' + e.type, onclick: open }, e.type === 'dir' ? e.name + '/' : e.name),
      e.type === 'dir' ? null : el('span', { class: 'muted size' }, formatBytes(e.size)),
      e.type === 'dir' ? null : el('button', { type: 'button', class: 'icon-button', title: 'Download', 'aria-label': `Download ${e.name}`, onclick: () => download(path) }, '⬇'),
      isInternal(path) ? null : el('button', { type: 'button', class: 'icon-button', title: 'Delete', 'aria-label': `Delete ${e.name}`, onclick: () => removeFile(path) }, '✕')));
  }
  if (!entries.length) list.append(el('li', { class: 'muted' }, 'empty'));
}

async function fetchFile(path) {
  const { status, res } = await api(`/api/files/${encodePath(path)}`, { raw: true });
  if (status !== 200) {
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    throw new Error(errorText(body, `HTTP ${status}`));
  }
  return res.blob();
}

const IMAGE = /\.(png|jpe?g|gif|webp|svg)$/i;

async function viewFile(path, size) {
  const viewer = $('files-viewer');
  const body = $('viewer-body');
  $('viewer-name').textContent = path;
  viewer.hidden = false;
  files.viewing = path;
  body.replaceChildren(el('span', { class: 'muted' }, 'loading…'));
  try {
    if (size > 2 * 1024 * 1024) {
      body.replaceChildren(el('p', {}, `${formatBytes(size)}: too large to show here; download it.`));
      return;
    }
    const blob = await fetchFile(path);
    if (IMAGE.test(path)) {
      const type = /\.svg$/i.test(path) ? 'image/svg+xml' : '';
      const url = URL.createObjectURL(type ? new Blob([blob], { type }) : blob);
      body.replaceChildren(el('img', { src: url, alt: path }));
      return;
    }
    const bytes = new Uint8Array(await blob.arrayBuffer());
    try {
      const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
      body.replaceChildren(el('pre', {}, text));
    } catch {
      body.replaceChildren(el('p', {}, 'Binary file; download it to open.'));
    }
  } catch (e) {
    body.replaceChildren(el('p', { class: 'error-text' }, e.message));
  }
}

async function download(path) {
  try {
    const blob = await fetchFile(path);
    const url = URL.createObjectURL(blob);
    const a = el('a', { href: url, download: path.split('/').pop() });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    $('files-error').textContent = e.message;
    $('files-error').hidden = false;
  }
}

async function removeFile(path) {
  const { status, body } = await api(`/api/files/${encodePath(path)}`, { method: 'DELETE' });
  if (status !== 204) {
    $('files-error').textContent = errorText(body, `could not delete (HTTP ${status})`);
    $('files-error').hidden = false;
  }
  listFiles();
}

async function upload(fileList) {
  for (const f of fileList) {
    const { status, body } = await api(`/api/files/${encodePath(joinPath(files.dir, f.name))}`, { method: 'PUT', body: f });
    if (status !== 201) {
      $('files-error').textContent = errorText(body, `upload of ${f.name} failed (HTTP ${status})`);
      $('files-error').hidden = false;
    }
  }
  listFiles();
}

// ---- start -------------------------------------------------------------------

async function whoAmI() {
  const { status, body } = await api('/api/me');
  if (status === 200) {
    state.userId = body.user_id;
    if (body.agent !== state.agentKind) {
      state.agentKind = body.agent;
      if (!state.current) renderTranscript();
    }
    $('user').textContent = body.user_id;
    $('admin-link').hidden = !body.admin;
  }
  return status;
}

function wireUi() {
  const input = $('input');
  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    input.value = '';
    autoGrow();
    sendMessage(text);
  });
  const autoGrow = () => {
    input.style.height = 'auto';
    input.style.height = Math.min(input.scrollHeight, 240) + 'px';
  };
  input.addEventListener('input', autoGrow);
  input.addEventListener('keydown', (ev) => {
    // Enter sends, Shift+Enter is a newline; never while composing (IME).
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('messages').addEventListener('scroll', onMessagesScroll, { passive: true });
  $('abort').addEventListener('click', abortTurn);
  $('new-conversation').addEventListener('click', newConversation);
  $('reconnect-now').addEventListener('click', () => {
    conn.attempt = Math.max(0, conn.attempt - 1);
    connect();
  });
  $('toggle-sidebar').addEventListener('click', () => document.body.classList.toggle('show-sidebar'));
  $('toggle-files').addEventListener('click', () => {
    const panel = $('files');
    panel.hidden = !panel.hidden;
    if (!panel.hidden) listFiles();
  });
  $('files-close').addEventListener('click', () => { $('files').hidden = true; });
  $('files-refresh').addEventListener('click', listFiles);
  $('files-upload').addEventListener('change', (ev) => { upload(ev.target.files); ev.target.value = ''; });
  $('viewer-close').addEventListener('click', () => { $('files-viewer').hidden = true; });
  $('viewer-download').addEventListener('click', () => files.viewing && download(files.viewing));
  // The debounced save may not have run yet.
  window.addEventListener('pagehide', save);
  // Back online after the OS says so: do not wait for the backoff.
  window.addEventListener('online', () => { if (!conn.ws && !conn.stopped) connect(); });
}

async function main() {
  takeTokenFromUrl();
  load();
  wireUi();
  renderConversationList();
  renderTranscript();
  if (!getToken()) {
    await askForToken('Open the URL that `aishell serve` printed, or paste a token.');
  }
  let status = 0;
  try {
    status = await whoAmI();
  } catch {
    status = 0;
  }
  if (status === 401) {
    clearToken();
    await askForToken('The gateway does not accept this token.');
    await whoAmI();
  }
  if (!state.sessionId && state.userId) await adoptLatestSession();
  connect();
}

// For the browser tests and for debugging from the console.
window.aishell = {
  state,
  stats,
  reconnectDelayMs,
  save,
  /** Send the heartbeat ping now instead of waiting for the 30 s tick. */
  pingNow: heartbeat,
  /** Drop the socket as a network failure would (the page reconnects). */
  dropSocket() {
    if (conn.ws) conn.ws.close(4000, 'dropped for a test');
  },
  /** Text that arrived as deltas in a conversation (no `content` merged in). */
  deltaText(cid) {
    const c = state.conversations.get(cid || state.current);
    if (!c) return '';
    return c.turns.flatMap((t) => t.blocks).filter((b) => b.kind === 'text').map((b) => b.deltaText || '').join('');
  },
};

main();
