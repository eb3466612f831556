/**
 * gateway.js: the browser client of tornado-gateway, protocol v1
 * (docs/protocol.md). One ES module, no build step, no dependencies; the
 * gateway serves it at /client/gateway.js.
 *
 *   import { Gateway } from "/client/gateway.js";
 *
 *   const gw = new Gateway(location.origin, {
 *     getToken: async ({ reason }) => token,   // or token: "eyJ…"
 *     transports: ["websocket", "sse", "longpoll"],
 *     codec: "json",                           // or "msgpack"
 *   });
 *   gw.on("state", (state, info) => …);        // connecting | connected | reconnecting | disconnected
 *   gw.on("recovered", ({ ch, recovered }) => …);  // false: reload that state over REST
 *   gw.on("subscribed", (sub) => { sub.handlers.onMessage = (data) => …; });  // made by the server
 *   await gw.connect();
 *
 *   const sub = gw.subscribe("projects", { onMessage(data, { ch, offset, epoch }) {…},
 *                                          onJoin(info) {…}, onLeave(info) {…}, onGap() {…} });
 *   await sub.ready;                           // the server's reply to the first `sub`
 *   await gw.publish("room:1", { text: "hi" });
 *   const { status, headers, body } = await gw.rpc("GET", "/api/projects?limit=5");
 *   const answer = await gw.call("orders.quote", { items: 3 });  // the call hook's data
 *   await gw.presence("room:1");               // [{user, client, info?}, …]
 *   await gw.presenceStats("room:1");          // {numClients, numUsers}
 *   await gw.history("projects", { since: 40, limit: 20 });  // {offset, epoch, publications}
 *   sub.unsubscribe();
 *   gw.disconnect();
 *
 * Options (all optional but a token, getToken or tokenless):
 *
 *   token          a fixed access token
 *   tokenless      true: connect without any token, the gateway's connect hook
 *                  admitting the browser by its cookies (docs/hooks.md)
 *   getToken       async ({reason}) => token; called before every (re)connect
 *                  (reason "connect", or "expired" after close 4002) and when
 *                  the server pushes `expiring` (reason "expiring": return a
 *                  new token, it is sent in a `refresh` frame)
 *   transports     the order to try; default ["websocket", "sse", "longpoll"]
 *   openAttempts   failed opens of a transport, while the gateway answers
 *                  plain HTTP, before the next one is tried (default 3)
 *   codec          "json" (default) or "msgpack" (WebSocket only: SSE and
 *                  long-poll are JSON), or {subprotocol, binary, encode, decode}
 *   timeout        ms to wait for a reply (default 10000)
 *   minDelay, maxDelay   reconnect backoff bounds in ms (default 250, 10000)
 *   pingInterval   ms between `ping` frames that detect a dead server (default
 *                  20000; 0: never); no reply within `timeout` reconnects
 *
 * Behaviour:
 *
 * - Reconnects after every close that proto/codes.py's should_reconnect
 *   allows, waiting a random time in [0, min(maxDelay, minDelay * 2^attempt)]
 *   ("full jitter"); a 4500-4999 close (or 1008, 1009…) ends in state
 *   "disconnected" with {code, reason}.
 * - Every subscription is sent again after a reconnect with `since` = the
 *   last {offset, epoch} seen, so a history channel gets exactly what it
 *   missed. The "recovered" event says, per channel, whether that worked;
 *   `recovered: false` (history lost, too much missed, or a channel without
 *   history) means the caller must reload the state.
 * - A `subscribed` push (the server API subscribed this connection) makes a
 *   Subscription like the app's own, announced by the "subscribed" event
 *   (set its handlers there); it is sent again after a reconnect with its
 *   last position, and dropped ("unsubscribed") if the token does not allow
 *   it. An `unsubscribed` push ends any subscription. A connect hook's
 *   channels are made again by the server on each new connection: the same
 *   Subscription goes on, what was missed read with `history` ("recovered"
 *   says whether it all was; over SSE the gateway recovers them itself).
 * - A `gap` push on a history channel is repaired with `history` frames;
 *   pushes arriving meanwhile wait (1024 at most: past that the client
 *   reconnects and recovers from the last position), so nothing is
 *   delivered twice or out of order. onGap is called when history cannot
 *   fill the hole.
 * - A frame it cannot use (not JSON/MessagePack, a wrong type) is skipped;
 *   the first on each connection is an "error" event with code "bad_frame".
 * - Failures reject with a GatewayError {code, message, temporary}: the
 *   server's numeric codes (docs/protocol.md), or the client's own
 *   "timeout", "disconnected" (the connection was lost before the reply),
 *   "closed" (disconnect() was called), "unsupported" (not possible over the
 *   transport in use).
 * - Transports: WebSocket carries everything. SSE (EventSource, the token in
 *   the query) receives; publish and rpc then go over HTTP (POST
 *   /api/publish, fetch /api/…), and presence, history and call are
 *   "unsupported".
 *   Long-poll carries everything over plain HTTP.
 * - Publications on channels the server subscribed the connection to (the
 *   connect hook's `subscribe`) have no Subscription: they are emitted as
 *   "publication" events ({ch, data, offset, epoch}).
 * - MessagePack: a small encoder/decoder is built in (msgpackEncode,
 *   msgpackDecode): nil, booleans, integers (64-bit beyond 2^53 as BigInt),
 *   floats, strings, binary (Uint8Array), arrays and maps; no extension types.
 */

export const STATES = Object.freeze(["disconnected", "connecting", "connected", "reconnecting"]);

