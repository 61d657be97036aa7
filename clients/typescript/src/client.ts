import {
  BapError,
  ConnectionFailed,
  MissingKey,
  NotAdmitted,
  errorFromResponse,
} from "./errors.js";
import { type ResolvedRetry, type RetryOptions, resolveRetry, retryDelay } from "./retry.js";
import type {
  AdminActionResult,
  AdmitBody,
  Admission,
  AdmittedEngine,
  AuditEvent,
  AuditPage,
  DestroyResult,
  Engine,
  EngineListItem,
  EnginePage,
  EngineStatus,
  FleetMetrics,
  FleetStatus,
  Policy,
  PolicyResult,
  Product,
  ProductEngine,
  ProductList,
  ProductMetrics,
  ProvisionBody,
  ProvisionedEngine,
  RegisterBody,
  RegisteredProduct,
  RotatedEngine,
  StartResult,
  StopResult,
} from "./types.js";

export const DEFAULT_URL = "http://127.0.0.1:8000";
export const VERSION = "0.1.0";
/** The engine's 401 codes meaning "not this key (any more, or not yet)": callEngine re-admits once. */
export const STALE_KEY_CODES: readonly string[] = Object.freeze(["INVALID_KEY", "KEY_ROTATION_PENDING"]);

export interface BapClientOptions {
  /** The bap-engine server (default http://127.0.0.1:8000). */
  baseUrl?: string;
  /** The product's key (`X-Platform-Key`), for every product call. */
  platformKey?: string;
  /** The admin key (`X-Admin-Key`), for registerProduct, setPolicy and the other admin calls. */
  adminKey?: string;
  /** Per control-plane request, body included (default 90 s: provision and admit wait for a boot). */
  timeoutMs?: number;
  /** callEngine: until the engine's response headers arrive (default 30 s); a stream body is not cut. */
  engineTimeoutMs?: number;
  /** Retries of transient answers (429 RATE_LIMITED, 409 ENGINE_BUSY, 503, connection refused). */
  retry?: RetryOptions;
  /** The fetch to use (default: the platform's `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Sent as User-Agent where the platform allows it. */
  userAgent?: string;
}

export interface AdmitOptions {
  /** Create the engine when the user has none (default true). */
  autoProvision?: boolean;
  /** Wake a sleeping engine (default true). */
  autoWake?: boolean;
}

export interface ListEnginesOptions {
  status?: EngineStatus;
  /** 1–1000 (server default 100). */
  limit?: number;
  offset?: number;
}

export interface IterEnginesOptions {
  status?: EngineStatus;
  /** Engines fetched per request (default 500). */
  pageSize?: number;
}

export interface AuditOptions {
  /** Only this product's events (default: every product). */
  productId?: string;
  limit?: number;
  /** The events after this id, oldest first (for tailing). */
  afterId?: number;
  action?: string;
}

export type EngineCallInit = Omit<RequestInit, "method"> & AdmitOptions & {
  /** Sent as the JSON body (content-type set when absent). */
  json?: unknown;
  /** Appended to the path as a query string. */
  query?: Record<string, string | number | boolean>;
  /** An admission already at hand (no admit before the first try). */
  admission?: Admission;
};

type Auth = "platform" | "admin" | "none";
type Query = Record<string, string | number | boolean | undefined>;

interface Call {
  method: string;
  path: string;
  auth?: Auth;
  body?: unknown;
  query?: Query;
  retry?: boolean;
}

const u = encodeURIComponent;

function withQuery(url: string, query: Query | undefined): string {
  if (!query) return url;
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined) params.set(key, String(value));
  }
  const qs = params.toString();
  return qs ? `${url}${url.includes("?") ? "&" : "?"}${qs}` : url;
}

/** `base` + `path` with exactly one slash between them. */
export function engineUrl(base: string, path: string): string {
  return `${base.replace(/\/+$/, "")}/${path.replace(/^\/+/, "")}`;
}

/** The admitted engine (URL and key) of an admission; throws NotAdmitted with the reason otherwise. */
export function requireAdmitted(admission: Admission): AdmittedEngine {
  const engine = admission.engine;
  if (!admission.admitted || !engine || !engine.url || !engine.api_key) {
    throw new NotAdmitted(admission.reason ?? "unknown");
  }
  return engine as AdmittedEngine;
}

/** True for the engine's 401 answering a key it no longer (or not yet) accepts. */
export async function isStaleKeyResponse(response: Response): Promise<boolean> {
  if (response.status !== 401) return false;
  try {
    const doc: unknown = await response.clone().json();
    let code = typeof doc === "object" && doc !== null ? (doc as { error?: unknown }).error : undefined;
    if (typeof code === "object" && code !== null) code = (code as { code?: unknown }).code;
    return typeof code === "string" && STALE_KEY_CODES.includes(code);
  } catch {
    return false;
  }
}

