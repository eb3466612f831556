// The live demo at /demo: sign in, a board of projects that follows every
// change as it happens, who else is looking, and the connection's state.
import { Gateway } from "/client/gateway.js";

// Presence needs the gateway started with PRESENCE_CHANNELS=projects.
const BOARD = "projects";
const $ = (selector) => document.querySelector(selector);

let gw = null;
let me = { sub: null, email: null };
const projects = new Map(); // id -> project
// id -> the version it was deleted at. Ids are never reused, so a later event of that id
// that is not newer is stale: an update published after the deletion that followed it (two
// processes publish in the order their writes finish; a relayed event comes late).
const deletedAt = new Map();
const DELETED_KEPT = 10_000; // the oldest are forgotten past this
let held = null; // change events that arrive while the board loads
const watchers = new Map(); // presence client id -> user id
const names = new Map(); // user id -> display name (from presence info)

// -- Signing in: the core's accounts API (docs/auth.md) ------------------------

const auth = { access: null, refresh: null, expires: 0, refreshing: null };

const problem = (r) => r.body?.error?.message ?? `HTTP ${r.status}`;

async function post(path, body, form = false) {
  const r = await fetch(path, {
    method: "POST",
    headers: form ? {} : { "Content-Type": "application/json" },
    body: form ? new URLSearchParams(body) : JSON.stringify(body),
  });
  return { status: r.status, body: await r.json().catch(() => null) };
}

function keep(tokens) {
  auth.access = tokens.access_token;
  auth.refresh = tokens.refresh_token ?? null;
  auth.expires = Date.now() + (tokens.expires_in ?? 0) * 1000;
}

async function signIn(email, password, name) {
  const login = () => post("/api/auth/token", { grant_type: "password", username: email, password }, true);
  let r = await login();
  if (r.status === 400 && r.body?.error?.code === "invalid_grant") {
    const made = await post("/api/auth/register", { email, password, display_name: name || email.split("@")[0] });
    if (made.status === 409) throw new Error("wrong e-mail or password");
    if (made.status !== 201) throw new Error(problem(made));
    r = await login();
  }
  if (r.status !== 200) throw new Error(problem(r));
  keep(r.body);
}

async function getToken({ reason }) {
  const fresh = auth.expires - Date.now() > 120_000;
  if (!auth.refresh || (reason === "connect" && fresh)) return auth.access;
  // One refresh at a time: the core takes two uses of a refresh token as theft.
  auth.refreshing ??= post("/api/auth/refresh", { refresh_token: auth.refresh }).then((r) => {
    if (r.status !== 200) throw new Error(problem(r));
    keep(r.body);
  }).finally(() => { auth.refreshing = null; });
  await auth.refreshing;
  return auth.access;
}

function claims(token) {
  const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(payload));
}

// -- The board -------------------------------------------------------------

function apply(event) {
  if (held) { held.push(event); return; }
  const gone = deletedAt.get(event.id);
  if (gone !== undefined && event.version <= gone) return; // its deletion came first
  const known = projects.get(event.id);
  if (known && known.version > event.version) return; // older than what is shown
  if (event.type === "deleted") {
    projects.delete(event.id);
    deletedAt.set(event.id, event.version);
    if (deletedAt.size > DELETED_KEPT) deletedAt.delete(deletedAt.keys().next().value);
  } else projects.set(event.id, event.data);
  redraw(event.id);
}

async function loadBoard() {
  held = [];
  const loaded = new Map();
  try {
    let cursor = null;
    do {
      const page = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
      const r = await gw.rpc("GET", `/api/projects?limit=100${page}`);
      if (r.status !== 200) throw new Error(problem(r));
      for (const project of r.body.items) loaded.set(project.id, project);
      cursor = r.body.next_cursor;
    } while (cursor);
    projects.clear();
    for (const [id, project] of loaded) projects.set(id, project);
  } catch (err) {
    log(`could not load the board: ${err.message}`);
  } finally {
    const events = held;
    held = null;
    render();
    events.forEach(apply);
  }
}

const items = new Map(); // id -> its <li> on the board

function item(p) {
  const li = document.createElement("li");
  li.dataset.id = p.id;
  const text = document.createElement("span");
  const name = document.createElement("b");
  name.textContent = p.name;
  const details = document.createElement("small");
  details.textContent = `${p.status} · ${p.budget} · ${p.owner_email}`;
  text.append(name, details);
  const remove = document.createElement("button");
  remove.textContent = "Delete";
  remove.onclick = async () => {
    const r = await gw.rpc("DELETE", `/api/projects/${p.id}`);
    if (r.status !== 204 && r.status !== 404) log(`delete failed: ${problem(r)}`);
  };
  li.append(text, remove);
  return li;
}