// The legal state changes. connect() leaves "disconnected"; a first open
// that fails, or a lost connection, goes to "reconnecting", which stays
// until an open succeeds; disconnect() and no-reconnect close codes end in
// "disconnected" from anywhere.
const TRANSITIONS = {
  disconnected: ["connecting"],
  connecting: ["connected", "reconnecting", "disconnected"],
  connected: ["reconnecting", "disconnected"],
  reconnecting: ["connected", "disconnected"],
};

/** Live pushes held back while a gap is repaired from history, at most (the Python client's max_queue). */
const MAX_HELD = 1024;

const DEFAULTS = {
  transports: ["websocket", "sse", "longpoll"],
  openAttempts: 3,
  codec: "json",
  timeout: 10000,
  minDelay: 250,
  maxDelay: 10000,
  pingInterval: 20000,
};

export class GatewayError extends Error {
  constructor(code, message, temporary = false) {
    super(message);
    this.name = "GatewayError";
    this.code = code;
    this.temporary = temporary;
  }
}

/** The client-side rule of proto/codes.py: reconnect after this close code? */
export function shouldReconnect(code) {
  if (code >= 4000 && code <= 4499) return true;
  if (code >= 4500 && code <= 4999) return false;
  return ![1002, 1003, 1007, 1008, 1009, 1010].includes(code);
}

/** Milliseconds before reconnect attempt `attempt` (0, 1, 2…): full jitter. */
export function backoff(attempt, { minDelay = DEFAULTS.minDelay, maxDelay = DEFAULTS.maxDelay } = {},
                        random = Math.random) {
  return random() * Math.min(maxDelay, minDelay * 2 ** attempt);
}

// -- MessagePack ---------------------------------------------------------------

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** One value as MessagePack bytes (Uint8Array). */
export function msgpackEncode(value) {
  let buf = new Uint8Array(256);
  let view = new DataView(buf.buffer);
  let pos = 0;
  const room = (n) => {
    if (pos + n <= buf.length) return;
    const bigger = new Uint8Array(Math.max(buf.length * 2, pos + n));
    bigger.set(buf);
    buf = bigger;
    view = new DataView(buf.buffer);
  };
  const head = (size, small, fixMax, codes) => {
    // fix form, then 8-, 16- and 32-bit lengths (codes[0] may be null: none)
    if (size <= fixMax) { room(1); buf[pos++] = small | size; }
    else if (codes[0] !== null && size < 0x100) { room(2); buf[pos++] = codes[0]; buf[pos++] = size; }
    else if (size < 0x10000) { room(3); buf[pos++] = codes[1]; view.setUint16(pos, size); pos += 2; }
    else { room(5); buf[pos++] = codes[2]; view.setUint32(pos, size); pos += 4; }
  };
  const bytes = (b) => { room(b.length); buf.set(b, pos); pos += b.length; };
  const int = (n) => {
    room(9);
    if (n >= 0) {
      if (n < 0x80) buf[pos++] = n;
      else if (n < 0x100) { buf[pos++] = 0xcc; buf[pos++] = n; }
      else if (n < 0x10000) { buf[pos++] = 0xcd; view.setUint16(pos, n); pos += 2; }
      else if (n < 0x100000000) { buf[pos++] = 0xce; view.setUint32(pos, n); pos += 4; }
      else { buf[pos++] = 0xcf; view.setBigUint64(pos, BigInt(n)); pos += 8; }
    } else if (n >= -32) buf[pos++] = n & 0xff;
    else if (n >= -0x80) { buf[pos++] = 0xd0; view.setInt8(pos, n); pos += 1; }
    else if (n >= -0x8000) { buf[pos++] = 0xd1; view.setInt16(pos, n); pos += 2; }
    else if (n >= -0x80000000) { buf[pos++] = 0xd2; view.setInt32(pos, n); pos += 4; }
    else { buf[pos++] = 0xd3; view.setBigInt64(pos, BigInt(n)); pos += 8; }
  };
  const write = (v) => {
    if (v === null || v === undefined) { room(1); buf[pos++] = 0xc0; }
    else if (v === false || v === true) { room(1); buf[pos++] = v ? 0xc3 : 0xc2; }
    else if (typeof v === "number") {
      if (Number.isSafeInteger(v)) int(v);
      else { room(9); buf[pos++] = 0xcb; view.setFloat64(pos, v); pos += 8; }
    } else if (typeof v === "bigint") {
      if (v < -(2n ** 63n) || v >= 2n ** 64n) throw new RangeError("integer out of MessagePack's range");
      room(9);
      buf[pos++] = v < 0n ? 0xd3 : 0xcf;
      if (v < 0n) view.setBigInt64(pos, v);
      else view.setBigUint64(pos, v);
      pos += 8;
    } else if (typeof v === "string") {
      const b = utf8.encode(v);
      head(b.length, 0xa0, 31, [0xd9, 0xda, 0xdb]);
      bytes(b);
    } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
      const b = v instanceof Uint8Array ? v : new Uint8Array(v);
      head(b.length, 0xc4, -1, [0xc4, 0xc5, 0xc6]);
      bytes(b);
    } else if (Array.isArray(v)) {
      head(v.length, 0x90, 15, [null, 0xdc, 0xdd]);
      v.forEach(write);
    } else if (typeof v.toJSON === "function") write(v.toJSON());
    else if (typeof v === "object") {
      const keys = Object.keys(v).filter((k) => v[k] !== undefined && typeof v[k] !== "function");
      head(keys.length, 0x80, 15, [null, 0xde, 0xdf]);
      for (const k of keys) { write(k); write(v[k]); }
    } else throw new TypeError(`cannot encode a ${typeof v} as MessagePack`);
  };
  write(value);
  return buf.slice(0, pos);
}

