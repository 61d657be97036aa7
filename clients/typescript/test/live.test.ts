/**
 * The client against a live `bap-engine serve` (embedded Postgres in a tmp dir, subprocess backend,
 * real reference engines): admit with auto_provision, callEngine, the lifecycle, the fleet, typed
 * errors, the RATE_LIMITED retry, and the re-admit after a key rotation (overlap 0 on this server, so
 * the old key is refused at once).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { inspect } from "node:util";

import {
  type Admission,
  BapClient,
  BapError,
  EngineAlreadyExists,
  EngineNotFound,
  EngineNotRunning,
  InvalidPlatformKey,
  MissingKey,
  NotAdmitted,
  ProductNotFound,
  ProductSlugExists,
  RateLimited,
  ValidationError,
} from "@bap-engine/client";

import { type LiveServer, startServer } from "./server.js";

const rid = () => randomBytes(4).toString("hex");

/** A fetch that records the URL of every request it forwards. */
function recordingFetch(seen: string[]): typeof fetch {
  return (input, init) => {
    seen.push(`${init?.method ?? "GET"} ${typeof input === "string" ? input : input instanceof URL ? input.href : input.url}`);
    return fetch(input, init);
  };
}

describe("BapClient against a live bap-engine serve", { timeout: 80_000 }, () => {
  let server: LiveServer;
  let admin: BapClient;
  let bap: BapClient;
  let productId: string;
  let platformKey: string;
  const slug = `ts-${rid()}`;
  const alice = `alice-${rid()}`;
  const bob = `bob.${rid()}@example`;

  before(async () => {
    server = await startServer({ ORCH_KEY_ROTATION_OVERLAP_S: "0" });
    admin = new BapClient({ baseUrl: server.url, adminKey: server.adminKey });
    const product = await admin.registerProduct(slug, "TypeScript client test");
    assert.equal(product.slug, slug);
    assert.match(product.platform_api_key, /^pk-sept-/);
    productId = product.product_id;
    platformKey = product.platform_api_key;
    bap = new BapClient({ baseUrl: server.url, platformKey });
  }, { timeout: 70_000 });

  after(async () => {
    await server?.stop();
  });

  test("health", async () => {
    assert.equal(await bap.health(), true);
    assert.equal(await new BapClient({ baseUrl: "http://127.0.0.1:1" }).health(), false);
  });

  test("admit with auto_provision boots a reference engine", async () => {
    const adm = await bap.admit(alice);
    assert.equal(adm.admitted, true);
    assert.ok(adm.engine);
    assert.equal(adm.engine.user_id, alice);
    assert.equal(adm.engine.status, "running");
    assert.match(adm.engine.url ?? "", /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.match(adm.engine.api_key ?? "", /^sk-sept-/);
    const got = await bap.getEngine(alice);
    assert.equal(got.engine_id, adm.engine.engine_id);
    assert.equal(got.api_key, adm.engine.api_key);
    assert.ok(!inspect(bap).includes(platformKey), "the platform key never shows in inspect()");
    assert.ok(!JSON.stringify(bap).includes(platformKey));
  });

  test("callEngine reaches the engine's /health, /execute (SSE) and /history", async () => {
    const health = await bap.callEngine(alice, "GET", "/health");
    assert.equal(health.status, 200);
    assert.equal(((await health.json()) as { status: string }).status, "ok");

    const run = await bap.callEngine(alice, "POST", "/execute", { json: { message: "hello there" } });
    assert.equal(run.status, 200);
    assert.match(run.headers.get("content-type") ?? "", /text\/event-stream/);
    const sse = await run.text();
    assert.match(sse, /event: thread_lifecycle/);
    assert.match(sse, /event: text_delta/);
    assert.match(sse, /event: done/);

    const history = await bap.callEngine(alice, "GET", "/history");
    assert.equal(history.status, 200);
    assert.match(await history.text(), /hello there/);
  });

  test("provision, listEngines paging, iterEngines, status, metrics", async () => {
    const engine = await bap.provision(bob);
    assert.equal(engine.user_id, bob);
    assert.equal(engine.status, "running");
    assert.match(engine.api_key, /^sk-sept-/);
    await assert.rejects(bap.provision(bob), EngineAlreadyExists);

    const page = await bap.listEngines({ limit: 1 });
    assert.equal(page.total, 2);
    assert.equal(page.engines.length, 1);
    assert.equal(page.engines[0]?.user_id, alice, "oldest first");
    assert.ok(!("api_key" in (page.engines[0] ?? {})), "the listing never carries keys");
    const second = await bap.listEngines({ limit: 1, offset: 1 });
    assert.equal(second.engines[0]?.user_id, bob);
    assert.equal((await bap.listEngines({ status: "stopped" })).total, 0);

    const all: string[] = [];
    for await (const e of bap.iterEngines({ pageSize: 1 })) all.push(e.user_id);
    assert.deepEqual(all, [alice, bob]);

    const status = await bap.status();
    assert.equal(status.total, 2);
    assert.equal(status.by_status.running, 2);
    assert.equal(status.health, "ok");
    const metrics = await bap.metrics();
    assert.ok(metrics.provisions_1h >= 2 && metrics.total_provisions >= 2);
  });

  test("stop keeps the data, admit answers engine_stopped, start brings it back", async () => {
    assert.equal((await bap.stop(alice)).status, "stopped");
    await assert.rejects(bap.stop(alice), EngineNotRunning);
    const adm = await bap.admit(alice);
    assert.equal(adm.admitted, false);
    assert.equal(adm.reason, "engine_stopped");
    await assert.rejects(bap.callEngine(alice, "GET", "/history"), (err: unknown) => {
      assert.ok(err instanceof NotAdmitted);
      assert.equal(err.reason, "engine_stopped");
      return true;
    });
    const started = await bap.start(alice);
    assert.equal(started.status, "running");
    const history = await bap.callEngine(alice, "GET", "/history");
    assert.match(await history.text(), /hello there/, "data survives stop/start");
  });

  test("rotateKey: the old key is refused, callEngine re-admits once and goes on", async () => {
    const before: Admission = await bap.admit(alice);
    const oldKey = before.engine?.api_key ?? "";
    const rotated = await bap.rotateKey(alice);
    assert.notEqual(rotated.api_key, oldKey);
    assert.equal((await bap.getEngine(alice)).api_key, rotated.api_key);

    const raw = await fetch(`${rotated.url}/history`, { headers: { "X-Engine-Key": oldKey } });
    assert.equal(raw.status, 401, "overlap 0: the old key is refused at once");
    await raw.body?.cancel();

    const seen: string[] = [];
    const traced = new BapClient({ baseUrl: server.url, platformKey, fetch: recordingFetch(seen) });
    const res = await traced.callEngine(alice, "GET", "/history", { admission: before });
    assert.equal(res.status, 200);
    assert.match(await res.text(), /hello there/);
    assert.deepEqual(seen.map((s) => s.replace(/^(\S+) https?:\/\/[^/]+/, "$1 ")), [
      "GET /history", `POST /engines/${encodeURIComponent(alice)}/admit`, "GET /history",
    ]);
  });

  test("typed errors", async () => {
    await assert.rejects(bap.getEngine(`nobody-${rid()}`), (err: unknown) => {
      assert.ok(err instanceof EngineNotFound);
      assert.ok(err instanceof BapError);
      assert.equal(err.code, "ENGINE_NOT_FOUND");
      assert.equal(err.status, 404);
      assert.equal(err.message, "engine not found");
      assert.equal(err.name, "EngineNotFound");
      assert.match(err.requestId ?? "", /^[0-9a-f]+$/);
      return true;
    });
    for (const bad of ["bad id!", "-leading-dash", "x".repeat(129)]) {
      await assert.rejects(bap.getEngine(bad), (err: unknown) => {
        assert.ok(err instanceof ValidationError, bad);
        assert.equal(err.code, "VALIDATION_ERROR");
        assert.equal(err.status, 400);
        return true;
      });
    }
    await assert.rejects(bap.admit("bad user"), ValidationError);
    await assert.rejects(admin.setPolicy(productId, { no_such_key: 1 } as never), ValidationError);
    await assert.rejects(admin.setPolicy("00000000-0000-4000-8000-000000000000", {}), ProductNotFound);
    await assert.rejects(admin.registerProduct(slug, "again"), ProductSlugExists);
    await assert.rejects(new BapClient({ baseUrl: server.url, platformKey: "pk-sept-nope" }).status(),
      (err: unknown) => err instanceof InvalidPlatformKey && err.status === 401);
    await assert.rejects(bap.registerProduct(`x-${rid()}`, "x"), MissingKey);
    await assert.rejects(admin.status(), MissingKey);
  });

  test("RATE_LIMITED: Retry-After honoured, attempts bounded, success once the limit allows", async () => {
    const limited = await admin.registerProduct(`ts-rl-${rid()}`, "rate limited", { rate_limit_rpm: 1 });
    const user = `rl-${rid()}`;
    const opts = { baseUrl: server.url, platformKey: limited.platform_api_key };
    const first = await new BapClient(opts).admit(user, { autoProvision: false });
    assert.equal(first.reason, "engine_not_found"); // spends the minute's only token

    // default policy: a Retry-After beyond maxRetryAfterMs (30 s) is not waited for
    const seen: string[] = [];
    const t0 = Date.now();
    let retryAfter = 0;
    await assert.rejects(new BapClient({ ...opts, fetch: recordingFetch(seen) }).admit(user), (err: unknown) => {
      assert.ok(err instanceof RateLimited);
      assert.equal(err.status, 429);
      assert.ok(err.retryAfter !== undefined && err.retryAfter >= 1 && err.retryAfter <= 60, String(err.retryAfter));
      retryAfter = err.retryAfter;
      return true;
    });
    assert.equal(seen.length, 1);
    assert.ok(Date.now() - t0 < 5000);

    // bounded: 3 attempts, 2 waits of exactly Retry-After (the waits are recorded, not slept)
    const waits: number[] = [];
    seen.length = 0;
    const bounded = new BapClient({
      ...opts, fetch: recordingFetch(seen),
      retry: { attempts: 3, maxRetryAfterMs: 120_000, sleep: async (ms) => void waits.push(ms) },
    });
    await assert.rejects(bounded.admit(user), RateLimited);
    assert.equal(seen.length, 3);
    assert.equal(waits.length, 2);
    for (const ms of waits) assert.ok(Math.abs(ms - retryAfter * 1000) <= 1000, `${ms} vs ${retryAfter} s`);

    // retried until admitted: the limit is raised while the client waits
    waits.length = 0;
    seen.length = 0;
    const infos: string[] = [];
    const patient = new BapClient({
      ...opts, fetch: recordingFetch(seen),
      retry: {
        attempts: 4, maxRetryAfterMs: 120_000,
        onRetry: ({ error, attempt }) => void infos.push(`${attempt}:${error.code}`),
        sleep: async (ms) => {
          waits.push(ms);
          await admin.setPolicy(limited.product_id, { rate_limit_rpm: 1000 });
        },
      },
    });
    const adm = await patient.admit(user, { autoProvision: false });
    assert.equal(adm.admitted, false);
    assert.equal(adm.reason, "engine_not_found");
    assert.equal(seen.length, 2);
    assert.deepEqual(infos, ["0:RATE_LIMITED"]);
    assert.equal(waits.length, 1);
  });

  test("destroy removes the engines", async () => {
    const url = (await bap.getEngine(alice)).url ?? "";
    assert.equal((await bap.destroy(alice)).status, "destroyed");
    assert.equal((await bap.destroy(bob)).status, "destroyed");
    await assert.rejects(bap.getEngine(alice), EngineNotFound);
    await assert.rejects(bap.destroy(alice), EngineNotFound);
    await assert.rejects(fetch(`${url}/health`, { signal: AbortSignal.timeout(2000) }), "the engine process is gone");
    assert.equal((await bap.listEngines()).total, 0);
    assert.equal((await bap.status()).total, 0);
    const products = await admin.products();
    assert.ok(products.some((p) => p.product_id === productId));
    const events = await admin.audit({ productId, limit: 100 });
    const actions = new Set(events.map((e) => e.action));
    for (const a of ["provision", "stop", "start", "rotate_key", "destroy"]) assert.ok(actions.has(a), a);
  });
});
