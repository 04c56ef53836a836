// The chat model of one logged-in tab: the session's frames turned into stored messages,
// conversations, unread counts and pending sends (docs/protocol.md section 7.5). The page
// (app.js) renders what this emits and calls its methods.

import { errorWords } from "./api.js";
import { Connection, wsOf } from "./conn.js";
import { sortKey } from "./store.js";

export const MAX_BODY_BYTES = 100000;
const RETRY_CODES = new Set(["rate_limited", "unavailable", "internal"]);

/** `d:<low>:<high>` for a direct conversation between two users. */
export function directConversation(a, b) {
  const [low, high] = BigInt(a) <= BigInt(b) ? [a, b] : [b, a];
  return `d:${low}:${high}`;
}

export function conversationOf(message) {
  return message.conversation;
}

export class Chat extends EventTarget {
  constructor(api, store, session) {
    super();
    this.api = api;
    this.store = store;
    this.me = session.user_id;
    this.deviceId = session.device_id;
    this.openConversation = null;
    this.cursor = null;
    this.maxSeen = 0n;
    this.toldSeen = 0n;
    this.syncing = false;
    this.lastSync = { after: null, count: 0 };
    this.retryTimers = new Map();
    this.counter = 0;
    this.queue = Promise.resolve();
    const nodes = JSON.parse(sessionStorage.getItem("chat.nodes") || "[]");
    const wsUrl = sessionStorage.getItem("chat.ws") || wsOf(location.origin);
    this.conn = new Connection(session.token, wsUrl, nodes, {
      ready: (f) => this.onReady(f),
      // One frame at a time, in order: a cursor is stored only after the messages before it.
      frame: (f) => {
        this.queue = this.queue.then(() => this.onFrame(f)).catch((e) => this.emit("notice", { text: String(e) }));
      },
      state: (name, detail) => this.emit("state", { name, detail }),
      loggedOut: (reason) => this.emit("loggedout", { reason }),
      nodes: (list) => sessionStorage.setItem("chat.nodes", JSON.stringify(list)),
    });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  async start() {
    this.cursor = (await this.store.get("meta", "cursor")) ?? null;
    const seen = await this.store.get("meta", "max_seen");
    this.maxSeen = seen ? BigInt(seen) : 0n;
    this.conn.start();
  }

  stop() {
    clearTimeout(this.resyncTimer);
    for (const t of this.retryTimers.values()) clearTimeout(t);
    this.conn.stop();
  }

  // ---- session ----

  onReady(frame) {
    sessionStorage.setItem("chat.ws", this.conn.url);
    this.emit("ready", frame);
    this.toldSeen = 0n;
    this.tellSeen();
    this.syncing = true;
    this.lastSync = { after: this.cursor, count: 0 };
    this.conn.send({ type: "sync", after: this.cursor });
    this.resendOutbox();
  }

  tellSeen() {
    if (this.maxSeen > this.toldSeen && this.conn.send({ type: "seen", message_id: String(this.maxSeen) })) {
      this.toldSeen = this.maxSeen;
    }
  }

  async onFrame(f) {
    switch (f.type) {
      case "message":
        await this.receive([f.message]);
        break;
      case "sync_batch":
        this.lastSync.count += f.messages.length;
        await this.receive(f.messages);
        if (f.cursor !== null && f.cursor !== undefined) await this.saveCursor(f.cursor);
        if (f.done) {
          this.syncing = false;
          this.emit("synced", this.lastSync);
        }
        break;
      case "cursor":
        await this.saveCursor(f.cursor);
        break;
      case "ack":
        await this.acked(f);
        break;
      case "presence":
        this.emit("presence", f);
        break;
      case "error":
        if (f.ref) await this.sendFailed(f);
        else if (this.syncing && RETRY_CODES.has(f.code)) this.resyncLater(f.retry_after_ms);
        else this.emit("notice", { text: errorWords(f.code, f.message) });
        break;
      default:
        break; // frames this page does not know are ignored (protocol section 1)
    }
  }

  /** A refused or broken `sync`: ask again from the stored cursor after a pause. */
  resyncLater(retryAfterMs) {
    const wait = (Number(retryAfterMs) || 1000) + Math.random() * 1000;
    clearTimeout(this.resyncTimer);
    this.resyncTimer = setTimeout(() => {
      this.lastSync = { after: this.cursor, count: 0 };
      this.conn.send({ type: "sync", after: this.cursor });
    }, wait);
  }

  async saveCursor(cursor) {
    this.cursor = cursor;
    await this.store.put("meta", cursor, "cursor");
  }

  noteSeen(id) {
    const n = BigInt(id);
    if (n > this.maxSeen) {
      this.maxSeen = n;
      this.store.put("meta", String(n), "max_seen");
    }
  }

  /** Stores new messages (dropping ids already held) and updates their conversations. */
  async receive(messages) {
    if (messages.length === 0) return;
    for (const m of messages) this.noteSeen(m.message_id);
    const fresh = await this.store.addMessages(messages);
    for (const m of fresh) {
      if (m.from === this.me) {
        // Our own message from another path (another device, or a sync after a lost ack).
        const pending = await this.store.get("outbox", m.client_id);
        if (pending) {
          await this.store.delete("outbox", m.client_id);
          this.clearRetry(m.client_id);
        }
      }
      await this.touchConversation(m);
    }
    if (fresh.length > 0) this.emit("messages", { messages: fresh });
  }

  async touchConversation(m) {
    const id = m.conversation;
    const conv = (await this.store.get("conversations", id)) || newConversation(id, this.me);
    if (!conv.lastKey || m.key > conv.lastKey) {
      conv.lastKey = m.key;
      conv.lastBody = m.body;
      conv.lastFrom = m.from;
      conv.lastTs = m.ts;
    }
    const reading = this.openConversation === id && document.visibilityState === "visible";
    if (m.from !== this.me && !reading) conv.unread = (conv.unread || 0) + 1;
    await this.store.put("conversations", conv);
    this.emit("conversation", conv);
  }

  async ensureConversation(id) {
    const have = await this.store.get("conversations", id);
    if (have) return have;
    const conv = newConversation(id, this.me);
    await this.store.put("conversations", conv);
    this.emit("conversation", conv);
    return conv;
  }

  async markRead(id) {
    const conv = await this.store.get("conversations", id);
    if (conv && conv.unread) {
      conv.unread = 0;
      await this.store.put("conversations", conv);
      this.emit("conversation", conv);
    }
  }

  // ---- sending ----

  /** Queues a message; answers an error sentence instead when it cannot be sent at all. */
  async send(conversation, body) {
    const bytes = new TextEncoder().encode(body).length;
    if (bytes === 0 || body.trim() === "") return "Type a message first.";
    if (bytes > MAX_BODY_BYTES) {
      return `This message is ${bytes.toLocaleString("en")} bytes; the limit is 100,000 bytes. Please shorten it.`;
    }
    const to = recipientOf(conversation, this.me);
    this.counter += 1;
    const id = `w${this.deviceId}-${Date.now().toString(36)}-${this.counter}-${Math.random().toString(36).slice(2, 8)}`;
    const entry = { id, conversation, to, body, created: Date.now(), state: "pending", error: null };
    await this.store.put("outbox", entry);
    this.emit("pending", entry);
    this.transmit(entry);
    return null;
  }

  transmit(entry) {
    this.tellSeen();
    this.conn.send({ type: "send", id: entry.id, to: entry.to, body: entry.body });
  }

  async resendOutbox() {
    const all = await this.store.all("outbox");
    all.sort((a, b) => a.created - b.created);
    for (const entry of all) if (entry.state === "pending") this.transmit(entry);
  }

  clearRetry(id) {
    clearTimeout(this.retryTimers.get(id));
    this.retryTimers.delete(id);
  }

  async acked(f) {
    this.clearRetry(f.ref);
    const entry = await this.store.get("outbox", f.ref);
    this.noteSeen(f.message_id);
    if (!entry) return; // an ack for a send this page already settled
    await this.store.delete("outbox", f.ref);
    const message = {
      message_id: f.message_id,
      conversation: f.conversation,
      from: this.me,
      body: entry.body,
      ts: f.ts,
      client_id: f.ref,
    };
    if (entry.to.user !== undefined) message.to = entry.to.user;
    else message.group = entry.to.group;
    this.emit("acked", { clientId: f.ref, message });
    await this.receive([message]);
  }

  async sendFailed(f) {
    const entry = await this.store.get("outbox", f.ref);
    if (!entry) return;
    if (RETRY_CODES.has(f.code)) {
      this.emit("retrying", { clientId: f.ref, text: errorWords(f.code) });
      this.clearRetry(f.ref);
      // The server says how long to wait for rate_limited; else 200 to 1,000 ms.
      const wait = (Number(f.retry_after_ms) || 200) + Math.random() * 800;
      this.retryTimers.set(
        f.ref,
        setTimeout(() => {
          this.retryTimers.delete(f.ref);
          this.transmit(entry);
        }, wait),
      );
      return;
    }
    entry.state = "failed";
    entry.error = errorWords(f.code, f.message);
    await this.store.put("outbox", entry);
    this.emit("failed", entry);
  }

  async discard(clientId) {
    this.clearRetry(clientId);
    await this.store.delete("outbox", clientId);
  }

  async pendingFor(conversation) {
    const all = await this.store.all("outbox");
    return all.filter((e) => e.conversation === conversation).sort((a, b) => a.created - b.created);
  }

  // ---- history ----

  /** Older messages of a conversation: from this tab's store, else from the server. */
  async older(conversation, beforeKey, limit = 50) {
    const local = await this.store.page(conversation, beforeKey, limit);
    if (local.length >= limit) return { messages: local, more: true };
    const oldestKey = local.length ? local[local.length - 1].key : beforeKey;
    const before = oldestKey ? BigInt(oldestKey).toString() : null;
    try {
      const page = await this.api.history(conversation, before, limit - local.length);
      const fresh = await this.store.addMessages(page.messages);
      const fetched = page.messages.map((m) => fresh.find((f) => f.message_id === m.message_id) || { ...m, key: sortKey(m.message_id) });
      return { messages: [...local, ...fetched], more: page.next_before !== null };
    } catch (e) {
      return { messages: local, more: false, error: e.message };
    }
  }
}

function newConversation(id, me) {
  const conv = { id, unread: 0, lastKey: "", lastBody: "", lastFrom: null, lastTs: 0 };
  if (id.startsWith("g:")) {
    conv.kind = "group";
    conv.group = id.slice(2);
  } else {
    const [, low, high] = id.split(":");
    conv.kind = "direct";
    conv.peer = low === me ? high : low;
  }
  return conv;
}

function recipientOf(conversation, me) {
  if (conversation.startsWith("g:")) return { group: conversation.slice(2) };
  const [, low, high] = conversation.split(":");
  return { user: low === me ? high : low };
}