/** One value from MessagePack bytes (Uint8Array or ArrayBuffer). */
export function msgpackDecode(data) {
  const buf = data instanceof Uint8Array ? data : new Uint8Array(data);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let pos = 0;
  const take = (n) => {
    if (pos + n > buf.length) throw new RangeError("truncated MessagePack");
    const at = pos;
    pos += n;
    return at;
  };
  const big = (b) => (b >= Number.MIN_SAFE_INTEGER && b <= Number.MAX_SAFE_INTEGER ? Number(b) : b);
  const str = (n) => fromUtf8.decode(buf.subarray(take(n), pos));
  const bin = (n) => buf.slice(take(n), pos);
  const array = (n) => Array.from({ length: n }, read);
  const map = (n) => {
    const out = {};
    for (let i = 0; i < n; i++) {
      const k = read();
      const v = read();
      // As JSON.parse: a key "__proto__" is the object's own, never its prototype (a
      // publisher's {"__proto__": {...}} would give msgpack subscribers inherited fields).
      if (k === "__proto__") Object.defineProperty(out, k, { value: v, enumerable: true, writable: true, configurable: true });
      else out[k] = v;
    }
    return out;
  };
  const read = () => {
    const t = buf[take(1)];
    if (t < 0x80) return t;
    if (t < 0x90) return map(t & 0x0f);
    if (t < 0xa0) return array(t & 0x0f);
    if (t < 0xc0) return str(t & 0x1f);
    if (t >= 0xe0) return t - 0x100;
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(view.getUint8(take(1)));
      case 0xc5: return bin(view.getUint16(take(2)));
      case 0xc6: return bin(view.getUint32(take(4)));
      case 0xca: return view.getFloat32(take(4));
      case 0xcb: return view.getFloat64(take(8));
      case 0xcc: return view.getUint8(take(1));
      case 0xcd: return view.getUint16(take(2));
      case 0xce: return view.getUint32(take(4));
      case 0xcf: return big(view.getBigUint64(take(8)));
      case 0xd0: return view.getInt8(take(1));
      case 0xd1: return view.getInt16(take(2));
      case 0xd2: return view.getInt32(take(4));
      case 0xd3: return big(view.getBigInt64(take(8)));
      case 0xd9: return str(view.getUint8(take(1)));
      case 0xda: return str(view.getUint16(take(2)));
      case 0xdb: return str(view.getUint32(take(4)));
      case 0xdc: return array(view.getUint16(take(2)));
      case 0xdd: return array(view.getUint32(take(4)));
      case 0xde: return map(view.getUint16(take(2)));
      case 0xdf: return map(view.getUint32(take(4)));
      default: throw new TypeError(`MessagePack type 0x${t.toString(16)} is not supported`);
    }
  };
  const value = read();
  if (pos !== buf.length) throw new RangeError("trailing bytes after a MessagePack value");
  return value;
}

export const JSON_CODEC = Object.freeze({
  subprotocol: "gw.v1.json",
  binary: false,
  encode: (frame) => JSON.stringify(frame),
  decode: (data) => JSON.parse(typeof data === "string" ? data : fromUtf8.decode(data)),
});

export const MSGPACK_CODEC = Object.freeze({
  subprotocol: "gw.v1.msgpack",
  binary: true,
  encode: msgpackEncode,
  decode: msgpackDecode,
});

// -- Transports ------------------------------------------------------------------
//
// Each transport carries frames (objects) both ways between a Gateway and the
// server, and reports to its sink: open(), frame(f), close(code, reason).
// After close() it reports nothing more.

/** The gateway's URLs from its base (http(s)://host[/prefix]) or socket URL (ws(s)://host/ws). */
export function endpoints(url) {
  const u = new URL(url, globalThis.location?.href);
  const secure = u.protocol === "https:" || u.protocol === "wss:";
  const base = `${u.host}${u.pathname.replace(/\/ws\/?$/, "").replace(/\/$/, "")}`;
  return { http: `${secure ? "https" : "http"}://${base}`, ws: `${secure ? "wss" : "ws"}://${base}/ws` };
}

/** Whether the gateway answers plain HTTP (/healthz: the process is up). */
function reachable(urls) {
  return fetch(`${urls.http}/healthz`, { cache: "no-store" }).then((r) => r.ok, () => false);
}

/** fetch() with the token (if any: else the browser's cookies), and a JSON body when there is one. */
function send(url, token, method, body, { headers = {}, signal } = {}) {
  const init = { method, cache: "no-store", signal, headers: { ...headers } };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  return fetch(url, init);
}

class WebSocketTransport {
  static available = () => typeof WebSocket !== "undefined";

  constructor(urls, token, codec, sink) {
    Object.assign(this, { urls, token, codec, sink, kind: "websocket", ws: null });
  }

  open() {
    const query = this.token ? `?token=${encodeURIComponent(this.token)}` : "";
    const ws = (this.ws = new WebSocket(`${this.urls.ws}${query}`, [this.codec.subprotocol]));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this.sink.open();
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = this.codec.decode(event.data);
      } catch (err) {
        this.sink.odd(err); // not JSON / MessagePack: skipped
        return;
      }
      this.sink.frame(frame);
    };
    ws.onclose = (event) => { this.ws = null; this.sink.close(event.code, event.reason); };
  }

  send(frame) {
    this.ws?.send(this.codec.encode(frame));
  }

  setToken() {} // the socket continues under the token a `refresh` frame carried

  close() {
    const ws = this.ws;
    this.ws = null;
    if (ws) { ws.onopen = ws.onmessage = ws.onclose = null; ws.close(1000); }
  }
}

