// The page's local storage: one IndexedDB database per user on this origin, shared by the
// user's tabs. It keeps messages (deduplicated by message id), the conversation list with
// unread counts, the sync cursor, the largest message id seen, sends not yet acknowledged,
// and user names, so that a reload shows everything at once and syncs only what is new.

const VERSION = 1;

function request(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

function finished(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

/** A message id as a key that sorts like the number (ids are decimal strings). */
export function sortKey(id) {
  return String(id).padStart(20, "0");
}

export class Store {
  static async open(userId) {
    const r = indexedDB.open(`chat-${userId}`, VERSION);
    r.onupgradeneeded = () => {
      const db = r.result;
      const messages = db.createObjectStore("messages", { keyPath: "message_id" });
      messages.createIndex("by_conversation", ["conversation", "key"]);
      db.createObjectStore("conversations", { keyPath: "id" });
      db.createObjectStore("outbox", { keyPath: "id" });
      db.createObjectStore("users", { keyPath: "user_id" });
      db.createObjectStore("meta");
    };
    return new Store(await request(r));
  }

  constructor(db) {
    this.db = db;
    // Another tab of this user logged out and deletes the database: let it.
    db.onversionchange = () => db.close();
  }

  /** Deletes this user's local copy (messages, cursor, pending sends). */
  static async remove(userId) {
    await request(indexedDB.deleteDatabase(`chat-${userId}`)).catch(() => {});
  }

  close() {
    this.db.close();
  }

  async get(store, key) {
    return request(this.db.transaction(store).objectStore(store).get(key));
  }

  async all(store) {
    return request(this.db.transaction(store).objectStore(store).getAll());
  }

  async put(store, value, key) {
    const tx = this.db.transaction(store, "readwrite");
    tx.objectStore(store).put(value, key);
    await finished(tx);
  }

  async delete(store, key) {
    const tx = this.db.transaction(store, "readwrite");
    tx.objectStore(store).delete(key);
    await finished(tx);
  }

  /** Stores the messages it does not have yet and answers those (deduplication by id). */
  async addMessages(messages) {
    const tx = this.db.transaction("messages", "readwrite");
    const os = tx.objectStore("messages");
    const fresh = [];
    const seen = new Set();
    for (const m of messages) {
      if (seen.has(m.message_id)) continue;
      seen.add(m.message_id);
      const have = await request(os.getKey(m.message_id));
      if (have !== undefined) continue;
      const stored = { ...m, key: sortKey(m.message_id) };
      os.put(stored);
      fresh.push(stored);
    }
    await finished(tx);
    return fresh;
  }

  /** Up to `limit` messages of a conversation older than `beforeKey` (all if null), newest first. */
  async page(conversation, beforeKey, limit) {
    const index = this.db.transaction("messages").objectStore("messages").index("by_conversation");
    const upper = beforeKey === null ? [conversation, "\uffff"] : [conversation, beforeKey];
    const range = IDBKeyRange.bound([conversation, ""], upper, false, beforeKey !== null);
    const out = [];
    return new Promise((resolve, reject) => {
      const r = index.openCursor(range, "prev");
      r.onerror = () => reject(r.error);
      r.onsuccess = () => {
        const c = r.result;
        if (!c || out.length >= limit) {
          resolve(out);
          return;
        }
        out.push(c.value);
        c.continue();
      };
    });
  }
}
