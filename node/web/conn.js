// One device's WebSocket session (docs/protocol.md sections 5 and 7.5): authenticate, keep it
// alive with heartbeats at the interval `ready` gives, and after any loss reconnect with a
// jittered backoff, to the same node or, when it cannot be reached, to another one named by
// `/v1/discover` (asked of every node this page has heard of). A `draining` frame moves it at
// once to the node the frame names.

const BASE_DELAY_MS = 1000;
const MAX_DELAY_MS = 30000;

export function httpOf(wsUrl) {
  const u = new URL(wsUrl);
  return `${u.protocol === "wss:" ? "https:" : "http:"}//${u.host}`;
}

export function wsOf(httpBase) {
  return `${httpBase.replace(/^http/, "ws")}/v1/ws`;
}

function shuffle(list) {
  const a = [...list];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

/**
 * handlers: ready(frame), frame(frame), state(name, detail), loggedOut(reason).
 * States: "connecting", "connected", "reconnecting", "offline".
 */
export class Connection {
  constructor(token, wsUrl, knownNodes, handlers) {
    this.token = token;
    this.url = wsUrl;
    this.nodes = new Set(knownNodes);
    this.nodes.add(httpOf(wsUrl));
    this.handlers = handlers;
    this.ws = null;
    this.ready = false;
    this.failures = 0;
    this.stopped = false;
    this.everReady = false;
    this.lastSent = 0;
    this.retryTimer = null;
    this.heartbeatTimer = null;
    this.onlineListener = () => {
      if (!this.ws && !this.stopped) {
        clearTimeout(this.retryTimer);
        this.connect();
      }
    };
    window.addEventListener("online", this.onlineListener);
  }

  start() {
    this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onlineListener);
    clearTimeout(this.retryTimer);
    clearInterval(this.heartbeatTimer);
    if (this.ws) this.ws.close(1000);
    this.ws = null;
    this.setState("offline");
  }

  setState(name, detail = "") {
    this.state = name;
    this.handlers.state(name, detail);
  }

  /** Sends a frame if the session is ready; answers whether it did. */
  send(frame) {
    if (!this.ws || !this.ready || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    this.lastSent = Date.now();
    return true;
  }

  connect() {
    if (this.stopped) return;
    this.setState(this.everReady ? "reconnecting" : "connecting", this.url);
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.failures++;
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.ready = false;
    let authRefused = false;
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "auth", token: this.token }));
      this.lastSent = Date.now();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame.type === "draining") {
        this.moveTo(ws, frame.reconnect_to);
        return;
      }
      if (!this.ready) {
        if (frame.type === "ready") {
          this.onReady(frame);
        } else if (frame.type === "error" && frame.code === "unauthorized") {
          authRefused = true;
        }
        return;
      }
      this.handlers.frame(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      const wasReady = this.ready;
      this.ws = null;
      this.ready = false;
      clearInterval(this.heartbeatTimer);
      if (this.stopped) return;
      if (authRefused || (ev.code === 1008 && (ev.reason === "logged out" || ev.reason === "token expired"))) {
        this.stop();
        this.handlers.loggedOut(ev.reason || "unauthorized");
        return;
      }
      if (!wasReady) this.failures++;
      this.scheduleReconnect();
    };
  }

  /**
   * The node is draining (docs/protocol.md 5.6): leave it and connect at once, without
   * backoff, to the node it names (or as after a lost connection when it names none). The
   * new session syncs and resends the outbox on `ready`, as after any reconnect.
   */
  moveTo(ws, url) {
    if (this.ws !== ws || this.stopped) return;
    this.ws = null;
    this.ready = false;
    clearInterval(this.heartbeatTimer);
    ws.close(1000);
    if (url) {
      this.url = url;
      this.connect();
    } else {
      this.scheduleReconnect();
    }
  }

  onReady(frame) {
    this.ready = true;
    this.everReady = true;
    this.failures = 0;
    this.setState("connected", this.url);
    const every = Math.max(1000, Number(frame.heartbeat_interval_ms) || 5000);
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(() => {
      if (Date.now() - this.lastSent >= every / 2) this.send({ type: "heartbeat" });
    }, every / 2);
    this.learnNodes();
    this.handlers.ready(frame);
  }

  /** Remembers the cluster's live members, to find another node when this one is gone. */
  async learnNodes() {
    try {
      const res = await fetch(`${httpOf(this.url)}/v1/cluster`, { signal: AbortSignal.timeout(5000) });
      const view = await res.json();
      for (const m of view.members || []) {
        if (m.live && m.ws_url) this.nodes.add(httpOf(m.ws_url));
      }
      this.handlers.nodes?.([...this.nodes]);
    } catch {
      // Not fatal: the page still knows its own node.
    }
  }

  scheduleReconnect() {
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.setState("offline", "the browser is offline");
      return;
    }
    this.setState("reconnecting", this.url);
    // Base delay 1 s doubling per failed attempt up to 30 s, times a random factor in [1, 5).
    const base = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.min(this.failures, 5));
    const delay = this.failures === 0 ? base * (1 + 4 * Math.random()) : base * (1 + Math.random());
    this.retryTimer = setTimeout(async () => {
      if (this.failures > 0) {
        const other = await this.discover();
        if (other) this.url = other;
      }
      this.connect();
    }, delay);
  }

  /** Asks the known nodes (in random order) for a live node other than the failing one. */
  async discover() {
    const failing = httpOf(this.url);
    for (const base of shuffle([...this.nodes].filter((n) => n !== failing))) {
      try {
        const res = await fetch(`${base}/v1/discover`, { signal: AbortSignal.timeout(2000) });
        const info = await res.json();
        if (info.ws_url && httpOf(info.ws_url) !== failing) return info.ws_url;
        // The answering node has not noticed the failure yet; it is alive itself.
        return wsOf(base);
      } catch {
        // That node is gone too, or this page may not ask it; try the next.
      }
    }
    // No answer from anyone: try another known node's WebSocket directly.
    const others = [...this.nodes].filter((n) => n !== failing);
    return others.length ? wsOf(shuffle(others)[0]) : null;
  }
}
