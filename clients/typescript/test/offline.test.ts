/**
 * The client's own logic against scripted answers of a local node:http server (no bap-engine):
 * retries of 503 / ENGINE_BUSY / connection refused, what is never retried, the error mapping,
 * timeouts, and callEngine's single re-admit. Plus: every error code the OpenAPI document names has
 * its class.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { type IncomingMessage, type ServerResponse, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";

import {
  BapClient,
  BapError,
  ConnectionFailed,
  DEFAULT_RETRY_CODES,
  ERROR_CLASSES,
  EngineBusy,
  NotAdmitted,
  QuotaExceeded,
  ServiceUnavailable,
  VERSION,
  parseRetryAfter,
  requireAdmitted,
} from "@bap-engine/client";

import { freePort } from "./server.js";

interface Scripted {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
  hang?: boolean;
}

interface Seen {
  method: string;
  url: string;
  headers: IncomingMessage["headers"];
  body: string;
}

/** A server answering each request with the next scripted answer (the last one repeats). */
class Script {
  seen: Seen[] = [];
  #answers: Scripted[] = [];
  #server = createServer((req, res) => void this.#handle(req, res));
  url = "";

  async start(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  answer(...answers: Scripted[]): this {
    this.#answers = answers;
    this.seen = [];
    return this;
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let body = "";
    for await (const chunk of req) body += String(chunk);
    this.seen.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, body });
    const next = (this.#answers.length > 1 ? this.#answers.shift() : this.#answers[0]) ?? { status: 500 };
    if (next.hang) return;
    const text = typeof next.body === "string" ? next.body : next.body === undefined ? "" : JSON.stringify(next.body);
    res.writeHead(next.status, { "content-type": "application/json", ...next.headers });
    res.end(text);
  }
}

const envelope = (code: string, message = code.toLowerCase()) => ({ error: { code, message } });
const noWait = (waits: number[]) => ({ sleep: async (ms: number) => void waits.push(ms) });
const ENGINE = (url: string, key: string) => ({
  admitted: true,
  reason: null,
  engine: {
    engine_id: "e1", user_id: "u1", status: "running", url, api_key: key,
    engine_version: "v", created_at: "2026-01-01T00:00:00Z", last_health_at: null, idle_sleep: "auto",
  },
});