/** Receives over EventSource; sends what can be sent over HTTP; answers the rest itself. */
class SSETransport {
  static available = () => typeof EventSource !== "undefined" && typeof fetch !== "undefined";
  static PUSHES = ["msg", "expiring", "gap", "subscribed", "unsubscribed", "join", "leave"];

  constructor(urls, token, codec, sink) {
    Object.assign(this, { urls, token, sink, kind: "sse", es: null, closed: false, timer: null });
    this.channels = new Map(); // ch -> {offset, epoch} | null: what the stream is to carry
    this.waiting = new Map(); // ch -> id of the `sub` frame awaiting the stream's reply
    this.order = []; // the stream's channels: its reply n answers order[n - 1]
  }

  async open() {
    // No stream until there is a channel to carry: check the gateway answers.
    const ok = await reachable(this.urls);
    if (this.closed) return;
    if (ok) this.sink.open();
    else this.sink.close(1006, "gateway unreachable");
  }

  send(frame) {
    const { id, op } = frame;
    const reply = (fields) => this.sink.frame({ id, ok: true, ...fields });
    const fail = (code, message, temporary) => this.sink.frame({ id, ok: false, error: { code, message, temporary } });
    if (op === "sub") {
      this.channels.set(frame.ch, frame.since ?? null);
      this.waiting.set(frame.ch, id);
      this.restart();
    } else if (op === "unsub") {
      this.channels.delete(frame.ch);
      reply({});
      this.restart();
    } else if (op === "refresh") {
      this.token = frame.token;
      reply({});
      this.restart();
    } else if (op === "ping") reply({});
    else if (op === "pub" || op === "rpc") {
      const [method, path, body, headers] = op === "pub"
        ? ["POST", "/api/publish", { ch: frame.ch, data: frame.data }, {}]
        : [frame.method, frame.path, frame.body, frame.headers ?? {}];
      this.http(method, path, body, headers).then((r) => {
        if (op === "rpc") reply(r);
        else if (r.status === 200) reply({});
        else {
          const code = { 403: 103, 413: 107, 429: 112, 503: 110 }[r.status] ?? 100;
          fail(code, r.body?.error?.message ?? `HTTP ${r.status}`, r.status === 429 || r.status >= 500);
        }
      }, (err) => fail(110, String(err), true));
    } else fail("unsupported", `${op} is not available over SSE`, false);
  }

  async http(method, path, body, headers) {
    const r = await send(this.urls.http + path, this.token, method, body, { headers });
    const text = await r.text();
    return { status: r.status, headers: Object.fromEntries(r.headers), body: text ? JSON.parse(text) : undefined };
  }

  restart() {
    // Frames sent together (a resubscription) make one stream.
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.stream(), 0);
  }

  stream() {
    this.stop();
    if (this.closed || this.channels.size === 0) return;
    this.order = [...this.channels.keys()];
    const positions = {};
    for (const [ch, since] of this.channels) if (since) positions[ch] = [since.offset, since.epoch];
    const query = new URLSearchParams(this.token ? { token: this.token } : {});
    for (const ch of this.order) query.append("ch", ch);
    if (Object.keys(positions).length) {
      // The gateway's Last-Event-ID format (gateway/transport/sse.py): base64url JSON.
      const b64 = btoa(String.fromCharCode(...utf8.encode(JSON.stringify(positions))));
      query.set("last_event_id", b64.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, ""));
    }
    const es = (this.es = new EventSource(`${this.urls.http}/sse?${query}`));
    const parse = (event) => {
      try {
        return JSON.parse(event.data);
      } catch (err) {
        this.sink.odd(err);
        return null;
      }
    };
    es.addEventListener("reply", (event) => { const reply = parse(event); if (reply?.ok != null) this.onReply(reply); });
    for (const name of SSETransport.PUSHES) {
      es.addEventListener(name, (event) => {
        const push = parse(event);
        if (push === null || typeof push !== "object") return;
        if (push.op === "msg" && push.offset != null) this.channels.set(push.ch, { offset: push.offset, epoch: push.epoch });
        if (push.op === "unsubscribed") this.channels.delete(push.ch);
        if (push.op === "subscribed") { // the server's: a restarted stream carries it on
          this.channels.set(push.ch, push.offset != null ? { offset: push.offset, epoch: push.epoch } : null);
        }
        this.sink.frame(push);
      });
    }
    es.addEventListener("close", (event) => {
      const { code = 1006, reason } = parse(event) ?? {};
      this.fail(code, reason ?? "closed by the gateway");
    });
    // EventSource would reconnect by itself; the Gateway does it instead, with backoff.
    es.onerror = () => this.fail(1006, "event stream lost");
  }

  onReply(reply) {
    const ch = this.order[reply.id - 1];
    const id = this.waiting.get(ch);
    this.waiting.delete(ch);
    if (reply.ok && reply.recovered !== true && reply.offset != null) {
      this.channels.set(ch, { offset: reply.offset, epoch: reply.epoch }); // where the next stream resumes
    }
    if (id !== undefined) this.sink.frame({ ...reply, id });
    else if (!reply.ok && reply.error.code === 104) {
      // carried over, and made again by the connect hook: its `subscribed` push came first
    } else if (!reply.ok) {
      // a channel carried over from the previous stream that is now refused
      this.channels.delete(ch);
      this.sink.frame({ op: "unsubscribed", ch, code: reply.error.code, message: reply.error.message });
    }
  }

  fail(code, reason) {
    if (this.closed) return;
    this.close();
    this.sink.close(code, reason);
  }

  setToken(token) {
    this.token = token;
  }

  stop() {
    if (this.es) { this.es.onerror = null; this.es.close(); this.es = null; }
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.stop();
  }
}