// The whole board, once loaded. A change redraws its own item only: redrawing every item
// for each event kept a board of 5,000 projects busy ~130 ms an event, and anyone may
// change their own projects twenty times a second.
function render() {
  items.clear();
  const sorted = [...projects.values()].sort((a, b) => b.id - a.id);
  $("#projects").replaceChildren(...sorted.map((p) => {
    const li = item(p);
    items.set(p.id, li);
    return li;
  }));
}

function redraw(id) {
  $("#projects .fresh")?.classList.remove("fresh");
  const old = items.get(id);
  const p = projects.get(id);
  if (!p) {
    old?.remove();
    items.delete(id);
    return;
  }
  const li = item(p);
  li.className = "fresh";
  items.set(id, li);
  if (old) { old.replaceWith(li); return; }
  let next = $("#projects").firstElementChild; // newest first: before the first older one
  while (next && Number(next.dataset.id) > id) next = next.nextElementSibling;
  $("#projects").insertBefore(li, next);
}

async function create(event) {
  event.preventDefault();
  const body = {
    name: $("#project-name").value,
    budget: Number($("#project-budget").value || 0),
    owner_email: me.email ?? "demo@example.com",
    starts_on: new Date().toISOString().slice(0, 10),
  };
  const r = await gw.rpc("POST", "/api/projects", body).catch((err) => ({ status: 0, body: null, err }));
  $("#create-error").textContent = r.status === 201 ? "" : r.err?.message ?? problem(r);
  if (r.status !== 201) return;
  $("#project-name").value = "";
  apply({ type: "created", id: r.body.id, version: r.body.version, data: r.body });
}

// -- Presence -------------------------------------------------------------------

async function loadPresence() {
  try {
    const entries = await gw.presence(BOARD);
    watchers.clear();
    for (const { client, user, info } of entries) watch(client, user, info);
    renderPresence();
  } catch (err) {
    $("#presence").textContent = err.code === 116
      ? `presence is off: start the gateway with PRESENCE_CHANNELS=${BOARD}`
      : `presence unavailable: ${err.message}`;
  }
}

// Issued tokens carry {"info": {"name": display name}}, shown in presence:
// another user's account is not readable (docs/security.md).
function watch(client, user, info) {
  watchers.set(client, user);
  if (typeof info?.name === "string") names.set(user, info.name);
}

function nameOf(user) {
  return names.get(user) ?? `user ${user}`;
}

function renderPresence() {
  const users = [...new Set(watchers.values())].sort();
  $("#presence").replaceChildren(...users.map((user) => {
    const item = document.createElement("li");
    item.textContent = nameOf(user) + (user === me.sub ? " (you)" : "");
    return item;
  }));
}

// -- The connection ----------------------------------------------------------------

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("#log").prepend(item);
}

async function start() {
  me = { ...me, sub: claims(auth.access).sub };
  $("#signin").hidden = true;
  $("#board").hidden = false;
  gw = new Gateway(location.origin, { getToken, maxDelay: 5000 });
  window.demo = { gw };
  gw.on("state", (state, info) => {
    $("#status").dataset.state = state;
    $("#status").textContent = state;
    log(state + (info.code ? ` (close ${info.code}${info.reason ? `: ${info.reason}` : ""})` : ""));
    if (info.transport) $("#transport").textContent = info.transport;
    if (state === "connected") loadPresence();
  });
  gw.on("recovered", ({ ch, recovered }) => {
    const recovery = $("#recovery");
    recovery.dataset.recovered = recovered;
    recovery.textContent = recovered ? "recovered: missed changes replayed" : "history lost: board reloaded";
    log(`${ch}: ${recovery.textContent}`);
    if (!recovered && ch === BOARD) loadBoard();
  });
  gw.on("error", (err) => log(`error: ${err.message}`));
  gw.subscribe(BOARD, {
    onMessage: apply,
    onJoin: ({ client, user, info }) => { watch(client, user, info); renderPresence(); },
    onLeave: ({ client }) => { watchers.delete(client); renderPresence(); },
  });
  await gw.connect();
  await loadBoard();
}

function failed(err) {
  $("#signin-error").textContent = err.message;
  $("#signin").hidden = false;
  $("#board").hidden = true;
}

$("#signin").addEventListener("submit", (event) => {
  event.preventDefault();
  $("#signin-error").textContent = "";
  me.email = $("#email").value.trim();
  signIn(me.email, $("#password").value, $("#name").value.trim()).then(start).catch(failed);
});

$("#use-token").addEventListener("click", () => {
  keep({ access_token: $("#token").value.trim() });
  Promise.resolve().then(start).catch(failed);
});

$("#create").addEventListener("submit", create);
