// The admin console at /admin (docs/operations.md, "Admin console").
//
// Live figures come over the gateway's own socket: the page subscribes to the
// reserved channel __admin (admins only), where every gateway publishes its
// figures once a second while someone watches. Actions (search a user,
// disconnect, read a channel, publish) are calls of the server API
// (/api/server/), each asked for confirmation when it changes anything.
import { Gateway } from "/client/gateway.js";

const ADMIN_CHANNEL = "__admin";
const WINDOW = 120; // seconds the charts show
const STALE = 5000; // ms without figures before a gateway is dropped from the view
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];
const $ = (selector) => document.querySelector(selector);

// -- Signing in, and the admin's token ------------------------------------------

const auth = { access: null, refresh: null, expires: 0, renewing: null };

async function send(path, body, asForm = false) {
  const headers = asForm ? {} : { "Content-Type": "application/json" };
  if (path.startsWith("/api/server/")) headers.Authorization = `Bearer ${await accessToken()}`;
  const r = await fetch(path, { method: "POST", headers, body: asForm ? new URLSearchParams(body) : JSON.stringify(body) });
  const answer = await r.json().catch(() => null);
  if (!r.ok) throw new Error(answer?.error?.message ?? `HTTP ${r.status}`);
  return answer;
}

function hold(tokens) {
  Object.assign(auth, { access: tokens.access_token, refresh: tokens.refresh_token ?? null,
                        expires: Date.now() + (tokens.expires_in ?? 0) * 1000 });
}

async function accessToken() {
  if (!auth.refresh || auth.expires - Date.now() > 60_000) return auth.access;
  // One renewal at a time: the core takes a refresh token used twice as stolen.
  auth.renewing ??= send("/api/auth/refresh", { refresh_token: auth.refresh }).then(hold)
    .finally(() => { auth.renewing = null; });
  await auth.renewing;
  return auth.access;
}

function role(token) {
  const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part)).role;
}

const api = (name, body = {}) => send(`/api/server/${name}`, body);

// -- Live figures -----------------------------------------------------------------

const latest = new Map(); // node -> its last figures (with .seen, ms)
const times = []; // seconds, one per tick
const past = new Map(); // node -> {connections, connects, deliveries, lag}: arrays like times
const charts = {}; // name -> uPlot
let chartNodes = null; // the gateways the charts were made for (joined)

const CHARTS = {
  connections: { pick: (f) => sum(f.connections), total: "total" },
  connects: { pick: (f) => f.connects_per_second, total: "total" },
  deliveries: { pick: (f) => f.deliveries_per_second, total: "total" },
  lag: { pick: (f) => f.lag_p99_ms, total: "worst" },
};

const sum = (counts) => Object.values(counts).reduce((a, b) => a + b, 0);
const fixed = (x) => (x >= 100 ? Math.round(x).toLocaleString() : (Math.round(x * 10) / 10).toString());
const mb = (bytes) => `${Math.round(bytes / 1048576)} MB`;
const short = (node) => node.split(":").slice(0, 2).join(":");

function tick() {
  const now = Date.now();
  for (const [node, f] of latest) if (now - f.seen > STALE) latest.delete(node);
  times.push(Math.floor(now / 1000));
  for (const node of latest.keys()) {
    if (!past.has(node)) {
      past.set(node, Object.fromEntries(Object.keys(CHARTS).map((k) => [k, times.slice(1).map(() => null)])));
    }
  }
  for (const [node, rows] of past) {
    const f = latest.get(node);
    for (const [name, { pick }] of Object.entries(CHARTS)) rows[name].push(f ? pick(f) : null);
  }
  if (times.length > WINDOW) {
    times.shift();
    for (const rows of past.values()) for (const name in rows) rows[name].shift();
  }
  for (const [node, rows] of past) if (rows.connections.every((v) => v == null)) past.delete(node);
  draw();
  totals();
  tables();
}

function draw() {
  const nodes = [...past.keys()].sort();
  if (nodes.join() !== chartNodes) {
    chartNodes = nodes.join();
    for (const name in CHARTS) {
      charts[name]?.destroy();
      const el = $(`#chart-${name}`);
      const series = [{}, { label: CHARTS[name].total, stroke: "#222", width: 2 },
        ...nodes.map((node, i) => ({ label: short(node), stroke: COLORS[i % COLORS.length] }))];
      charts[name] = new uPlot({ width: Math.max(300, el.clientWidth), height: 170, series,
                                 scales: { x: { time: true } }, legend: { live: false } },
                                 series.map(() => []), el);
    }
  }
  for (const [name, { total }] of Object.entries(CHARTS)) {
    const lines = nodes.map((node) => past.get(node)[name]);
    const overall = times.map((_, i) => {
      const values = lines.map((line) => line[i]).filter((v) => v != null);
      if (!values.length) return null;
      return total === "worst" ? Math.max(...values) : values.reduce((a, b) => a + b, 0);
    });
    charts[name].setData([times, overall, ...lines]);
  }
}

function totals() {
  const all = [...latest.values()];
  $("#total-connections").textContent = all.reduce((n, f) => n + sum(f.connections), 0);
  $("#total-connects").textContent = fixed(all.reduce((n, f) => n + f.connects_per_second, 0));
  $("#total-deliveries").textContent = fixed(all.reduce((n, f) => n + f.deliveries_per_second, 0));
  $("#total-lag").textContent = fixed(Math.max(0, ...all.map((f) => f.lag_p99_ms)));
  $("#total-nodes").textContent = all.length;
}

