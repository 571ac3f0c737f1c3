/*
 * realtime.js: the browser client of the realtime wire protocol v1 (docs/client.md).
 *
 * Plain browser JavaScript, no build step and no dependencies; load it as a classic <script>
 * (the {% realtime_script %} tag does, after a JSON config the client reads by itself) and use
 * window.Realtime:
 *
 *   const client = new Realtime.Client();
 *   client.on("state", (s) => ...);       // connecting | live | reconnecting | offline
 *   client.join("lobby", {onMessage(msg) {...}, onPresence(f) {...}, onReset(ack) {...}});
 *   client.connect();
 *   client.send("lobby", {text: "hi"}).then(({seq, id}) => ..., (err) => err.code);
 *
 * One API whatever the transport: WebSocket first, then Server-Sent Events, then long-polling
 * (sending and history then go through the HTTP API with the CSRF token). The client falls
 * back when a transport cannot connect, keeps trying to upgrade later, reconnects with
 * exponential backoff and jitter, and resumes every room from the last seq it delivered.
 *
 * The client does no DOM work at all: rendering server data is the page's job (with
 * textContent, never innerHTML).
 */
(function (global) {
  "use strict";

  // Checked against realtime/protocol.py by a Python test: keep it one valid JSON object.
  const PROTOCOL = /* protocol:begin */ {"version": 1, "clientTypes": ["join", "leave", "send", "typing", "history", "ping"], "serverTypes": ["hello", "ack", "pong", "message", "presence_state", "presence_diff", "typing", "retract", "removed", "error"], "errorCodes": ["bad_frame", "unknown_type", "invalid_room", "room_not_found", "forbidden", "unauthorized", "not_joined", "too_large", "rate_limited", "unavailable", "internal"], "closeCodes": {"NORMAL": 1000, "TOO_BIG": 1009, "INTERNAL": 1011, "RESTARTING": 1012, "UNAUTHORIZED": 4001, "FORBIDDEN": 4003, "SLOW_CONSUMER": 4008, "RATE_LIMITED": 4029}} /* protocol:end */;

  const TRANSPORTS = ["websocket", "sse", "longpoll"];
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30000;
  const RATE_LIMITED_MIN_DELAY_MS = 5000;
  const DEFAULT_HEARTBEAT_S = 25;
  const TYPING_INTERVAL_MS = 2000;
  // A request unanswered this long fails with code "timeout": the server cannot put the ref
  // on its reply to a frame it refused unparsed (too_large), and the caller must not hang.
  const REQUEST_TIMEOUT_MS = 30000;
  // Attempts in a row that never reached "hello" before the next transport is tried.
  const FALLBACK_AFTER_FAILURES = 2;
  // While on a fallback transport, how often a better one is probed (jittered +-25%).
  const UPGRADE_INTERVAL_MS = 60000;
  // A long-poll answer that takes longer than the server's wait plus this is a dead request.
  const POLL_GRACE_MS = 15000;
  // After these close codes a new connection would be refused the same way (or would come
  // back anonymous after a revoked session), so the client stops and goes "offline".
  const FATAL_CLOSE_CODES = [PROTOCOL.closeCodes.UNAUTHORIZED, PROTOCOL.closeCodes.FORBIDDEN];
  // Join errors worth retrying; any other code drops the room.
  const TRANSIENT_ERRORS = ["unavailable", "rate_limited", "internal", "timeout", "offline"];

  function absoluteWsUrl(path) {
    if (path.charAt(0) !== "/") return path;
    const scheme = global.location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + global.location.host + path;
  }

  // The JSON the {% realtime_script %} tag renders: URLs, CSRF token, the page's cursor.
  function pageConfig() {
    const doc = global.document;
    const el = doc && doc.getElementById ? doc.getElementById("realtime-config") : null;
    if (!el) return {};
    try {
      return JSON.parse(el.textContent) || {};
    } catch (e) {
      return {};
    }
  }

  function available(kind) {
    if (kind === "websocket") return typeof global.WebSocket === "function";
    if (kind === "sse") return typeof global.EventSource === "function";
    return typeof global.fetch === "function";
  }

  // A random id for client_msg_id: 32 hex chars (the protocol allows up to 64).
  function randomId() {
    const bytes = new Uint8Array(16);
    if (global.crypto && global.crypto.getRandomValues) {
      global.crypto.getRandomValues(bytes);
    } else {
      for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Errors made by the client itself carry a code like error frames do ("offline", "timeout").
  function clientError(code, message) {
    const err = new Error(message);
    err.code = code;
    return err;
  }

  function offlineError() {
    return clientError("offline", "not connected");
  }

  function isOffline() {
    return global.navigator !== undefined && global.navigator.onLine === false;
  }

  // Call a handler without letting an exception in page code break the dispatch.
  function safeCall(fn, arg) {
    if (typeof fn !== "function") return;
    try {
      fn(arg);
    } catch (e) {
      if (global.console) global.console.error("realtime: handler failed", e);
    }
  }

  function cookie(name) {
    const doc = global.document;
    if (!doc || typeof doc.cookie !== "string") return null;
    for (const part of doc.cookie.split(";")) {
      const eq = part.indexOf("=");
      if (eq > 0 && part.slice(0, eq).trim() === name) return decodeURIComponent(part.slice(eq + 1).trim());
    }
    return null;
  }

  // The cursor of the given rooms (see docs/transports.md): "lobby:12:1,team:4:1".
  function cursorOf(rooms) {
    const parts = [];
    for (const room of rooms) {
      if (room.lastSeq === null) continue;
      parts.push(room.slug + ":" + room.lastSeq + (room.epoch !== null ? ":" + room.epoch : ""));
    }
    return parts.join(",");
  }

  // -- transports: each one feeds text frames to client._onFrame and reports its end --------

  class WebSocketConn {
    constructor(client) {
      this.kind = "websocket";
      this.client = client;
      const ws = (this.ws = new global.WebSocket(absoluteWsUrl(client.urls.ws)));
      ws.onmessage = (event) => client._connFrame(this, event.data);
      ws.onclose = (event) => client._connEnded(this, event.code);
      ws.onerror = () => {}; // a close event always follows
    }

    sendFrame(frame) {
      if (this.ws.readyState !== 1) return false;
      this.ws.send(JSON.stringify(frame));
      return true;
    }

    // A live WebSocket joins (and leaves) with frames, on the same connection.
    joinAll() {
      for (const room of this.client._rooms.values()) this.client._sendJoin(room);
    }

    close(code) {
      this.ws.onmessage = this.ws.onclose = null;
      try {
        this.ws.close(code);
      } catch (e) {
        /* already closed */
      }
    }
  }

  class SseConn {
    constructor(client, rooms) {
      this.kind = "sse";
      this.client = client;
      this.rooms = rooms; // slugs this stream follows: a change of rooms opens a new stream
      let url = client.urls.sse + "?rooms=" + encodeURIComponent(rooms.join(","));
      const after = cursorOf(rooms.map((slug) => client._rooms.get(slug)));
      if (after) url += "&after=" + encodeURIComponent(after);
      this.url = url;
      const es = (this.es = new global.EventSource(url, {withCredentials: true}));
      for (const type of PROTOCOL.serverTypes) {
        es.addEventListener(type, (event) => client._connFrame(this, event.data));
      }
      // The browser would reconnect by itself (with Last-Event-ID); the client does it instead,
      // with backoff, the current rooms and the fallback order.
      es.onerror = () => client._connEnded(this, null);
    }

    sendFrame() {
      return false;
    }

    joinAll() {}

    close() {
      this.es.onerror = null;
      this.es.close();
    }
  }

  class PollConn {
    constructor(client, rooms) {
      this.kind = "longpoll";
      this.client = client;
      this.rooms = rooms;
      this.closed = false;
      this.hello = false;
      this.controller = null;
      this.poll();
    }

    poll() {
      const client = this.client;
      const rooms = this.rooms.map((slug) => client._rooms.get(slug)).filter(Boolean);
      if (!rooms.length) {
        // Nothing to poll for: say hello from the page's own knowledge and wait for a join.
        if (!this.hello) {
          this.hello = true;
          client._connFrame(this, JSON.stringify({type: "hello", protocol: PROTOCOL.version, user: client.user, heartbeat: 0}));
        }
        return;
      }
      let url = client.urls.poll + "?rooms=" + encodeURIComponent(rooms.map((r) => r.slug).join(","));
      const after = cursorOf(rooms);
      if (after) url += "&cursor=" + encodeURIComponent(after);
      // The first request of a connection answers at once (hello, joins, presence): that is
      // what makes the connection live. Later ones wait for news.
      const timeout = !this.hello ? 0 : client.pollTimeout;
      if (timeout != null) url += "&timeout=" + timeout;
      const controller = (this.controller = new AbortController());
      const wait = (timeout != null ? timeout * 1000 : 25000) + POLL_GRACE_MS;
      const timer = global.setTimeout(() => controller.abort(), wait);
      global.fetch(url, {credentials: "same-origin", signal: controller.signal, headers: {Accept: "application/json"}}).then(
        (response) => response.json().then((body) => ({response: response, body: body})),
      ).then(({response, body}) => {
        global.clearTimeout(timer);
        if (this.closed) return;
        if (!response.ok) {
          if (this === client._conn) client._refused(body && body.error, this.rooms);
          return;
        }
        for (const frame of body.frames || []) {
          if (this.closed) return;
          if (frame.type === "hello") {
            if (this.hello) continue; // every poll says hello; the connection only once
            this.hello = true;
          }
          client._connFrame(this, frame);
        }
        if (!this.closed) this.poll();
      }).catch(() => {
        global.clearTimeout(timer);
        if (!this.closed) client._connEnded(this, null);
      });
    }

    sendFrame() {
      return false;
    }

    joinAll() {}

    close() {
      this.closed = true;
      if (this.controller) this.controller.abort();
    }
  }

  class Client {
    constructor(options) {
      options = options || {};
      const config = options.config || pageConfig();
      const urls = config.urls || {};
      this.urls = {
        ws: options.url || urls.ws || "/ws/",
        sse: options.sseUrl || urls.sse || "/realtime/sse/",
        poll: options.pollUrl || urls.poll || "/realtime/poll/",
        api: options.apiUrl || urls.api || "/realtime/api/rooms/",
      };
      this.transports = (options.transports || TRANSPORTS).filter((t) => TRANSPORTS.indexOf(t) !== -1);
      this.requestTimeout = options.requestTimeout || REQUEST_TIMEOUT_MS;
      this.upgradeInterval = options.upgradeInterval || UPGRADE_INTERVAL_MS;
      this.pollTimeout = options.pollTimeout != null ? options.pollTimeout : null;
      this.csrfToken = options.csrfToken || config.csrfToken || null;
      this.pageCursor = config.rooms || {}; // {slug: {seq, epoch}}: where the page left off
      this.state = "offline";
      this.transport = null; // the transport in use: websocket | sse | longpoll
      this.user = null; // from hello: {id, name} or null (anonymous)
      this._listeners = {};
      this._rooms = new Map(); // slug -> room entry (see join)
      this._pending = new Map(); // ref -> {resolve, reject, onAck, timer}
      this._typingRefs = new Map(); // ref of the latest typing frame -> room entry
      this._refSeq = 0;
      this._conn = null;
      this._transportIndex = 0;
      this._failures = 0; // attempts in a row on this transport that never said hello
      this._wanted = false; // connect() called and close() not since
      this._everLive = false;
      this._attempt = 0;
      this._retryTimer = null;
      this._heartbeatTimer = null;
      this._upgradeTimer = null;
      this._probe = null;
      this._pingRef = null;
      this._worked = {}; // transports that reached "hello" on this page
      if (global.addEventListener) {
        global.addEventListener("online", () => this._onOnline());
        global.addEventListener("offline", () => this._onOffline());
      }
    }

    on(event, fn) {
      (this._listeners[event] = this._listeners[event] || []).push(fn);
      return this;
    }

    off(event, fn) {
      const list = this._listeners[event] || [];
      this._listeners[event] = list.filter((f) => f !== fn);
      return this;
    }

    _emit(event, arg) {
      for (const fn of (this._listeners[event] || []).slice()) safeCall(fn, arg);
    }

    _setState(state) {
      if (this.state === state) return;
      this.state = state;
      this._emit("state", state);
    }

    // -- connection lifecycle -------------------------------------------------------------

    connect() {
      this._wanted = true;
      if (this._conn || this._retryTimer) return this;
      if (isOffline()) {
        this._setState("offline"); // the "online" event reconnects
        return this;
      }
      this._open(this._everLive ? "reconnecting" : "connecting");
      return this;
    }

    close() {
      this._wanted = false;
      this._cancelRetry();
      this._stopUpgrade();
      this._drop(PROTOCOL.closeCodes.NORMAL);
      this._setState("offline");
    }

    // The first available transport from the current position in the fallback order.
    _pickTransport() {
      for (let i = this._transportIndex; i < this.transports.length; i++) {
        if (available(this.transports[i])) {
          if (i !== this._transportIndex) this._failures = 0;
          this._transportIndex = i;
          return this.transports[i];
        }
      }
      this._transportIndex = this.transports.length - 1;
      return this.transports[this._transportIndex];
    }

    _makeConn(kind) {
      const slugs = Array.from(this._rooms.keys());
      if (kind === "websocket") return new WebSocketConn(this);
      if (kind === "sse") return new SseConn(this, slugs);
      return new PollConn(this, slugs);
    }

    _open(state) {
      this._setState(state);
      const kind = this._pickTransport();
      let conn;
      try {
        conn = this._makeConn(kind);
      } catch (e) {
        this._failures++;
        this._scheduleRetry(0); // e.g. a malformed URL: back off rather than spin
        return;
      }
      conn.opened = false;
      this._conn = conn;
      if (this.transport !== kind) {
        this.transport = kind;
        this._emit("transport", kind);
      }
    }

    // Forget the current connection at once (not waiting for a close handshake, which on a
    // dead network can take minutes) and fail every request that was waiting on it.
    _drop(code) {
      const conn = this._conn;
      this._conn = null;
      this._stopHeartbeat();
      if (conn) conn.close(code);
      this._typingRefs.clear();
      const pending = Array.from(this._pending.values());
      this._pending.clear();
      for (const p of pending) {
        global.clearTimeout(p.timer);
        p.reject(offlineError());
      }
    }

    _connFrame(conn, data) {
      if (conn !== this._conn) return; // a late event of a connection already dropped
      if (typeof data === "string") {
        try {
          data = JSON.parse(data);
        } catch (e) {
          return;
        }
      }
      if (data && typeof data === "object") this._onFrame(data);
    }

    _connEnded(conn, code) {
      if (conn === this._conn) this._onDisconnect(code);
    }

    // An HTTP transport was refused outright (every room's join failed): report it per room.
    _refused(error, slugs) {
      const err = error && error.code ? Object.assign({type: "error"}, error) : null;
      if (!err || TRANSIENT_ERRORS.indexOf(err.code) !== -1) {
        this._onDisconnect(null);
        return;
      }
      this._drop(PROTOCOL.closeCodes.NORMAL);
      for (const slug of slugs) this._joinFailed(this._rooms.get(slug), err);
      this._open("reconnecting"); // with the rooms that are left (possibly none)
    }

    _onDisconnect(code) {
      const conn = this._conn;
      const opened = conn && conn.opened;
      this._drop(PROTOCOL.closeCodes.NORMAL);
      this._emit("close", {code: code, transport: conn ? conn.kind : null});
      if (!this._wanted) {
        this._setState("offline");
        return;
      }
      if (FATAL_CLOSE_CODES.indexOf(code) !== -1) {
        this._wanted = false;
        this._stopUpgrade();
        this._setState("offline");
        const name = code === PROTOCOL.closeCodes.UNAUTHORIZED ? "unauthorized" : "forbidden";
        this._emit("error", {type: "error", code: name, message: "connection closed (" + code + ")"});
        return;
      }
      if (isOffline()) {
        this._setState("offline");
        return;
      }
      const last = this._transportIndex >= this.transports.length - 1;
      const worked = conn && this._worked[conn.kind];
      if (!opened && !worked && ++this._failures >= FALLBACK_AFTER_FAILURES && !last) {
        // This transport never worked from here (a proxy, a firewall): fall back at once. One
        // that worked before is failing because the server is away: keep it, with backoff.
        this._transportIndex++;
        this._failures = 0;
        this._attempt = 0;
        this._open("reconnecting");
        return;
      }
      if (!opened && conn && conn.kind === "sse") {
        // EventSource hides the status: ask once with fetch whether the stream was refused.
        this._diagnoseSse(conn);
        return;
      }
      this._scheduleRetry(code === PROTOCOL.closeCodes.RATE_LIMITED ? RATE_LIMITED_MIN_DELAY_MS : 0);
    }

    _diagnoseSse(conn) {
      this._setState("reconnecting");
      const controller = new AbortController();
      const retry = () => {
        if (this._wanted && !this._conn && !this._retryTimer) this._scheduleRetry(0);
      };
      this._retryTimer = global.setTimeout(() => controller.abort(), this.requestTimeout);
      global.fetch(conn.url, {credentials: "same-origin", signal: controller.signal}).then((response) => {
        global.clearTimeout(this._retryTimer);
        this._retryTimer = null;
        if (response.ok) {
          controller.abort(); // a stream after all: retry it
          retry();
          return;
        }
        return response.json().then((body) => {
          if (!this._conn && this._wanted) this._refused(body && body.error, conn.rooms);
        });
      }).catch(() => {
        global.clearTimeout(this._retryTimer);
        this._retryTimer = null;
        retry();
      });
    }

    // Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^n)), so
    // that after a server restart the clients do not all come back in the same instant.
    _scheduleRetry(minDelay) {
      const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, this._attempt));
      const delay = Math.max(minDelay, Math.random() * ceiling);
      this._attempt++;
      this._setState("reconnecting");
      this._retryTimer = global.setTimeout(() => {
        this._retryTimer = null;
        if (!this._wanted) return;
        if (isOffline()) this._setState("offline");
        else this._open("reconnecting");
      }, delay);
    }

    _cancelRetry() {
      if (this._retryTimer) global.clearTimeout(this._retryTimer);
      this._retryTimer = null;
    }

    _onOnline() {
      if (!this._wanted || this._conn) return;
      this._cancelRetry();
      this._attempt = 0;
      this._open(this._everLive ? "reconnecting" : "connecting");
    }

    _onOffline() {
      if (!this._wanted) return;
      this._cancelRetry();
      this._drop(PROTOCOL.closeCodes.NORMAL);
      this._setState("offline");
    }

    // Ping every heartbeat; a ping still unanswered at the next tick means a dead link.
    _startHeartbeat(seconds) {
      this._stopHeartbeat();
      const ms = (seconds > 0 ? seconds : DEFAULT_HEARTBEAT_S) * 1000;
      this._heartbeatTimer = global.setInterval(() => {
        if (this._pingRef !== null) {
          this._onDisconnect(null);
          return;
        }
        this._pingRef = this._nextRef();
        this._rawSend({type: "ping", ref: this._pingRef});
      }, ms);
    }

    _stopHeartbeat() {
      if (this._heartbeatTimer) global.clearInterval(this._heartbeatTimer);
      this._heartbeatTimer = null;
      this._pingRef = null;
    }

    // -- upgrading from a fallback ----------------------------------------------------------

    // The best transport above the current one that this browser has, or -1.
    _betterIndex() {
      for (let i = 0; i < this._transportIndex; i++) {
        if (available(this.transports[i]) && this.transports[i] !== "longpoll") return i;
      }
      return -1;
    }

    _scheduleUpgrade() {
      this._stopUpgrade();
      if (this._betterIndex() === -1) return;
      const delay = this.upgradeInterval * (0.75 + Math.random() * 0.5);
      this._upgradeTimer = global.setTimeout(() => {
        this._upgradeTimer = null;
        this._tryUpgrade();
      }, delay);
    }

    _stopUpgrade() {
      if (this._upgradeTimer) global.clearTimeout(this._upgradeTimer);
      this._upgradeTimer = null;
      if (this._probe) this._probe.close();
      this._probe = null;
    }

    // Open the better transport beside the current one; once it says hello, move over
    // (the rooms resume from their last seq, so nothing is missed or repeated).
    _tryUpgrade() {
      const index = this._betterIndex();
      if (index === -1 || this.state !== "live") return;
      const kind = this.transports[index];
      const client = this;
      let probe;
      const done = (ok) => {
        if (this._probe !== probe) return;
        this._probe = null;
        probe.close();
        if (ok && this._wanted) {
          this._transportIndex = index;
          this._failures = 0;
          this._attempt = 0;
          this._drop(PROTOCOL.closeCodes.NORMAL);
          this._open("live");
        } else {
          this._scheduleUpgrade();
        }
      };
      const watcher = {
        _rooms: new Map(),
        urls: this.urls,
        _connFrame(conn, data) {
          if (typeof data === "string" && data.indexOf('"hello"') !== -1) done(true);
        },
        _connEnded() {
          done(false);
        },
      };
      try {
        probe = kind === "websocket" ? new WebSocketConn(watcher) : new SseConn(watcher, []);
      } catch (e) {
        this._scheduleUpgrade();
        return;
      }
      this._probe = probe;
      global.setTimeout(() => done(false), client.requestTimeout);
    }

    // -- frames ---------------------------------------------------------------------------

    _nextRef() {
      return "r" + ++this._refSeq;
    }

    _rawSend(frame) {
      return this._conn ? this._conn.sendFrame(frame) : false;
    }

    get _overHttp() {
      return this._conn !== null && this._conn.kind !== "websocket";
    }

    // Send a frame with a fresh ref; the promise settles with its ack or error frame.
    // onAck runs synchronously in dispatch, before any later frame is handled.
    _request(frame, onAck) {
      if (this.state !== "live") return Promise.reject(offlineError());
      const ref = (frame.ref = this._nextRef());
      return new Promise((resolve, reject) => {
        const timer = global.setTimeout(() => {
          this._pending.delete(ref);
          reject(clientError("timeout", "no reply from the server"));
        }, this.requestTimeout);
        this._pending.set(ref, {resolve: resolve, reject: reject, onAck: onAck, timer: timer});
        if (!this._rawSend(frame)) {
          this._pending.delete(ref);
          global.clearTimeout(timer);
          reject(offlineError());
        }
      });
    }

    // The HTTP API (sends and history over SSE and long-poll): resolves with the JSON body;
    // rejects with {type: "error", code, message, retry_after} like an error frame.
    _http(method, path, body) {
      const headers = {Accept: "application/json"};
      if (method !== "GET") {
        headers["Content-Type"] = "application/json";
        const token = cookie("csrftoken") || this.csrfToken;
        if (token) headers["X-CSRFToken"] = token;
      }
      const controller = new AbortController();
      const timer = global.setTimeout(() => controller.abort(), this.requestTimeout);
      const init = {method: method, headers: headers, credentials: "same-origin", signal: controller.signal};
      if (body !== undefined) init.body = JSON.stringify(body);
      return global.fetch(this.urls.api + path, init).then(
        (response) => response.json().then(
          (data) => {
            if (response.ok) return data;
            const error = (data && data.error) || {code: "internal", message: "HTTP " + response.status};
            throw Object.assign({type: "error"}, error);
          },
          () => {
            throw clientError(response.ok ? "internal" : "unavailable", "HTTP " + response.status);
          }
        ),
        () => {
          throw controller.signal.aborted ? clientError("timeout", "no reply from the server") : offlineError();
        }
      ).finally(() => global.clearTimeout(timer));
    }

    _onFrame(frame) {
      const room = frame.room !== undefined ? this._rooms.get(frame.room) : undefined;
      const handlers = room ? room.handlers : {};
      switch (frame.type) {
        case "hello":
          this._onHello(frame);
          break;
        case "pong":
          if (frame.ref === this._pingRef) this._pingRef = null;
          break;
        case "ack":
        case "error": {
          // Over SSE and long-poll the server joins each room itself, with ref = the room.
          const joined = this._overHttp && frame.ref !== undefined ? this._rooms.get(frame.ref) : undefined;
          if (joined) {
            if (frame.type === "ack") this._onJoinAck(joined, frame);
            else this._joinFailed(joined, frame);
            break;
          }
          const pending = frame.ref !== undefined ? this._pending.get(frame.ref) : undefined;
          const typingRoom = frame.ref !== undefined ? this._typingRefs.get(frame.ref) : undefined;
          if (typingRoom) {
            // Typing is best effort: never reported, but a user who may not post stops sending it.
            this._typingRefs.delete(frame.ref);
            if (frame.code === "forbidden" || frame.code === "unauthorized") typingRoom.noTyping = true;
            break;
          }
          if (!pending) {
            if (frame.type === "error") this._emit("error", frame);
            break;
          }
          this._pending.delete(frame.ref);
          global.clearTimeout(pending.timer);
          if (frame.type === "error") {
            pending.reject(frame);
          } else {
            if (pending.onAck) pending.onAck(frame);
            pending.resolve(frame);
          }
          break;
        }
        case "message":
          // Drop anything at or below the last seq delivered: replays after a reconnect
          // overlap what was already shown, and the page must never see a message twice.
          if (!room || typeof frame.seq !== "number" || (room.lastSeq !== null && frame.seq <= room.lastSeq)) break;
          room.lastSeq = frame.seq;
          safeCall(handlers.onMessage, frame);
          break;
        case "presence_state":
        case "presence_diff":
          safeCall(handlers.onPresence, frame);
          break;
        case "typing":
          safeCall(handlers.onTyping, frame);
          break;
        case "retract":
          safeCall(handlers.onRetract, frame);
          break;
        case "removed":
          if (room) this._rooms.delete(frame.room); // never re-join a room we were removed from
          safeCall(handlers.onRemoved, frame);
          break;
        default:
          break; // unknown types are ignored, so a newer server stays compatible
      }
    }

    _onHello(frame) {
      if (frame.protocol !== PROTOCOL.version) {
        this._emit("error", {type: "error", code: "protocol", message: "server speaks protocol " + frame.protocol});
      }
      const conn = this._conn;
      conn.opened = true;
      this._worked[conn.kind] = true;
      if (frame.user !== undefined) this.user = frame.user || null;
      this._attempt = 0;
      this._failures = 0;
      this._everLive = true;
      if (conn.kind === "websocket") this._startHeartbeat(frame.heartbeat);
      this._setState("live");
      this._emit("hello", frame);
      if (this._transportIndex > 0) this._scheduleUpgrade();
      else this._stopUpgrade();
      // Frames on one socket are handled in order, so sends issued after this see the rooms
      // joined again. SSE and long-poll joined them with the request: if a room was added
      // while that request was on its way, follow the new set of rooms.
      conn.joinAll();
      if (conn.rooms && Array.from(this._rooms.keys()).some((slug) => conn.rooms.indexOf(slug) === -1)) {
        this._roomsChanged(null);
      }
    }

    // -- rooms ----------------------------------------------------------------------------

    join(slug, handlers) {
      const existing = this._rooms.get(slug);
      if (existing) {
        existing.handlers = handlers || existing.handlers;
        return existing.ready;
      }
      const room = {slug: slug, handlers: handlers || {}, lastSeq: null, epoch: null, settled: false, conn: null};
      const start = this.pageCursor[slug];
      if (start && typeof start.seq === "number") {
        // Resume from where the page was rendered: the replay brings exactly what came after.
        room.lastSeq = start.seq;
        room.epoch = typeof start.epoch === "number" ? start.epoch : null;
        delete this.pageCursor[slug];
      }
      room.ready = new Promise((resolve, reject) => {
        room.resolve = resolve;
        room.reject = reject;
      });
      this._rooms.set(slug, room);
      if (this.state === "live") this._roomsChanged(room);
      return room.ready;
    }

    // A room was added or removed while connected: join it (WebSocket), or follow the new
    // set of rooms with a new stream (SSE) or poll (long-poll).
    _roomsChanged(room) {
      const conn = this._conn;
      if (!conn) return;
      if (conn.kind === "websocket") {
        if (room) this._sendJoin(room);
        return;
      }
      this._drop(PROTOCOL.closeCodes.NORMAL);
      this._open(this.state);
    }

    _sendJoin(room) {
      const frame = {type: "join", room: room.slug};
      if (room.lastSeq !== null) {
        // A re-join: ask for every message after the last one delivered.
        frame.after_seq = room.lastSeq;
        if (room.epoch !== null) frame.epoch = room.epoch;
      }
      this._request(frame, (ack) => this._onJoinAck(room, ack)).catch((err) => this._joinFailed(room, err));
    }

    _joinFailed(room, err) {
      if (!room || this._rooms.get(room.slug) !== room) return;
      if (err.code === "offline") return; // the next hello re-joins
      if (TRANSIENT_ERRORS.indexOf(err.code) !== -1) {
        const conn = this._conn;
        const delay = err.retry_after ? err.retry_after * 1000 : 1000 + Math.random() * 2000;
        global.setTimeout(() => {
          if (this._conn !== conn || this._rooms.get(room.slug) !== room) return;
          if (conn.kind === "websocket") this._sendJoin(room);
          else this._roomsChanged(null); // a new stream or poll joins it again
        }, delay);
        return;
      }
      this._rooms.delete(room.slug);
      safeCall(room.handlers.onError, err);
      if (!room.settled) {
        room.settled = true;
        room.reject(err);
      }
    }

    _onJoinAck(room, ack) {
      if (this._rooms.get(room.slug) !== room) {
        // Left (or removed) while the join was in flight: undo it on the server.
        if (!this._rooms.has(room.slug)) this._rawSend({type: "leave", room: room.slug, ref: this._nextRef()});
        return;
      }
      // Every long-poll request joins again: only the first join of a connection, or one
      // that could not resume, is news.
      if (room.conn === this._conn && ack.recovered) return;
      room.conn = this._conn;
      const rejoin = room.lastSeq !== null;
      // recovered: the missed messages follow this ack and carry lastSeq up to the head.
      // Otherwise the timeline starts at the head, and a re-join has a hole to refill.
      if (!rejoin || !ack.recovered) room.lastSeq = typeof ack.seq === "number" ? ack.seq : 0;
      room.epoch = typeof ack.epoch === "number" ? ack.epoch : null;
      room.noTyping = false; // rights may have changed since the last join
      safeCall(room.handlers.onJoin, ack);
      if (rejoin && !ack.recovered) safeCall(room.handlers.onReset, ack);
      if (!room.settled) {
        room.settled = true;
        room.resolve(ack);
      }
    }

    leave(slug) {
      const room = this._rooms.get(slug);
      if (!room) return Promise.resolve(null);
      this._rooms.delete(slug);
      if (this.state !== "live") return Promise.resolve(null);
      if (this._overHttp) {
        this._roomsChanged(null);
        return Promise.resolve(null);
      }
      return this._request({type: "leave", room: slug}).catch(() => null);
    }

    // Resolves with {seq, id}; rejects with the error frame, or an Error whose code is
    // "offline" or "timeout". Either way err.clientMsgId is set: pass it back as
    // options.clientMsgId to retry, and the server answers with the original message instead
    // of storing a duplicate.
    send(slug, payload, options) {
      const clientMsgId = (options && options.clientMsgId) || randomId();
      let sent;
      if (this.state === "live" && this._overHttp) {
        const body = {payload: payload, client_msg_id: clientMsgId};
        sent = this._http("POST", encodeURIComponent(slug) + "/messages", body);
      } else {
        sent = this._request({type: "send", room: slug, payload: payload, client_msg_id: clientMsgId});
      }
      return sent.then(
        (ack) => ({seq: ack.seq, id: ack.id}),
        (err) => {
          err.clientMsgId = clientMsgId;
          throw err;
        }
      );
    }

    // Resolves with the messages (ascending by seq) before options.beforeSeq (default: newest).
    history(slug, options) {
      options = options || {};
      if (this.state === "live" && this._overHttp) {
        const query = [];
        if (options.beforeSeq != null) query.push("before_seq=" + options.beforeSeq);
        if (options.limit != null) query.push("limit=" + options.limit);
        const path = encodeURIComponent(slug) + "/messages" + (query.length ? "?" + query.join("&") : "");
        return this._http("GET", path).then((data) => data.messages || []);
      }
      const frame = {type: "history", room: slug};
      if (options.beforeSeq != null) frame.before_seq = options.beforeSeq;
      if (options.limit != null) frame.limit = options.limit;
      return this._request(frame).then((ack) => ack.messages || []);
    }

    // Tell the others we are typing; throttled, so call it on every keystroke. WebSocket only:
    // the HTTP transports have no way to send it.
    typing(slug) {
      const room = this._rooms.get(slug);
      if (!room || room.noTyping || this.state !== "live" || this._overHttp) return;
      const now = Date.now();
      if (room.lastTyping && now - room.lastTyping < TYPING_INTERVAL_MS) return;
      room.lastTyping = now;
      // typing has no reply; the ref only lets an error about it be recognised (see _onFrame).
      if (room.typingRef) this._typingRefs.delete(room.typingRef);
      room.typingRef = this._nextRef();
      this._typingRefs.set(room.typingRef, room);
      this._rawSend({type: "typing", room: slug, ref: room.typingRef});
    }
  }

  global.Realtime = {PROTOCOL: PROTOCOL, TRANSPORTS: TRANSPORTS.slice(), Client: Client};
})(typeof window !== "undefined" ? window : globalThis);
