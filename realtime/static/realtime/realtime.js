/*
 * realtime.js: the browser client of the realtime wire protocol v1 (see DESIGN.md section 3).
 *
 * Plain browser JavaScript, no build step and no dependencies; load it as a classic <script>
 * (the {% realtime_script %} tag does) and use window.Realtime:
 *
 *   const client = new Realtime.Client();          // ws(s)://<this host>/ws/
 *   client.on("state", (s) => ...);                 // connecting | live | reconnecting | offline
 *   client.connect();
 *   client.join("lobby", {onMessage(msg) {...}, onReset(ack) {...}}).then((ack) => ...);
 *   client.send("lobby", {text: "hi"}).then(({seq, id}) => ..., (err) => err.code);
 *
 * The client does no DOM work at all: rendering server data is the page's job (with
 * textContent, never innerHTML).
 */
(function (global) {
  "use strict";

  // Checked against realtime/protocol.py by a Python test: keep it one valid JSON object.
  const PROTOCOL = /* protocol:begin */ {"version": 1, "clientTypes": ["join", "leave", "send", "typing", "history", "ping"], "serverTypes": ["hello", "ack", "pong", "message", "presence_state", "presence_diff", "typing", "retract", "removed", "error"], "errorCodes": ["bad_frame", "unknown_type", "invalid_room", "room_not_found", "forbidden", "unauthorized", "not_joined", "too_large", "rate_limited", "unavailable", "internal"], "closeCodes": {"NORMAL": 1000, "TOO_BIG": 1009, "INTERNAL": 1011, "RESTARTING": 1012, "UNAUTHORIZED": 4001, "FORBIDDEN": 4003, "SLOW_CONSUMER": 4008, "RATE_LIMITED": 4029}} /* protocol:end */;

  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30000;
  const RATE_LIMITED_MIN_DELAY_MS = 5000;
  const DEFAULT_HEARTBEAT_S = 25;
  const TYPING_INTERVAL_MS = 2000;
  // A request unanswered this long fails with code "timeout": the server cannot put the ref
  // on its reply to a frame it refused unparsed (too_large), and the caller must not hang.
  const REQUEST_TIMEOUT_MS = 30000;
  // After these close codes a new connection would be refused the same way (or would come
  // back anonymous after a revoked session), so the client stops and goes "offline".
  const FATAL_CLOSE_CODES = [PROTOCOL.closeCodes.UNAUTHORIZED, PROTOCOL.closeCodes.FORBIDDEN];
  // Join errors worth retrying on the same connection; any other code drops the room.
  const TRANSIENT_ERRORS = ["unavailable", "rate_limited", "internal", "timeout"];

  function defaultUrl(path) {
    const scheme = global.location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + global.location.host + (path || "/ws/");
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

  // Call a handler without letting an exception in page code break the socket's dispatch.
  function safeCall(fn, arg) {
    if (typeof fn !== "function") return;
    try {
      fn(arg);
    } catch (e) {
      if (global.console) global.console.error("realtime: handler failed", e);
    }
  }

  class Client {
    constructor(options) {
      options = options || {};
      const url = options.url || "/ws/";
      this.url = url.charAt(0) === "/" ? defaultUrl(url) : url;
      this.requestTimeout = options.requestTimeout || REQUEST_TIMEOUT_MS;
      this.state = "offline";
      this.user = null; // from hello: {id, name} or null (anonymous)
      this._listeners = {};
      this._rooms = new Map(); // slug -> room entry (see join)
      this._pending = new Map(); // ref -> {resolve, reject, onAck, timer}
      this._typingRefs = new Map(); // ref of the latest typing frame -> room entry
      this._refSeq = 0;
      this._ws = null;
      this._wanted = false; // connect() called and close() not since
      this._everLive = false;
      this._attempt = 0;
      this._retryTimer = null;
      this._heartbeatTimer = null;
      this._pingRef = null;
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
      if (this._ws || this._retryTimer) return this;
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
      this._drop(PROTOCOL.closeCodes.NORMAL);
      this._setState("offline");
    }

    _open(state) {
      this._setState(state);
      let ws;
      try {
        ws = new global.WebSocket(this.url);
      } catch (e) {
        this._scheduleRetry(0); // e.g. a malformed URL: back off rather than spin
        return;
      }
      this._ws = ws;
      // Every handler checks that its socket is still the current one: a dropped socket may
      // still deliver late events, which must not touch the new connection's state.
      ws.onmessage = (event) => {
        if (this._ws === ws) this._onFrame(event.data);
      };
      ws.onclose = (event) => {
        if (this._ws === ws) this._onDisconnect(event.code);
      };
      ws.onerror = () => {}; // a close event always follows
    }

    // Forget the current socket at once (not waiting for its close handshake, which on a
    // dead network can take minutes) and fail every request that was waiting on it.
    _drop(code) {
      const ws = this._ws;
      this._ws = null;
      this._stopHeartbeat();
      if (ws) ws.close(code);
      this._typingRefs.clear();
      const pending = Array.from(this._pending.values());
      this._pending.clear();
      for (const p of pending) {
        global.clearTimeout(p.timer);
        p.reject(offlineError());
      }
    }

    _onDisconnect(code) {
      this._drop(PROTOCOL.closeCodes.NORMAL);
      this._emit("close", {code: code});
      if (!this._wanted) {
        this._setState("offline");
      } else if (FATAL_CLOSE_CODES.indexOf(code) !== -1) {
        this._wanted = false;
        this._setState("offline");
        const name = code === PROTOCOL.closeCodes.UNAUTHORIZED ? "unauthorized" : "forbidden";
        this._emit("error", {type: "error", code: name, message: "connection closed (" + code + ")"});
      } else if (isOffline()) {
        this._setState("offline");
      } else {
        this._scheduleRetry(code === PROTOCOL.closeCodes.RATE_LIMITED ? RATE_LIMITED_MIN_DELAY_MS : 0);
      }
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
      if (!this._wanted || this._ws) return;
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

    // -- frames ---------------------------------------------------------------------------

    _nextRef() {
      return "r" + ++this._refSeq;
    }

    _rawSend(frame) {
      if (!this._ws || this._ws.readyState !== 1) return false;
      this._ws.send(JSON.stringify(frame));
      return true;
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

    _onFrame(data) {
      if (typeof data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(data);
      } catch (e) {
        return;
      }
      if (!frame || typeof frame !== "object") return;
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
          if (!room || typeof frame.seq !== "number" || frame.seq <= room.lastSeq) break;
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
      this.user = frame.user || null;
      this._attempt = 0;
      this._everLive = true;
      this._startHeartbeat(frame.heartbeat);
      this._setState("live");
      this._emit("hello", frame);
      // Frames on one socket are handled in order, so sends issued after this see the rooms
      // joined again.
      for (const room of this._rooms.values()) this._sendJoin(room);
    }

    // -- rooms ----------------------------------------------------------------------------

    join(slug, handlers) {
      const existing = this._rooms.get(slug);
      if (existing) {
        existing.handlers = handlers || existing.handlers;
        return existing.ready;
      }
      const room = {slug: slug, handlers: handlers || {}, lastSeq: null, epoch: null, settled: false};
      room.ready = new Promise((resolve, reject) => {
        room.resolve = resolve;
        room.reject = reject;
      });
      this._rooms.set(slug, room);
      if (this.state === "live") this._sendJoin(room); // else the next hello joins it
      return room.ready;
    }

    _sendJoin(room) {
      const frame = {type: "join", room: room.slug};
      if (room.lastSeq !== null) {
        // A re-join: ask for every message after the last one delivered.
        frame.after_seq = room.lastSeq;
        if (room.epoch !== null) frame.epoch = room.epoch;
      }
      const socket = this._ws;
      this._request(frame, (ack) => this._onJoinAck(room, ack)).catch((err) => {
        if (err.code === "offline") return; // the next hello re-joins
        if (this._rooms.get(room.slug) !== room) return;
        if (TRANSIENT_ERRORS.indexOf(err.code) !== -1) {
          const delay = err.retry_after ? err.retry_after * 1000 : 1000 + Math.random() * 2000;
          global.setTimeout(() => {
            if (this._ws === socket && this._rooms.get(room.slug) === room) this._sendJoin(room);
          }, delay);
          return;
        }
        this._rooms.delete(room.slug);
        safeCall(room.handlers.onError, err);
        if (!room.settled) {
          room.settled = true;
          room.reject(err);
        }
      });
    }

    _onJoinAck(room, ack) {
      if (this._rooms.get(room.slug) !== room) {
        // Left (or removed) while the join was in flight: undo it on the server.
        if (!this._rooms.has(room.slug)) this._rawSend({type: "leave", room: room.slug, ref: this._nextRef()});
        return;
      }
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
      return this._request({type: "leave", room: slug}).catch(() => null);
    }

    // Resolves with {seq, id}; rejects with the error frame, or an Error whose code is
    // "offline" or "timeout". Either way err.clientMsgId is set: pass it back as
    // options.clientMsgId to retry, and the server answers with the original message instead
    // of storing a duplicate.
    send(slug, payload, options) {
      const clientMsgId = (options && options.clientMsgId) || randomId();
      const frame = {type: "send", room: slug, payload: payload, client_msg_id: clientMsgId};
      return this._request(frame).then(
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
      const frame = {type: "history", room: slug};
      if (options.beforeSeq != null) frame.before_seq = options.beforeSeq;
      if (options.limit != null) frame.limit = options.limit;
      return this._request(frame).then((ack) => ack.messages || []);
    }

    // Tell the others we are typing; throttled, so call it on every keystroke.
    typing(slug) {
      const room = this._rooms.get(slug);
      if (!room || room.noTyping || this.state !== "live") return;
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

  global.Realtime = {PROTOCOL: PROTOCOL, Client: Client};
})(typeof window !== "undefined" ? window : globalThis);