describe("BapClient against scripted answers", () => {
  const api = new Script();
  const engine = new Script();

  before(async () => {
    await api.start();
    await engine.start();
  });
  after(async () => {
    await api.close();
    await engine.close();
  });

  test("503 then 200: retried with growing backoff, same request each time", async () => {
    const waits: number[] = [];
    api.answer({ status: 503, body: envelope("SERVICE_UNAVAILABLE") }, { status: 503, body: envelope("SERVICE_UNAVAILABLE") },
      { status: 200, body: { total: 0, by_status: {}, health: "ok", unhealthy_count: 0 } });
    const bap = new BapClient({ baseUrl: api.url, platformKey: "pk-sept-x", retry: { backoffMs: 100, ...noWait(waits) } });
    const status = await bap.status();
    assert.equal(status.health, "ok");
    assert.equal(api.seen.length, 3);
    assert.ok(api.seen.every((s) => s.method === "GET" && s.url === "/status" && s.headers["x-platform-key"] === "pk-sept-x"));
    assert.equal(waits.length, 2);
    assert.ok(waits[0]! >= 100 && waits[0]! <= 110 && waits[1]! >= 200 && waits[1]! <= 220, String(waits));
  });

  test("409 ENGINE_BUSY with Retry-After: waits exactly that long; attempts are bounded", async () => {
    const waits: number[] = [];
    api.answer({ status: 409, body: envelope("ENGINE_BUSY"), headers: { "retry-after": "2" } });
    const bap = new BapClient({ baseUrl: api.url, platformKey: "k", retry: { attempts: 3, ...noWait(waits) } });
    await assert.rejects(bap.stop("u1"), (err: unknown) => {
      assert.ok(err instanceof EngineBusy);
      assert.equal(err.retryAfter, 2);
      return true;
    });
    assert.equal(api.seen.length, 3);
    assert.deepEqual(waits, [2000, 2000]);
  });

  test("a real wait: Retry-After 1 s is slept before the retry", async () => {
    api.answer({ status: 429, body: envelope("RATE_LIMITED"), headers: { "retry-after": "1" } },
      { status: 200, body: { admitted: false, engine: null, reason: "engine_not_found" } });
    const t0 = Date.now();
    const adm = await new BapClient({ baseUrl: api.url, platformKey: "k" }).admit("u1", { autoProvision: false });
    const elapsed = Date.now() - t0;
    assert.equal(adm.reason, "engine_not_found");
    assert.ok(elapsed >= 950 && elapsed < 5000, `${elapsed} ms`);
    assert.deepEqual(JSON.parse(api.seen[1]!.body), { auto_provision: false, auto_wake: true });
  });

  test("never retried: QUOTA_EXCEEDED, 4xx, attempts: 1", async () => {
    const waits: number[] = [];
    api.answer({ status: 429, body: envelope("QUOTA_EXCEEDED") });
    const bap = new BapClient({ baseUrl: api.url, platformKey: "k", retry: noWait(waits) });
    await assert.rejects(bap.provision("u1"), QuotaExceeded);
    assert.equal(api.seen.length, 1);
    api.answer({ status: 503, body: envelope("SERVICE_UNAVAILABLE") });
    const once = new BapClient({ baseUrl: api.url, platformKey: "k", retry: { attempts: 1, ...noWait(waits) } });
    await assert.rejects(once.status(), ServiceUnavailable);
    assert.equal(api.seen.length, 1);
    assert.deepEqual(waits, []);
    assert.throws(() => new BapClient({ retry: { attempts: 0 } }), RangeError);
  });

  test("error mapping: unknown code, non-envelope body, request id", async () => {
    api.answer({ status: 418, body: envelope("TEAPOT", "short and stout"), headers: { "x-request-id": "abc123" } });
    const bap = new BapClient({ baseUrl: api.url, platformKey: "k", retry: { attempts: 1 } });
    await assert.rejects(bap.status(), (err: unknown) => {
      assert.ok(err instanceof BapError);
      assert.equal(err.constructor, BapError);
      assert.equal(err.code, "TEAPOT");
      assert.equal(err.message, "short and stout");
      assert.equal(err.status, 418);
      assert.equal(err.requestId, "abc123");
      return true;
    });
    api.answer({ status: 502, body: "<html>bad gateway</html>", headers: { "content-type": "text/html" } });
    await assert.rejects(bap.status(), (err: unknown) => err instanceof BapError && err.code === "HTTP_502");
    api.answer({ status: 200, body: "not json" });
    await assert.rejects(bap.status(), (err: unknown) => err instanceof BapError && err.code === "BAD_RESPONSE");
  });

  test("connection refused: CONNECTION_ERROR, retried; a timeout is not", async () => {
    const waits: number[] = [];
    const port = await freePort();
    const bap = new BapClient({ baseUrl: `http://127.0.0.1:${port}`, platformKey: "k", retry: noWait(waits) });
    await assert.rejects(bap.status(), (err: unknown) => err instanceof ConnectionFailed && err.code === "CONNECTION_ERROR");
    assert.equal(waits.length, 3);

    api.answer({ status: 200, hang: true });
    const slow = new BapClient({ baseUrl: api.url, platformKey: "k", timeoutMs: 200, retry: noWait(waits) });
    await assert.rejects(slow.status(), (err: unknown) => err instanceof ConnectionFailed && err.code === "TIMEOUT");
    assert.equal(api.seen.length, 1);
  });

  test("callEngine: one re-admit on a stale key (either 401 form), then the answer as is", async () => {
    const seenAdmits = () => api.seen.filter((s) => s.url.endsWith("/admit")).length;
    api.answer({ status: 200, body: ENGINE(engine.url, "sk-new") });
    engine.answer({ status: 401, body: { error: "INVALID_KEY", message: "invalid" } }, { status: 200, body: { ok: 1 } });
    const bap = new BapClient({ baseUrl: api.url, platformKey: "k" });
    const res = await bap.callEngine("u1", "POST", "/execute", {
      json: { message: "hi" }, admission: ENGINE(engine.url, "sk-old"), query: { thread_id: "t1" },
      headers: { "x-trace": "1" },
    });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { ok: 1 });
    assert.equal(seenAdmits(), 1);
    assert.deepEqual(engine.seen.map((s) => s.headers["x-engine-key"]), ["sk-old", "sk-new"]);
    assert.ok(engine.seen.every((s) => s.url === "/execute?thread_id=t1" && s.body === '{"message":"hi"}'
      && s.headers["content-type"] === "application/json" && s.headers["x-trace"] === "1"));

    api.answer({ status: 200, body: ENGINE(engine.url, "sk-new") });
    engine.answer({ status: 401, body: envelope("KEY_ROTATION_PENDING") });
    const still = await bap.callEngine("u1", "GET", "history");
    assert.equal(still.status, 401, "after one re-admit the engine's answer is returned");
    assert.equal(seenAdmits(), 2, "admit, then exactly one re-admit");
    assert.equal(engine.seen.length, 2);

    api.answer({ status: 200, body: ENGINE(engine.url, "sk-new") });
    engine.answer({ status: 401, body: { error: "FORBIDDEN_THING" } });
    assert.equal((await bap.callEngine("u1", "GET", "/x")).status, 401);
    assert.equal(seenAdmits(), 1, "another 401 is not a stale key: no re-admit");
  });

  test("callEngine: not admitted throws NotAdmitted with the reason", async () => {
    api.answer({ status: 200, body: { admitted: false, engine: null, reason: "engine_sleeping" } });
    const bap = new BapClient({ baseUrl: api.url, platformKey: "k" });
    await assert.rejects(bap.callEngine("u1", "GET", "/history", { autoWake: false }), (err: unknown) => {
      assert.ok(err instanceof NotAdmitted);
      assert.equal(err.reason, "engine_sleeping");
      return true;
    });
    assert.deepEqual(JSON.parse(api.seen[0]!.body), { auto_provision: true, auto_wake: false });
    assert.throws(() => requireAdmitted({ admitted: false, engine: null, reason: "engine_stopped" }), NotAdmitted);
  });

  test("user ids are path-encoded; list queries are sent", async () => {
    api.answer({ status: 200, body: { engines: [], total: 0 } });
    const bap = new BapClient({ baseUrl: `${api.url}/`, platformKey: "k" });
    await bap.listEngines({ status: "running", limit: 5, offset: 10 });
    assert.equal(api.seen[0]!.url, "/engines?status=running&limit=5&offset=10");
    api.answer({ status: 200, body: { status: "stopped", engine_id: "e" } });
    await bap.stop("a/b c");
    assert.equal(api.seen[0]!.url, "/engines/a%2Fb%20c/stop");
  });

  test("parseRetryAfter: seconds and HTTP dates", () => {
    assert.equal(parseRetryAfter("7"), 7);
    assert.equal(parseRetryAfter(null), undefined);
    assert.equal(parseRetryAfter("soon"), undefined);
    const now = Date.parse("2026-01-01T00:00:00Z");
    assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:30 GMT", now), 30);
    assert.deepEqual([...DEFAULT_RETRY_CODES].sort(),
      ["CONNECTION_ERROR", "ENGINE_BUSY", "PORT_EXHAUSTION", "RATE_LIMITED", "SERVICE_UNAVAILABLE"]);
  });
});

test("VERSION is the package's version", () => {
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string };
  assert.equal(VERSION, pkg.version);
});

test("every error code named in the OpenAPI document has its error class", () => {
  // compiled to clients/typescript/dist/test/: openapi.json is two levels up
  const doc = JSON.parse(readFileSync(new URL("../../openapi.json", import.meta.url), "utf8")) as {
    paths: Record<string, Record<string, { responses?: Record<string, { description?: string }> }>>;
  };
  const codes = new Set<string>();
  for (const ops of Object.values(doc.paths)) {
    for (const op of Object.values(ops)) {
      for (const [status, r] of Object.entries(op.responses ?? {})) {
        const m = /error codes?: ([A-Z_, ]+)/.exec(r.description ?? "");
        for (const code of m?.[1]?.split(",").map((c) => c.trim()).filter(Boolean) ?? []) codes.add(`${code}@${status}`);
      }
    }
  }
  assert.ok(codes.size >= 15, `codes found in the document: ${[...codes].join(" ")}`);
  const classes = ERROR_CLASSES as Record<string, typeof BapError>;
  for (const entry of codes) {
    const [code] = entry.split("@") as [string];
    assert.ok(classes[code], `no error class for ${code}`);
    assert.equal(classes[code]!.code, code);
  }
});