function isReplayable(body: RequestInit["body"]): boolean {
  return !(typeof ReadableStream !== "undefined" && body instanceof ReadableStream);
}

/** Maps what fetch threw to the client's error (refused before sending: CONNECTION_ERROR, retried). */
function transportError(err: unknown, what: string, timedOut: boolean): BapError {
  if (timedOut) return new ConnectionFailed(`${what}: no answer in time`, { code: "TIMEOUT", cause: err });
  const cause = (err as { cause?: { code?: unknown } } | undefined)?.cause;
  const code = typeof cause?.code === "string" ? cause.code : "";
  if (code === "ECONNREFUSED" || code === "UND_ERR_CONNECT_TIMEOUT" || code === "ENOTFOUND" || code === "EAI_AGAIN") {
    return new ConnectionFailed(`cannot reach ${what}: ${code}`, { cause: err });
  }
  return new ConnectionFailed(`${what}: ${code || (err instanceof Error ? err.message : String(err))}`, {
    code: "TRANSPORT_ERROR",
    cause: err,
  });
}

/** An AbortSignal firing after `ms` or when `outer` fires, whichever comes first (Node 18 has no AbortSignal.any). */
function deadline(ms: number, outer?: AbortSignal | null): { signal: AbortSignal; timedOut: () => boolean; clear: () => void } {
  const controller = new AbortController();
  let fired = false;
  const timer = setTimeout(() => {
    fired = true;
    controller.abort(new Error("timeout"));
  }, ms);
  const onAbort = () => controller.abort(outer?.reason);
  if (outer) {
    if (outer.aborted) controller.abort(outer.reason);
    else outer.addEventListener("abort", onAbort, { once: true });
  }
  return {
    signal: controller.signal,
    timedOut: () => fired,
    clear: () => {
      clearTimeout(timer);
      outer?.removeEventListener("abort", onAbort);
    },
  };
}

/**
 * Talks to one bap-engine server: `platformKey` for a product's calls, `adminKey` for admin ones.
 *
 * Every method throws a {@link BapError} subclass named after the API's error code; transient answers
 * (429 RATE_LIMITED, 409 ENGINE_BUSY, 503, connection refused) are retried per `retry`, honouring
 * `Retry-After`. Results are the server's JSON, typed from its OpenAPI document.
 */
export class BapClient {
  readonly baseUrl: string;
  readonly #platformKey: string | undefined;
  readonly #adminKey: string | undefined;
  readonly #timeoutMs: number;
  readonly #engineTimeoutMs: number;
  readonly #retry: ResolvedRetry;
  readonly #fetch: typeof fetch;
  readonly #userAgent: string;

  constructor(options: BapClientOptions = {}) {
    this.baseUrl = (options.baseUrl ?? DEFAULT_URL).replace(/\/+$/, "");
    this.#platformKey = options.platformKey;
    this.#adminKey = options.adminKey;
    this.#timeoutMs = options.timeoutMs ?? 90_000;
    this.#engineTimeoutMs = options.engineTimeoutMs ?? 30_000;
    this.#retry = resolveRetry(options.retry);
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("no fetch: use Node ≥ 18 or pass options.fetch");
    this.#fetch = f;
    this.#userAgent = options.userAgent ?? `bap-engine-client-ts/${VERSION}`;
  }

  #authHeaders(auth: Auth): Record<string, string> {
    if (auth === "platform") {
      if (!this.#platformKey) throw new MissingKey("this call needs a platform key (platformKey)");
      return { "X-Platform-Key": this.#platformKey };
    }
    if (auth === "admin") {
      if (!this.#adminKey) throw new MissingKey("this call needs the admin key (adminKey)");
      return { "X-Admin-Key": this.#adminKey };
    }
    return {};
  }

  async #once<T>(call: Call, auth: Record<string, string>): Promise<T> {
    const headers: Record<string, string> = { ...auth, accept: "application/json", "user-agent": this.#userAgent };
    let body: string | undefined;
    if (call.body !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(call.body);
    }
    const what = `${call.method} ${call.path}`;
    const d = deadline(this.#timeoutMs);
    try {
      let response: Response;
      try {
        response = await this.#fetch(withQuery(this.baseUrl + call.path, call.query), {
          method: call.method, headers, body, signal: d.signal,
        });
      } catch (err) {
        throw transportError(err, d.timedOut() ? what : `${this.baseUrl} (${what})`, d.timedOut());
      }
      if (!response.ok) throw await errorFromResponse(response);
      let text: string;
      try {
        text = await response.text();
      } catch (err) {
        throw transportError(err, what, d.timedOut());
      }
      try {
        return (text ? JSON.parse(text) : {}) as T;
      } catch {
        throw new BapError(`${what}: the answer is not JSON`, { code: "BAD_RESPONSE", status: response.status });
      }
    } finally {
      d.clear();
    }
  }

  async #run<T>(call: Call): Promise<T> {
    const auth = this.#authHeaders(call.auth ?? "platform");
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#once<T>(call, auth);
      } catch (err) {
        if (!(err instanceof BapError)) throw err;
        const delayMs = call.retry === false ? undefined : retryDelay(this.#retry, err, attempt);
        if (delayMs === undefined) throw err;
        this.#retry.onRetry?.({ error: err, attempt, delayMs });
        await this.#retry.sleep(delayMs);
      }
    }
  }