/** The socket's session over plain HTTP requests (docs/protocol.md, Long-poll). */
class LongPollTransport {
  static available = () => typeof fetch !== "undefined";

  constructor(urls, token, codec, sink) {
    Object.assign(this, { urls, token, sink, kind: "longpoll", sid: null, cursor: 0, closed: false });
    this.outbox = [];
    this.sending = Promise.resolve();
    this.abort = new AbortController();
  }

  async call(method, path, body) {
    const r = await send(this.urls.http + path, this.token, method, body, { signal: this.abort.signal });
    return { status: r.status, body: await r.json().catch(() => ({})) };
  }

  async open() {
    try {
      const r = await this.call("POST", "/lp");
      if (r.status === 410 && r.body.close) return this.fail(r.body.close.code, r.body.close.reason ?? "");
      if (r.status !== 201) return this.fail(1006, `long-poll session refused: HTTP ${r.status}`);
      this.sid = r.body.session;
      this.cursor = r.body.cursor;
      if (r.body.token) this.token = r.body.token; // the session's own secret (admitted by cookie)
    } catch (err) {
      return this.fail(1006, String(err));
    }
    if (this.closed) return;
    this.sink.open();
    this.poll();
  }

  async poll() {
    while (!this.closed) {
      let r;
      try {
        r = await this.call("GET", `/lp/${this.sid}?cursor=${this.cursor}`);
      } catch (err) {
        return this.fail(1006, String(err));
      }
      if (this.closed) return;
      if (r.status !== 200 && r.status !== 410) return this.fail(1006, `long-poll: HTTP ${r.status}`);
      const { cursor, messages = [] } = r.body ?? {};
      if (!Number.isSafeInteger(cursor) || !Array.isArray(messages)) return this.fail(1006, "long-poll: a malformed poll");
      this.cursor = cursor;
      for (const message of messages) if (!this.closed) this.sink.frame(message);
      if (r.status === 410) return this.fail(r.body.close?.code ?? 1006, "long-poll session closed");
    }
  }

  send(frame) {
    this.outbox.push(frame);
    if (this.outbox.length > 1) return; // a batch is already being made
    queueMicrotask(() => {
      const batch = this.outbox.splice(0);
      this.sending = this.sending.then(async () => {
        if (this.closed) return;
        try {
          const r = await this.call("POST", `/lp/${this.sid}`, batch);
          if (r.status !== 202) this.fail(1006, `long-poll send: HTTP ${r.status}`);
        } catch (err) {
          this.fail(1006, String(err));
        }
      });
    });
  }

  setToken(token) {
    this.token = token;
  }

  fail(code, reason) {
    if (this.closed) return;
    this.close();
    this.sink.close(code, reason);
  }

  close() {
    this.closed = true;
    this.abort.abort();
  }
}

export const TRANSPORTS = Object.freeze({
  websocket: WebSocketTransport,
  sse: SSETransport,
  longpoll: LongPollTransport,
});

// -- The client ------------------------------------------------------------------

/** One channel's subscription: see Gateway.subscribe. */
export class Subscription {
  constructor(gateway, channel, handlers, since) {
    this.gateway = gateway;
    this.channel = channel;
    this.handlers = handlers;
    /** The last {offset, epoch} seen on a history channel, or null. */
    this.position = since ?? null;
    this.active = false; // the server confirmed it at least once
    this.server = false; // made by the server (a `subscribed` push), not by subscribe()
    this.remade = null; // the transport on which the server made it again (a connect hook's)
    this.held = null; // pushes held back while a gap is being repaired
    this.ready = new Promise((resolve, reject) => { this.settle = { resolve, reject }; });
    this.ready.catch(() => {}); // awaited or not, a refusal is also reported to onError
  }

  /** Ends the subscription; resolves once the server confirmed it (if connected). */
  unsubscribe() {
    return this.gateway.unsubscribe(this);
  }
}

export class Gateway {
  constructor(url, options = {}) {
    this.urls = endpoints(url);
    this.options = { ...DEFAULTS, ...options };
    const { codec } = this.options;
    this.codec = codec === "msgpack" ? MSGPACK_CODEC : codec === "json" ? JSON_CODEC : codec;
    this.state = "disconnected";
    this.transport = null; // the open transport, null while not connected
    this.subscriptions = new Map(); // ch -> Subscription
    this.listeners = new Map(); // event -> Set of functions
    this.pending = new Map(); // id -> {frame, sent, resolve, reject, timer}, in id order
    this.nextId = 1;
    this.attempt = 0; // reconnect attempts since the last open
    this.kindIndex = 0; // which of options.transports is in use
    this.failedOpens = 0; // of that transport, while the gateway answered HTTP
    this.generation = 0; // bumped by every open and disconnect: stale callbacks check it
    this.retryTimer = null;
    this.pingTimer = null;
    this.lastClose = null;
    this.refreshing = false;
    this.oddFrames = 0; // frames of this connection the client could not use
  }

  // -- Events --------------------------------------------------------------------

