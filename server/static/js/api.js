// Talking to the hub's HTTP API: JSON calls and the Server-Sent Events of `POST /v1/generate`.
// Every failure becomes a ServerError carrying the server's own message.

export class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The server's `detail`: a string (HubError, HTTPException) or FastAPI's list of field errors. */
export function describeDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
  }
  return JSON.stringify(detail);
}

async function failure(response) {
  const text = await response.text();
  let message = text || response.statusText;
  try {
    message = describeDetail(JSON.parse(text).detail ?? text);
  } catch { /* not JSON: keep the text */ }
  return new ServerError(response.status, `${response.status}: ${message}`);
}

// The API key of a server started with --keys (kept for this browser tab only); sent with every call.
const KEY_ITEM = "hub-api-key";
export const apiKey = () => sessionStorage.getItem(KEY_ITEM) || "";
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key); else sessionStorage.removeItem(KEY_ITEM);
}

function authHeaders(token) {
  const key = token || apiKey();
  return key ? { authorization: `Bearer ${key}` } : {};
}

export async function request(url, { method = "GET", body, token } = {}) {
  const headers = authHeaders(token);
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ServerError(0, `cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/** POST /v1/generate with stream: true; calls onEvent for every `data:` event (text pieces, then the finish). */
export async function streamGenerate(body, onEvent) {
  let response;
  try {
    response = await fetch("/v1/generate", {
      method: "POST",
      headers: { "content-type": "application/json", ...authHeaders() },
      body: JSON.stringify({ ...body, stream: true }),
    });
  } catch (err) {
    throw new ServerError(0, `cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

/** An image the server draws (a training curve), fetched with the API key; an object URL for an <img>. */
export async function imageUrl(url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}
