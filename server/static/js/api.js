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

export async function request(url, { method = "GET", body, token } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
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
      headers: { "content-type": "application/json" },
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