  /** Calls fn on "state" (state, info), "recovered" ({ch, recovered}), "subscribed"
   *  (the Subscription the server made), "unsubscribed" ({ch, code, message}),
   *  "publication" ({ch, data, offset, epoch}: a channel the server subscribed this
   *  connection to), "error" (error). Returns a function that removes it. */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.listeners.get(event)?.delete(fn);
  }

  emit(event, ...args) {
    for (const fn of [...(this.listeners.get(event) ?? [])]) this.invoke(fn, ...args);
  }

  invoke(fn, ...args) {
    // A throwing handler must not break the frame loop.
    try {
      fn?.(...args);
    } catch (err) {
      if (this.listeners.get("error")?.size) this.emit("error", err);
      else console.error("gateway.js: a handler threw", err);
    }
  }

  setState(state, info = {}) {
    if (state === this.state) return;
    if (!TRANSITIONS[this.state].includes(state)) throw new Error(`gateway.js: ${this.state} -> ${state}`);
    this.state = state;
    this.emit("state", state, info);
  }

  // -- Connecting ------------------------------------------------------------------

  /** Starts connecting; resolves once connected, rejects if it ends "disconnected" first. */
  connect() {
    const done = this.state === "connected" ? Promise.resolve() : new Promise((resolve, reject) => {
      const off = this.on("state", (state, info) => {
        if (state === "connected") { off(); resolve(); }
        if (state === "disconnected") {
          off();
          reject(new GatewayError(info.code ?? "closed", info.reason || "disconnected"));
        }
      });
    });
    if (this.state === "disconnected") {
      this.setState("connecting");
      this.open();
    }
    done.catch(() => {}); // the "state" event reports it too
    return done;
  }

  /** Closes the connection; subscriptions are kept for a later connect(). */
  disconnect() {
    this.generation++;
    clearTimeout(this.retryTimer);
    this.stopPings();
    this.transport?.close();
    this.transport = null;
    this.failPending(() => true, "closed", "disconnect() was called");
    this.setState("disconnected", { code: 1000, reason: "disconnect() was called" });
  }

  async token(reason) {
    const { getToken, token, tokenless } = this.options;
    if (tokenless) return null; // the browser's cookies go with every request instead
    const value = getToken ? await getToken({ reason }) : token;
    if (!value) throw new GatewayError("unauthorized", "no token: give token or getToken");
    return value;
  }

  async open() {
    const generation = ++this.generation;
    const Kind = this.nextTransport();
    let token;
    try {
      if (!Kind) throw new GatewayError("unsupported", "none of the transports is available here");
      token = await this.token(this.lastClose === 4002 ? "expired" : "connect");
    } catch (err) {
      if (generation !== this.generation) return;
      this.emit("error", err);
      this.lost(err.code === "unsupported" ? 1008 : 1006, err.message);
      return;
    }
    if (generation !== this.generation) return;
    let opened = false;
    const live = () => generation === this.generation;
    const transport = new Kind(this.urls, token, this.codec, {
      open: () => { if (live()) { opened = true; this.opened(transport); } },
      frame: (frame) => {
        if (!live()) return;
        try {
          this.receive(frame);
        } catch (err) {
          this.odd(err); // a frame of the wrong shape: skipped, the connection goes on
        }
      },
      odd: (err) => { if (live()) this.odd(err); },
      close: async (code, reason) => {
        if (!live()) return;
        this.transport = null;
        this.stopPings();
        if (!opened) await this.countFailedOpen();
        if (live()) this.lost(code, reason);
      },
    });
    transport.open();
  }

  nextTransport() {
    const kinds = this.options.transports;
    for (let i = 0; i < kinds.length; i++) {
      const Kind = TRANSPORTS[kinds[(this.kindIndex + i) % kinds.length]];
      if (Kind?.available()) {
        this.kindIndex = (this.kindIndex + i) % kinds.length;
        return Kind;
      }
    }
    return null;
  }

  async countFailedOpen() {
    // Only when the gateway answers plain HTTP is the transport to blame (a
    // proxy that drops WebSocket, say); a gateway that is down is not.
    if (!(await reachable(this.urls))) return;
    if (++this.failedOpens >= this.options.openAttempts) {
      this.failedOpens = 0;
      this.kindIndex = (this.kindIndex + 1) % this.options.transports.length;
    }
  }

  opened(transport) {
    this.transport = transport;
    this.attempt = 0;
    this.failedOpens = 0;
    this.lastClose = null;
    this.oddFrames = 0;
    for (const sub of this.subscriptions.values()) this.sendSub(sub);
    for (const [id, entry] of this.pending) {
      if (!entry.sent) { entry.sent = true; transport.send({ id, ...entry.frame }); }
    }
    this.startPings();
    this.setState("connected", { transport: transport.kind });
  }

  lost(code, reason) {
    this.lastClose = code;
    this.failPending((entry) => entry.sent, "disconnected", "the connection was lost before the reply", true);
    if (!shouldReconnect(code)) {
      this.failPending(() => true, "disconnected", `closed with ${code}: ${reason}`);
      this.setState("disconnected", { code, reason });
      return;
    }
    const delay = backoff(this.attempt++, this.options);
    this.setState("reconnecting", { code, reason });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  startPings() {
    const { pingInterval, timeout } = this.options;
    if (!pingInterval) return;
    this.pingTimer = setInterval(() => {
      const transport = this.transport;
      this.ping().catch((err) => {
        if (err.code === "timeout" && transport === this.transport) {
          transport.close();
          transport.sink.close(1006, `no reply to ping within ${timeout} ms`);
        }
      });
    }, pingInterval);
  }

  stopPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  // -- Requests and replies ------------------------------------------------------------

  /** Sends a command (now, or once connected) and resolves with its reply. */
  request(frame, { timeout = this.options.timeout } = {}) {
    if (this.state === "disconnected") {
      return Promise.reject(new GatewayError("closed", "not connected: call connect() first"));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const entry = { frame, sent: false, resolve, reject };
      entry.timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new GatewayError("timeout", `no reply to ${frame.op} within ${timeout} ms`, true));
      }, timeout);
      this.pending.set(id, entry);
      if (this.transport) { entry.sent = true; this.transport.send({ id, ...frame }); }
    });
  }

  failPending(which, code, message, temporary = false) {
    for (const [id, entry] of this.pending) {
      if (!which(entry)) continue;
      this.pending.delete(id);
      clearTimeout(entry.timer);
      entry.reject(new GatewayError(code, message, temporary));
    }
  }

  /** A frame the client cannot use (not JSON, a wrong type): one "error" per connection. */
  odd(err) {
    if (this.oddFrames++ > 0) return;
    const error = new GatewayError("bad_frame", `a frame from the gateway was skipped: ${err.message}`);
    if (this.listeners.get("error")?.size) this.emit("error", error);
    else console.warn("gateway.js:", error.message);
  }

  receive(frame) {
    if ("ok" in frame) {
      const entry = this.pending.get(frame.id);
      const { code = 111, message = "error reply without an error", temporary = true } = frame.error ?? {};
      if (!entry) {
        if (!frame.ok) this.odd(new GatewayError(code, `an error reply to no command: ${message}`));
        return;
      }
      this.pending.delete(frame.id);
      clearTimeout(entry.timer);
      if (frame.ok) entry.resolve(frame);
      else entry.reject(new GatewayError(code, message, temporary));
      return;
    }
    const sub = this.subscriptions.get(frame.ch);
    switch (frame.op) {
      case "msg":
        if (sub) this.deliver(sub, frame);
        else this.emit("publication", { ch: frame.ch, data: frame.data, offset: frame.offset, epoch: frame.epoch });
        break;
      case "join": if (sub) this.invoke(sub.handlers.onJoin, frame.info); break;
      case "leave": if (sub) this.invoke(sub.handlers.onLeave, frame.info); break;
      case "gap": if (sub) this.repairGap(sub); break;
      case "expiring": this.refresh(); break;
      case "subscribed": this.serverSubscribed(frame); break;
      case "unsubscribed":
        if (sub) this.drop(sub, new GatewayError(frame.code, frame.message));
        break;
      default: break; // a newer server's push: ignore it
    }
  }

  deliver(sub, frame) {
    if (sub.held) {
      if (sub.held.length < MAX_HELD) { sub.held.push(frame); return; }
      // The repair fell too far behind (as the gateway does with its own held ones, 4001):
      // a new connection recovers from sub.position, and what was held goes.
      sub.held = [];
      const transport = this.transport;
      transport?.close();
      transport?.sink.close(1006, `a repair of ${sub.channel} fell ${MAX_HELD} publications behind`);
      return;
    }
    const { ch, offset, epoch, data } = frame;
    if (offset != null) {
      const seen = sub.position;
      if (seen && seen.epoch === epoch && offset <= seen.offset) return; // already delivered
      sub.position = { offset, epoch };
    }
    this.invoke(sub.handlers.onMessage, data, { ch, offset, epoch });
  }

  async refresh() {
    if (!this.options.getToken || this.refreshing) return;
    this.refreshing = true;
    const transport = this.transport;
    try {
      const token = await this.options.getToken({ reason: "expiring" });
      await this.request({ op: "refresh", token });
      if (transport === this.transport) transport.setToken(token);
    } catch (err) {
      this.emit("error", err); // the gateway closes with 4002: the reconnect asks for a token
    } finally {
      this.refreshing = false;
    }
  }

  // -- Channels ------------------------------------------------------------------

  /**
   * Subscribes to `ch`; handlers: onMessage(data, {ch, offset, epoch}),
   * onJoin(info), onLeave(info), onGap(), onRecovered(recovered),
   * onError(error) when the server refuses or ends it. `since`:
   * {offset, epoch} to recover from (a position kept across page loads).
   */
  subscribe(ch, { since, ...handlers } = {}) {
    if (this.subscriptions.has(ch)) throw new GatewayError(104, `already subscribed to ${ch}`);
    const sub = new Subscription(this, ch, handlers, since);
    this.subscriptions.set(ch, sub);
    if (this.transport) this.sendSub(sub);
    return sub;
  }

  async sendSub(sub) {
    const frame = { op: "sub", ch: sub.channel };
    if (sub.position) frame.since = { ...sub.position };
    const recovering = sub.active || Boolean(sub.position);
    let reply;
    try {
      reply = await this.request(frame);
    } catch (err) {
      if (this.subscriptions.get(sub.channel) !== sub) return;
      if (err.code === "disconnected") return; // sent again on reconnect
      if (err.code === 104) {
        // Made again by the server on this connection (a connect hook's channel):
        // its `subscribed` push came first and said where it stands.
        if (sub.remade !== this.transport) this.emit("error", err);
        return;
      }
      if (err.temporary) {
        // Never a silently dead channel: ask again, with backoff, while it is wanted.
        this.emit("error", err);
        sub.retries = (sub.retries ?? 0) + 1;
        setTimeout(() => {
          if (this.subscriptions.get(sub.channel) === sub && this.transport) this.sendSub(sub);
        }, backoff(sub.retries, this.options));
        return;
      }
      this.drop(sub, err);
      return;
    }
    if (this.subscriptions.get(sub.channel) !== sub) return;
    sub.retries = 0;
    // recovered: the missed pushes follow the reply; otherwise live pushes
    // continue from where the reply says the channel stands.
    if (reply.recovered !== true && reply.offset != null) sub.position = { offset: reply.offset, epoch: reply.epoch };
    sub.active = true;
    sub.settle.resolve(reply);
    if (recovering) this.recovered(sub, reply.recovered === true);
  }

  serverSubscribed({ ch, offset, epoch, recovered }) {
    // The server subscribed this connection (the server API, a connect hook): the
    // pushes that follow come after {offset, epoch}, from which a reconnect recovers.
    const kept = this.subscriptions.get(ch);
    if (kept) { this.serverResubscribed(kept, offset, epoch, recovered); return; }
    // Until the app sets its own handlers ("subscribed" event), pushes are "publication"s.
    const handlers = { onMessage: (data, meta) => this.emit("publication", { ...meta, data }) };
    const sub = new Subscription(this, ch, handlers, offset != null ? { offset, epoch } : null);
    sub.active = true;
    sub.server = true;
    this.subscriptions.set(ch, sub);
    sub.settle.resolve({ ok: true, offset, epoch });
    this.emit("subscribed", sub);
  }

  serverResubscribed(sub, offset, epoch, recovered) {
    // A subscription kept across a reconnect that the server made again (a connect
    // hook's channel): what was published meanwhile is read from history.
    sub.remade = this.transport; // its own `sub`, if sent, is answered 104
    sub.active = true;
    const seen = sub.position;
    if (recovered != null) {
      // An event stream recovered it from Last-Event-ID: what was missed follows.
      if (!recovered && offset != null) sub.position = { offset, epoch };
      this.recovered(sub, recovered);
    } else if (offset == null || !seen || seen.epoch !== epoch) {
      if (offset != null) sub.position = { offset, epoch };
      this.recovered(sub, false); // nothing to recover from, or the history was lost
    } else if (offset <= seen.offset) {
      this.recovered(sub, true); // nothing was missed
    } else {
      this.fill(sub);
    }
  }

  recovered(sub, recovered) {
    this.invoke(sub.handlers.onRecovered, recovered);
    this.emit("recovered", { ch: sub.channel, recovered });
  }

  drop(sub, err) {
    this.subscriptions.delete(sub.channel);
    sub.settle.reject(err);
    this.invoke(sub.handlers.onError, err);
    this.emit("unsubscribed", { ch: sub.channel, code: err.code, message: err.message });
  }

  async unsubscribe(sub) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    if (this.transport && sub.active) {
      await this.request({ op: "unsub", ch: sub.channel }).catch(() => {});
    }
  }

  async repairGap(sub) {
    // Publications may have been missed (the gateway lost Redis for a while, or
    // sent a large recovery in part): onGap only when history cannot fill the hole.
    if ((await this.fill(sub)) === false) this.invoke(sub.handlers.onGap);
  }

  async fill(sub) {
    // What was missed since sub.position, from history, holding live pushes back until done.
    if (sub.held) return undefined;
    let recovered = false;
    sub.held = [];
    try {
      if (sub.position) recovered = await this.catchUp(sub);
    } catch (err) {
      if (err.code === "disconnected" || err.code === "closed") {
        sub.held = null; // the next connection's `sub` recovers from sub.position
        return undefined;
      }
      recovered = false; // no history on this channel, or it failed: reload
    }
    const held = sub.held;
    sub.held = null;
    for (const frame of held) this.deliver(sub, frame);
    this.recovered(sub, recovered);
    return recovered;
  }

  async catchUp(sub) {
    for (;;) {
      const seen = sub.position;
      const { offset, epoch, publications } = await this.history(sub.channel, { since: seen.offset });
      const last = publications[publications.length - 1]?.offset;
      if (epoch !== seen.epoch || publications[0]?.offset > seen.offset + 1 || last <= seen.offset) {
        sub.position = { offset, epoch };
        return false; // the history was lost, no longer reaches back far enough, or went nowhere
      }
      for (const { offset: at, data } of publications) {
        if (at <= sub.position.offset) continue;
        sub.position = { offset: at, epoch };
        this.invoke(sub.handlers.onMessage, data, { ch: sub.channel, offset: at, epoch });
      }
      if (sub.position.offset >= offset || publications.length === 0) return true;
    }
  }

  // -- Commands --------------------------------------------------------------------

  async publish(ch, data) {
    await this.request({ op: "pub", ch, data });
  }

  /** A REST call over the connection: {status, headers, body} whatever the status. */
  async rpc(method, path, body, headers) {
    const frame = { op: "rpc", method, path };
    if (body !== undefined) frame.body = body;
    if (headers) frame.headers = headers;
    const reply = await this.request(frame);
    return { status: reply.status, headers: reply.headers ?? {}, body: reply.body };
  }

  /** The application's backend answers (the call hook): its data, or a GatewayError. */
  async call(method, data) {
    const frame = { op: "call", method };
    if (data !== undefined) frame.data = data;
    return (await this.request(frame)).data;
  }

  async presence(ch) {
    return (await this.request({ op: "presence", ch })).presence;
  }

  async presenceStats(ch) {
    const reply = await this.request({ op: "presence_stats", ch });
    return { numClients: reply.num_clients, numUsers: reply.num_users };
  }

  /** Kept publications after offset `since`: {offset, epoch, publications: [{offset, data}]}. */
  async history(ch, { since = 0, limit = 100 } = {}) {
    const { offset, epoch, publications } = await this.request({ op: "history", ch, since, limit });
    return { offset, epoch, publications: publications ?? [] };
  }

  async ping() {
    await this.request({ op: "ping" });
  }
}