  // --- product calls (X-Platform-Key) ----------------------------------------------------------------

  /** True when the server is up, its database answers and migrations are applied. */
  async health(): Promise<boolean> {
    try {
      await this.#run({ method: "GET", path: "/health", auth: "none", retry: false });
      return true;
    } catch (err) {
      if (err instanceof BapError) return false;
      throw err;
    }
  }

  /** Admit the user's next request: the engine's `url` and `api_key`, or `reason` when not admitted.
   * `autoProvision` and `autoWake` default to true. */
  admit(userId: string, options: AdmitOptions = {}): Promise<Admission> {
    const body: AdmitBody = { auto_provision: options.autoProvision ?? true, auto_wake: options.autoWake ?? true };
    return this.#run({ method: "POST", path: `/engines/${u(userId)}/admit`, body });
  }

  /** Create the user's engine and wait until healthy (EngineAlreadyExists, QuotaExceeded, BootTimeout). */
  provision(userId: string, options: { engineVersion?: string } = {}): Promise<ProvisionedEngine> {
    const body: ProvisionBody = { user_id: userId };
    if (options.engineVersion) body.engine_version = options.engineVersion;
    return this.#run({ method: "POST", path: "/engines/provision", body });
  }

  /** The user's engine with its key; never provisions (EngineNotFound). */
  getEngine(userId: string): Promise<Engine> {
    return this.#run({ method: "GET", path: `/engines/${u(userId)}` });
  }

  /** From stopped, sleeping or failed; waits until healthy (EngineAlreadyRunning, BootTimeout). */
  start(userId: string): Promise<StartResult> {
    return this.#run({ method: "POST", path: `/engines/${u(userId)}/start` });
  }

  /** Data kept (EngineNotRunning). */
  stop(userId: string): Promise<StopResult> {
    return this.#run({ method: "POST", path: `/engines/${u(userId)}/stop` });
  }

  /** The engine, its data, its port and its row are gone. */
  destroy(userId: string): Promise<DestroyResult> {
    return this.#run({ method: "DELETE", path: `/engines/${u(userId)}` });
  }

  /** A new engine key (the old one keeps working for the server's overlap window). */
  rotateKey(userId: string): Promise<RotatedEngine> {
    return this.#run({ method: "POST", path: `/engines/${u(userId)}/rotate-key` });
  }