function cell(row, text, className = "") {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function health(row, value) {
  if (value == null) cell(row, "—");
  else cell(row, value ? "ok" : "down", value ? "good" : "bad");
}

function tables() {
  const body = $("#nodes tbody");
  body.replaceChildren();
  for (const f of [...latest.values()].sort((a, b) => a.node.localeCompare(b.node))) {
    const row = body.insertRow();
    const c = f.connections;
    cell(row, f.node);
    cell(row, f.version);
    cell(row, `${Math.round(f.uptime)} s`);
    cell(row, `${c.websocket ?? 0} / ${c.sse ?? 0} / ${c.longpoll ?? 0}`);
    cell(row, f.subscriptions);
    cell(row, mb(f.memory_bytes));
    health(row, f.redis);
    health(row, f.postgres);
    const hooks = Object.entries(f.hooks ?? {});
    if (!hooks.length) cell(row, "—");
    else {
      const down = hooks.filter(([, ok]) => !ok).map(([name]) => name);
      cell(row, down.length ? `open: ${down.join(", ")}` : "ok", down.length ? "bad" : "good");
    }
  }
  const busy = new Map();
  for (const f of latest.values()) for (const { ch, deliveries } of f.busiest) busy.set(ch, (busy.get(ch) ?? 0) + deliveries);
  const top = [...busy].sort((a, b) => b[1] - a[1]).slice(0, 10);
  $("#busiest tbody").replaceChildren();
  for (const [ch, n] of top) {
    const row = $("#busiest tbody").insertRow();
    cell(row, ch);
    cell(row, n);
  }
}

// -- A user's connections ----------------------------------------------------------

async function searchUser(user) {
  const { connections, missing } = await api("connections", { user });
  const body = $("#connections tbody");
  body.replaceChildren();
  for (const conn of connections) {
    const row = body.insertRow();
    cell(row, conn.client);
    cell(row, short(conn.node));
    cell(row, `${conn.transport} (${conn.codec.replace("gw.v1.", "")})`);
    cell(row, conn.remote);
    cell(row, new Date(conn.since * 1000).toLocaleTimeString());
    cell(row, conn.subscriptions.join(", "));
    const button = document.createElement("button");
    button.textContent = "Disconnect";
    button.addEventListener("click", () => disconnect(user, conn.client));
    row.insertCell().append(button);
  }
  const gone = missing.length ? ` (no answer from ${missing.join(", ")})` : "";
  $("#user-note").textContent = `${connections.length} connection(s) of ${user}${gone}`;
}

async function disconnect(user, client) {
  if (!confirm(`Disconnect connection ${client} of ${user}?`)) return;
  const { count } = await api("disconnect", { user, client });
  $("#user-note").textContent = `disconnected ${count} connection(s)`;
  setTimeout(() => searchUser(user).catch(note("#user-note")), 500);
}

// -- A channel ----------------------------------------------------------------------

let channel = null;

async function openChannel(ch) {
  channel = ch;
  const parts = [];
  try {
    const { num_clients, num_users } = await api("presence_stats", { ch });
    const { presence } = await api("presence", { ch });
    parts.push(`${num_clients} client(s), ${num_users} user(s): ${presence.map((p) => p.user).join(", ")}`);
  } catch (err) {
    parts.push(`presence: ${err.message}`);
  }
  $("#channel-presence").textContent = parts.join(" ");
  const list = $("#channel-history");
  list.replaceChildren();
  try {
    const { offset } = await api("history", { ch, limit: 1 });
    const page = await api("history", { ch, since: Math.max(0, (offset ?? 0) - 20), limit: 20 });
    for (const { offset: at, data } of page.publications) {
      const item = document.createElement("li");
      item.value = at;
      item.textContent = JSON.stringify(data);
      list.append(item);
    }
  } catch (err) {
    $("#channel-note").textContent = `history: ${err.message}`;
  }
}

async function publish(text) {
  if (!channel) throw new Error("open a channel first");
  const data = JSON.parse(text);
  if (!confirm(`Publish to ${channel}: ${text}?`)) return;
  const { offset } = await api("publish", { ch: channel, data });
  $("#channel-note").textContent = `published on ${channel}${offset != null ? ` at offset ${offset}` : ""}`;
  await openChannel(channel);
}

// -- The page ------------------------------------------------------------------------

const note = (selector) => (err) => { $(selector).textContent = err.message; };

async function start() {
  const gw = new Gateway(location.origin, { getToken: accessToken });
  gw.on("state", (state) => {
    $("#status").dataset.state = state;
    $("#status").textContent = state;
  });
  gw.subscribe(ADMIN_CHANNEL, {
    onMessage: (figures) => latest.set(figures.node, { ...figures, seen: Date.now() }),
    onError: note("#signin-error"),
  });
  await gw.connect();
  setInterval(tick, 1000);
}

$("#signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#signin-error").textContent = "";
  try {
    const tokens = await send("/api/auth/token",
      { grant_type: "password", username: $("#email").value, password: $("#password").value }, true);
    if (role(tokens.access_token) !== "admin") throw new Error("this account is not an admin");
    hold(tokens);
    $("#signin").hidden = true;
    $("#console").hidden = false;
    await start();
  } catch (err) {
    note("#signin-error")(err);
  }
});

$("#user-form").addEventListener("submit", (event) => {
  event.preventDefault();
  searchUser($("#user").value.trim()).catch(note("#user-note"));
});

$("#channel-form").addEventListener("submit", (event) => {
  event.preventDefault();
  $("#channel-note").textContent = "";
  openChannel($("#channel").value.trim()).catch(note("#channel-note"));
});

$("#publish-form").addEventListener("submit", (event) => {
  event.preventDefault();
  publish($("#publish-data").value).catch(note("#channel-note"));
});
