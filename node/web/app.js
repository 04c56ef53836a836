// The page: sign in, then the conversation list, friends, groups and one open conversation.
// Everything a user or the server wrote is put on the page as text (textContent), never as HTML.

import { Api } from "./api.js";
import { Chat, directConversation } from "./chat.js";
import { Store } from "./store.js";

const $ = (id) => document.getElementById(id);
const api = new Api();
let chat = null;
let store = null;
let session = null;
const names = new Map(); // user id -> username
const groups = new Map(); // group id -> {group_id, name, owner, members}
const presence = new Map(); // user id -> {status, last_seen}
let friends = [];
let pollTimer = null;
let paging = { conversation: null, oldestKey: null, more: false, loading: false };

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.includes("-")) e.setAttribute(k, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e[k] = v;
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 6000);
}

function time(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function lastSeenText(p) {
  if (!p) return "";
  if (p.status === "online") return "online";
  if (!p.last_seen) return "never seen";
  const mins = Math.max(0, Math.round((Date.now() - p.last_seen) / 60000));
  if (mins < 1) return "last seen just now";
  if (mins < 60) return `last seen ${mins} min ago`;
  return `last seen ${new Date(p.last_seen).toLocaleString()}`;
}

// ---- names ----

async function nameOf(userId) {
  if (userId === session?.user_id) return session.username;
  if (names.has(userId)) return names.get(userId);
  const cached = await store.get("users", userId);
  if (cached) {
    names.set(userId, cached.username);
    return cached.username;
  }
  try {
    const u = await api.userById(userId);
    names.set(userId, u.username);
    await store.put("users", { user_id: u.user_id, username: u.username });
    return u.username;
  } catch {
    return `user ${userId}`;
  }
}

function remember(user) {
  names.set(user.user_id, user.username);
  store?.put("users", { user_id: user.user_id, username: user.username });
}

async function titleOf(conv) {
  if (conv.kind === "group") return groups.get(conv.group)?.name || "group";
  return nameOf(conv.peer);
}

// ---- sign in / out ----

function showAuth() {
  $("auth").hidden = false;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("me").textContent = "";
  setConn("offline");
  $("username").focus();
}

async function authSubmit(signup) {
  const username = $("username").value.trim();
  const password = $("password").value;
  $("auth-error").textContent = "";
  if (!$("auth-form").reportValidity()) return;
  try {
    if (signup) await api.signup(username, password);
    const login = await api.login(username, password);
    const s = { token: login.token, user_id: login.user_id, device_id: login.device_id, username };
    sessionStorage.setItem("chat.session", JSON.stringify(s));
    $("password").value = "";
    await startSession(s);
  } catch (e) {
    $("auth-error").textContent =
      e.status === 401 ? "Wrong username or password." : e.status === 409 ? "That username is taken." : e.message;
  }
}

async function startSession(s) {
  session = s;
  api.token = s.token;
  store = await Store.open(s.user_id);
  for (const u of await store.all("users")) names.set(u.user_id, u.username);
  $("auth").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = s.username;
  chat = new Chat(api, store, s);
  chat.addEventListener("state", (e) => setConn(e.detail.name, e.detail.detail));
  chat.addEventListener("messages", (e) => onMessages(e.detail.messages));
  chat.addEventListener("conversation", () => renderConversations());
  chat.addEventListener("pending", (e) => onPending(e.detail));
  chat.addEventListener("acked", (e) => onAcked(e.detail));
  chat.addEventListener("failed", (e) => onFailed(e.detail));
  chat.addEventListener("retrying", (e) => toast(e.detail.text));
  chat.addEventListener("presence", (e) => onPresence(e.detail));
  chat.addEventListener("notice", (e) => toast(e.detail.text));
  chat.addEventListener("synced", (e) => {
    document.body.dataset.syncAfter = e.detail.after ?? "";
    document.body.dataset.syncCount = String(e.detail.count);
    document.body.dataset.synced = String(Number(document.body.dataset.synced || 0) + 1);
  });
  chat.addEventListener("ready", () => {
    document.body.dataset.connects = String(Number(document.body.dataset.connects || 0) + 1);
    refresh();
    // Presence subscriptions live as long as a connection: renew the open group's.
    if (paging.conversation?.startsWith("g:")) loadGroup(paging.conversation.slice(2));
  });
  chat.addEventListener("loggedout", () => endSession("You were logged out. Please log in again."));
  await renderConversations();
  await chat.start();
  refresh();
  clearInterval(pollTimer);
  pollTimer = setInterval(refresh, 4000);
}

async function endSession(message) {
  clearInterval(pollTimer);
  chat?.stop();
  chat = null;
  store?.close();
  store = null;
  session = null;
  api.token = null;
  names.clear();
  groups.clear();
  presence.clear();
  sessionStorage.removeItem("chat.session");
  closeConversation();
  $("conv-list").replaceChildren();
  showAuth();
  if (message) $("auth-error").textContent = message;
}

/** Logs this device out and deletes the local copy of the user's messages. */
async function logout() {
  const userId = session?.user_id;
  try {
    await api.logout();
  } catch {
    // The token may already be gone; the page forgets it either way.
  }
  await endSession("");
  if (userId) await Store.remove(userId);
}

function setConn(name, detail = "") {
  const s = $("conn-state");
  s.dataset.state = name;
  s.textContent = name;
  s.title = detail;
}

// ---- friends, groups, presence (polled: requests and accepts are not pushed) ----

async function refresh() {
  if (!session) return;
  try {
    const [list, requests, mine] = await Promise.all([api.friends(), api.friendRequests(), api.groups()]);
    friends = list;
    for (const f of list) {
      remember(f);
      presence.set(f.user_id, { status: f.status, last_seen: f.last_seen });
    }
    renderFriends();
    renderRequests(requests);
    groups.clear();
    for (const g of mine) {
      groups.set(g.group_id, g);
      await chat?.ensureConversation(`g:${g.group_id}`);
    }
    await renderConversations();
    if (paging.conversation?.startsWith("g:")) renderMembers();
  } catch (e) {
    if (e.status === 401) endSession("Your session has ended. Please log in again.");
  }
}

function renderFriends() {
  const items = friends.map((f) => {
    const p = presence.get(f.user_id) || f;
    return el(
      "li",
      { class: "friend", "data-user": f.user_id, "data-status": p.status },
      el("span", { class: "dot", title: p.status }),
      el("span", { class: "grow name", text: f.username }),
      el("span", { class: "last-seen", text: lastSeenText(p) }),
      el("button", { type: "button", class: "link chat", text: "Chat", onclick: () => openDirect(f.user_id) }),
      el("button", {
        type: "button",
        class: "link remove",
        text: "Remove",
        onclick: () => act(() => api.unfriend(f.user_id)),
      }),
    );
  });
  if (items.length === 0) items.push(el("li", { class: "none", text: "No friends yet." }));
  $("friend-list").replaceChildren(...items);
}

function renderRequests(r) {
  const items = [];
  for (const u of r.incoming) {
    remember(u);
    items.push(
      el(
        "li",
        { class: "request incoming", "data-user": u.user_id },
        el("span", { class: "grow", text: `${u.username} wants to be friends` }),
        el("button", { type: "button", class: "accept", text: "Accept", onclick: () => act(() => api.befriend(u.user_id)) }),
        el("button", { type: "button", class: "secondary decline", text: "Decline", onclick: () => act(() => api.unfriend(u.user_id)) }),
      ),
    );
  }
  for (const u of r.outgoing) {
    remember(u);
    items.push(
      el(
        "li",
        { class: "request outgoing", "data-user": u.user_id },
        el("span", { class: "grow", text: `asked ${u.username}` }),
        el("button", { type: "button", class: "secondary cancel", text: "Cancel", onclick: () => act(() => api.unfriend(u.user_id)) }),
      ),
    );
  }
  if (items.length === 0) items.push(el("li", { class: "none", text: "No pending requests." }));
  $("request-list").replaceChildren(...items);
  const count = $("request-count");
  count.hidden = r.incoming.length === 0;
  count.textContent = String(r.incoming.length);
}

async function act(fn) {
  try {
    await fn();
  } catch (e) {
    toast(e.message);
  }
  await refresh();
}

function onPresence(p) {
  presence.set(p.user_id, { status: p.status, last_seen: p.last_seen });
  renderFriends();
  renderMembers();
}

// ---- conversation list ----

async function renderConversations() {
  if (!store) return;
  const all = await store.all("conversations");
  all.sort((a, b) => (a.lastKey < b.lastKey ? 1 : a.lastKey > b.lastKey ? -1 : 0));
  const items = [];
  for (const c of all) {
    if (c.kind === "group" && !groups.has(c.group) && groups.size > 0 && !c.lastKey) continue;
    const title = await titleOf(c);
    const last = c.lastKey ? `${c.lastFrom === session.user_id ? "You: " : ""}${c.lastBody}` : "No messages yet";
    items.push(
      el(
        "li",
        {
          class: "conv-item",
          "data-conv": c.id,
          "data-unread": String(c.unread || 0),
          tabIndex: 0,
          role: "button",
          onclick: () => openConversation(c.id),
          onkeydown: (ev) => {
            if (ev.key === "Enter" || ev.key === " ") {
              ev.preventDefault();
              openConversation(c.id);
            }
          },
        },
        el("span", { class: "conv-text" }, el("span", { class: "conv-title", text: title }), el("span", { class: "conv-last", text: last.slice(0, 200) })),
        c.unread ? el("span", { class: "badge unread", text: String(c.unread) }) : null,
      ),
    );
    if (paging.conversation === c.id) items[items.length - 1].setAttribute("aria-current", "true");
  }
  $("conv-list").replaceChildren(...items);
}

// ---- one conversation ----

async function openDirect(userId) {
  const id = directConversation(session.user_id, userId);
  await chat.ensureConversation(id);
  selectTab("chats");
  await openConversation(id);
}

async function openConversation(id) {
  const conv = await chat.ensureConversation(id);
  chat.openConversation = id;
  paging = { conversation: id, oldestKey: null, more: true, loading: false };
  $("conv-empty").hidden = true;
  $("conv-view").hidden = false;
  $("app").classList.add("in-conv");
  $("conv-title").textContent = await titleOf(conv);
  $("composer-error").textContent = "";
  $("messages").replaceChildren();
  if (conv.kind === "group") {
    $("group-panel").hidden = false;
    $("conv-sub").textContent = "group";
    renderMembers();
    loadGroup(conv.group);
  } else {
    $("group-panel").hidden = true;
    const p = presence.get(conv.peer);
    $("conv-sub").textContent = lastSeenText(p);
  }
  await loadOlder();
  for (const e of await chat.pendingFor(id)) addBubble(pendingAsMessage(e), e.state, e.error);
  scrollToEnd();
  await chat.markRead(id);
  $("body").focus();
}

function closeConversation() {
  if (chat) chat.openConversation = null;
  paging = { conversation: null, oldestKey: null, more: false, loading: false };
  $("conv-view").hidden = true;
  $("conv-empty").hidden = false;
  $("app").classList.remove("in-conv");
}

async function loadGroup(groupId) {
  try {
    const g = await api.group(groupId);
    groups.set(groupId, g);
    for (const p of g.presence || []) presence.set(p.user_id, { status: p.status, last_seen: p.last_seen });
    const others = g.members.filter((m) => m !== session.user_id);
    if (others.length) chat.conn.send({ type: "subscribe_presence", users: others.slice(0, 1000) });
    renderMembers();
  } catch (e) {
    if (e.status === 403 || e.status === 404) $("conv-sub").textContent = "you are not a member of this group";
  }
}

async function renderMembers() {
  const id = paging.conversation;
  if (!id || !id.startsWith("g:")) return;
  const g = groups.get(id.slice(2));
  if (!g) return;
  const owner = g.owner === session.user_id;
  const items = [];
  for (const m of g.members) {
    const p = presence.get(m) || (m === session.user_id ? { status: "online" } : { status: "offline" });
    items.push(
      el(
        "li",
        { class: "member", "data-user": m, "data-status": p.status, title: lastSeenText(p) },
        el("span", { class: "dot" }),
        el("span", { text: `${await nameOf(m)}${m === g.owner ? " (owner)" : ""}` }),
        owner && m !== session.user_id
          ? el("button", {
              type: "button",
              class: "link remove-member",
              text: "Remove",
              "aria-label": "Remove member",
              onclick: () => act(() => api.removeMember(g.group_id, m)),
            })
          : null,
      ),
    );
  }
  if (paging.conversation === id) $("member-list").replaceChildren(...items);
}

function pendingAsMessage(e) {
  return { message_id: null, client_id: e.id, conversation: e.conversation, from: session.user_id, body: e.body, ts: e.created, key: "\uffff" + String(e.created) };
}

function addBubble(m, state = "sent", error = null, prepend = false) {
  const list = $("messages");
  if (m.message_id && list.querySelector(`[data-id="${m.message_id}"]`)) return;
  const mine = m.from === session.user_id;
  let node = mine && m.client_id ? list.querySelector(`[data-client-id="${CSS.escape(m.client_id)}"]`) : null;
  if (node) {
    if (m.message_id) {
      node.dataset.id = m.message_id;
      node.dataset.key = m.key;
    }
    setBubbleState(node, state, error, m.ts);
    return;
  }
  node = el(
    "div",
    { class: `msg${mine ? " mine" : ""}`, "data-key": m.key, "data-client-id": m.client_id || "" },
    el("span", { class: "from", text: mine ? "You" : "…" }),
    el("span", { class: "body", text: m.body }),
    el("span", { class: "meta" }),
  );
  if (m.message_id) node.dataset.id = m.message_id;
  setBubbleState(node, state, error, m.ts);
  if (!mine) nameOf(m.from).then((n) => (node.querySelector(".from").textContent = n));
  // Keep message-id order: insert before the first bubble with a larger key.
  const after = prepend ? list.querySelector(".msg") : [...list.querySelectorAll(".msg")].find((b) => b.dataset.key > m.key);
  if (after && (prepend ? after.dataset.key > m.key : true)) list.insertBefore(node, after);
  else list.append(node);
}

function setBubbleState(node, state, error, ts) {
  node.dataset.state = state;
  const meta = node.querySelector(".meta");
  meta.textContent = state === "pending" ? "sending…" : state === "failed" ? `not sent: ${error}` : time(ts);
}

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

async function loadOlder() {
  if (paging.loading || !paging.more || !paging.conversation) return;
  paging.loading = true;
  const id = paging.conversation;
  const list = $("messages");
  const before = list.scrollHeight - list.scrollTop;
  const page = await chat.older(id, paging.oldestKey, 50);
  if (paging.conversation !== id) return;
  for (const m of page.messages) addBubble(m, "sent", null, true);
  if (page.messages.length) paging.oldestKey = page.messages[page.messages.length - 1].key;
  paging.more = page.more;
  paging.loading = false;
  list.scrollTop = list.scrollHeight - before;
  if (page.error) toast(page.error);
}

function onMessages(messages) {
  const id = paging.conversation;
  const list = $("messages");
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  let added = false;
  for (const m of messages) {
    if (m.conversation !== id) continue;
    addBubble(m);
    added = true;
  }
  if (added) {
    if (atEnd || messages.some((m) => m.from === session.user_id)) scrollToEnd();
    if (document.visibilityState === "visible") chat.markRead(id);
  }
}

function onPending(e) {
  if (e.conversation === paging.conversation) {
    addBubble(pendingAsMessage(e), "pending");
    scrollToEnd();
  }
}

function onAcked({ clientId, message }) {
  const node = $("messages").querySelector(`[data-client-id="${CSS.escape(clientId)}"]`);
  if (!node) return;
  const dup = $("messages").querySelector(`[data-id="${message.message_id}"]`);
  if (dup && dup !== node) {
    node.remove();
    return;
  }
  node.dataset.id = message.message_id;
  node.dataset.key = message.message_id.padStart(20, "0");
  setBubbleState(node, "sent", null, message.ts);
}

function onFailed(e) {
  const node = $("messages").querySelector(`[data-client-id="${CSS.escape(e.id)}"]`);
  if (node) setBubbleState(node, "failed", e.error);
  $("composer-error").textContent = e.error;
}

async function submitMessage() {
  const text = $("body").value;
  if (!paging.conversation) return;
  const why = await chat.send(paging.conversation, text);
  $("composer-error").textContent = why || "";
  if (!why) $("body").value = "";
}

// ---- tabs and forms ----

function selectTab(name) {
  const chats = name === "chats";
  $("tab-chats").setAttribute("aria-selected", String(chats));
  $("tab-friends").setAttribute("aria-selected", String(!chats));
  $("chats-pane").hidden = !chats;
  $("friends-pane").hidden = chats;
}

function onSubmit(id, fn) {
  $(id).addEventListener("submit", async (ev) => {
    ev.preventDefault();
    await fn();
  });
}

function wire() {
  onSubmit("auth-form", () => authSubmit(false));
  $("signup-btn").addEventListener("click", () => authSubmit(true));
  $("logout").addEventListener("click", logout);
  $("tab-chats").addEventListener("click", () => selectTab("chats"));
  $("tab-friends").addEventListener("click", () => selectTab("friends"));
  $("back").addEventListener("click", closeConversation);
  onSubmit("new-chat", async () => {
    const name = $("new-chat-user").value.trim().toLowerCase();
    try {
      const u = await api.userByName(name);
      remember(u);
      $("new-chat-user").value = "";
      await openDirect(u.user_id);
    } catch (e) {
      toast(e.status === 404 ? `There is no user called ${name}.` : e.message);
    }
  });
  onSubmit("new-group", async () => {
    try {
      const g = await api.createGroup($("new-group-name").value.trim());
      groups.set(g.group_id, g);
      $("new-group-name").value = "";
      await openConversation(`g:${g.group_id}`);
      await renderConversations();
    } catch (e) {
      toast(e.message);
    }
  });
  onSubmit("add-friend", async () => {
    const name = $("add-friend-user").value.trim().toLowerCase();
    try {
      const u = await api.userByName(name);
      remember(u);
      const r = await api.befriend(u.user_id);
      $("add-friend-user").value = "";
      toast(r.state === "friends" ? `You and ${name} are now friends.` : `Friend request sent to ${name}.`);
    } catch (e) {
      toast(e.status === 404 ? `There is no user called ${name}.` : e.message);
    }
    await refresh();
  });
  onSubmit("add-member", async () => {
    const name = $("add-member-user").value.trim().toLowerCase();
    const group = paging.conversation?.slice(2);
    try {
      const u = await api.userByName(name);
      remember(u);
      await api.addMember(group, u.user_id);
      $("add-member-user").value = "";
      await loadGroup(group);
    } catch (e) {
      toast(e.status === 404 ? `There is no user called ${name}.` : e.message);
    }
  });
  $("leave-group").addEventListener("click", async () => {
    const id = paging.conversation;
    if (!id?.startsWith("g:")) return;
    try {
      await api.removeMember(id.slice(2), session.user_id);
      groups.delete(id.slice(2));
      await store.delete("conversations", id);
      closeConversation();
      toast("You left the group.");
    } catch (e) {
      toast(e.message);
    }
    await refresh();
  });
  onSubmit("composer", submitMessage);
  $("body").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      submitMessage();
    }
  });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 60) loadOlder();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && paging.conversation) chat?.markRead(paging.conversation);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && paging.conversation) closeConversation();
  });
}

wire();
const saved = sessionStorage.getItem("chat.session");
if (saved) startSession(JSON.parse(saved)).catch(() => endSession(""));
else showAuth();