  /** One page of the product's engines, oldest first, without keys. */
  listEngines(options: ListEnginesOptions = {}): Promise<EnginePage> {
    return this.#run({
      method: "GET", path: "/engines",
      query: { status: options.status, limit: options.limit, offset: options.offset },
    });
  }

  /** Every engine of the product, page by page. */
  async *iterEngines(options: IterEnginesOptions = {}): AsyncGenerator<EngineListItem, void, undefined> {
    const limit = options.pageSize ?? 500;
    let offset = 0;
    for (;;) {
      const page = await this.listEngines({ status: options.status, limit, offset });
      yield* page.engines;
      offset += page.engines.length;
      if (page.engines.length === 0 || offset >= page.total) return;
    }
  }

  /** The product's fleet by state and its health (`ok`, `degraded`, `critical`). */
  status(): Promise<FleetStatus> {
    return this.#run({ method: "GET", path: "/status" });
  }

  /** Rolling-hour figures of the product. */
  metrics(): Promise<FleetMetrics> {
    return this.#run({ method: "GET", path: "/metrics" });
  }

  /**
   * Admit (unless `init.admission` is given), call the engine at `path` with its key, and when the engine
   * answers 401 INVALID_KEY / KEY_ROTATION_PENDING (its key was rotated) re-admit once and call again.
   * Returns the engine's Response as is (SSE included: read `response.body`). Throws NotAdmitted and the
   * admit errors. A ReadableStream body is sent once: its 401 is returned, not retried.
   */
  async callEngine(userId: string, method: string, path: string, init: EngineCallInit = {}): Promise<Response> {
    const { json, query, admission, autoProvision, autoWake, headers, body, signal, ...rest } = init;
    const admit: AdmitOptions = { autoProvision, autoWake };
    let adm = admission ?? (await this.admit(userId, admit));
    const payload = json !== undefined ? JSON.stringify(json) : body;
    for (let last = !isReplayable(payload); ; last = true) {
      const engine = requireAdmitted(adm);
      const h = new Headers(headers);
      if (json !== undefined && !h.has("content-type")) h.set("content-type", "application/json");
      h.set("X-Engine-Key", engine.api_key);
      const url = withQuery(engineUrl(engine.url, path), query);
      const d = deadline(this.#engineTimeoutMs, signal);
      let response: Response;
      try {
        response = await this.#fetch(url, { ...rest, method, headers: h, body: payload, signal: d.signal });
      } catch (err) {
        if (signal?.aborted) throw err; // the caller's own abort
        throw transportError(err, `${method} ${engine.url}${path}`, d.timedOut());
      } finally {
        d.clear(); // headers are in: the body (an SSE stream, say) is the caller's to read or cancel
      }
      if (last || !(await isStaleKeyResponse(response))) return response;
      await response.body?.cancel().catch(() => undefined);
      adm = await this.admit(userId, admit);
    }
  }

  // --- admin calls (X-Admin-Key) ---------------------------------------------------------------------

  /** Register a product; its platform key is in the answer, shown once (ProductSlugExists). */
  registerProduct(slug: string, displayName: string, policy?: Policy): Promise<RegisteredProduct> {
    const body: RegisterBody = { slug, display_name: displayName };
    if (policy !== undefined) body.policy = policy;
    return this.#run({ method: "POST", path: "/products/register", auth: "admin", body });
  }

  /** Replace the product's whole policy; returns it (ProductNotFound, ValidationError). */
  async setPolicy(productId: string, policy: Policy): Promise<PolicyResult["policy"]> {
    const res = await this.#run<PolicyResult>({
      method: "PUT", path: `/products/${u(productId)}/policy`, auth: "admin", body: { policy },
    });
    return res.policy;
  }

  /** Every product, with its engines counted by state. */
  async products(): Promise<Product[]> {
    return (await this.#run<ProductList>({ method: "GET", path: "/products", auth: "admin" })).products;
  }

  productEngines(productId: string, options: ListEnginesOptions = {}): Promise<EnginePage> {
    return this.#run({
      method: "GET", path: `/products/${u(productId)}/engines`, auth: "admin",
      query: { status: options.status, limit: options.limit, offset: options.offset },
    });
  }

  /** One engine of a product, without its key. */
  productEngine(productId: string, userId: string): Promise<ProductEngine> {
    return this.#run({ method: "GET", path: `/products/${u(productId)}/engines/${u(userId)}`, auth: "admin" });
  }

  productMetrics(productId: string): Promise<ProductMetrics> {
    return this.#run({ method: "GET", path: `/products/${u(productId)}/metrics`, auth: "admin" });
  }

  /** Newest first; with `afterId`, the events after it oldest first (for tailing). */
  async audit(options: AuditOptions = {}): Promise<AuditEvent[]> {
    const path = options.productId ? `/products/${u(options.productId)}/audit` : "/audit";
    const query = { limit: options.limit ?? 50, after_id: options.afterId || undefined, action: options.action };
    return (await this.#run<AuditPage>({ method: "GET", path, auth: "admin", query })).events;
  }

  adminStart(productId: string, userId: string): Promise<AdminActionResult> {
    return this.#run({ method: "POST", path: `/products/${u(productId)}/engines/${u(userId)}/start`, auth: "admin" });
  }

  adminStop(productId: string, userId: string): Promise<AdminActionResult> {
    return this.#run({ method: "POST", path: `/products/${u(productId)}/engines/${u(userId)}/stop`, auth: "admin" });
  }

  adminDestroy(productId: string, userId: string): Promise<AdminActionResult> {
    return this.#run({ method: "DELETE", path: `/products/${u(productId)}/engines/${u(userId)}`, auth: "admin" });
  }

  /** Rotate as the admin: the new key is not returned (the product gets it from admit or getEngine). */
  adminRotateKey(productId: string, userId: string): Promise<AdminActionResult> {
    return this.#run({
      method: "POST", path: `/products/${u(productId)}/engines/${u(userId)}/rotate-key`, auth: "admin",
    });
  }
}
