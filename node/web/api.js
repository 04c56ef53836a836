// The HTTP API (docs/protocol.md section 4), on this page's own origin.

/** What an error code means, in words a person can act on. */
export const ERROR_WORDS = {
  bad_request: "The request was not valid.",
  invalid_frame: "The page sent something the server did not understand.",
  unauthorized: "Your session has ended. Please log in again.",
  forbidden: "You are not allowed to do that (privacy settings, or not a member).",
  not_found: "No such user or group.",
  conflict: "That is not possible right now (the name is taken, or a limit was reached).",
  message_too_large: "The message is too long (at most 100,000 bytes).",
  group_full: "The group is full (at most 100 members).",
  rate_limited: "You are sending too fast; retrying in a moment.",
  unavailable: "The service is busy or partly unreachable; retrying.",
  internal: "The server had a problem; retrying.",
};

export function errorWords(code, message) {
  const words = ERROR_WORDS[code] || ERROR_WORDS.internal;
  return message ? `${words} (${message})` : words;
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(errorWords(code, message));
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(base = "") {
    this.base = base;
    this.token = null;
  }

  async call(method, path, body) {
    const headers = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(this.base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(10000),
      });
    } catch {
      throw new ApiError(0, "unavailable", "the server could not be reached");
    }
    if (res.status === 204) return null;
    let data = null;
    try {
      data = await res.json();
    } catch {
      data = null;
    }
    if (!res.ok) {
      throw new ApiError(res.status, data?.code || "internal", data?.message || `HTTP ${res.status}`);
    }
    return data;
  }

  signup(username, password) {
    return this.call("POST", "/v1/signup", { username, password });
  }
  login(username, password) {
    return this.call("POST", "/v1/login", { username, password, device_name: browserName() });
  }
  logout() {
    return this.call("POST", "/v1/logout");
  }
  me() {
    return this.call("GET", "/v1/me");
  }
  userByName(name) {
    return this.call("GET", `/v1/users/${encodeURIComponent(name)}`);
  }
  userById(id) {
    return this.call("GET", `/v1/users/id/${encodeURIComponent(id)}`);
  }
  friends() {
    return this.call("GET", "/v1/friends");
  }
  friendRequests() {
    return this.call("GET", "/v1/friends/requests");
  }
  befriend(id) {
    return this.call("POST", `/v1/friends/${encodeURIComponent(id)}`);
  }
  unfriend(id) {
    return this.call("DELETE", `/v1/friends/${encodeURIComponent(id)}`);
  }
  groups() {
    return this.call("GET", "/v1/groups");
  }
  group(id) {
    return this.call("GET", `/v1/groups/${encodeURIComponent(id)}`);
  }
  createGroup(name) {
    return this.call("POST", "/v1/groups", { name, members: [] });
  }
  addMember(group, user) {
    return this.call("POST", `/v1/groups/${encodeURIComponent(group)}/members`, { user_id: user });
  }
  removeMember(group, user) {
    return this.call(
      "DELETE",
      `/v1/groups/${encodeURIComponent(group)}/members/${encodeURIComponent(user)}`,
    );
  }
  history(conversation, before, limit = 50) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (before) q.set("before", before);
    return this.call("GET", `/v1/conversations/${encodeURIComponent(conversation)}/messages?${q}`);
  }
}

function browserName() {
  const ua = navigator.userAgent;
  const name = /Firefox\//.test(ua) ? "Firefox" : /Chrom/.test(ua) ? "Chromium" : "browser";
  return `web (${name})`;
}
