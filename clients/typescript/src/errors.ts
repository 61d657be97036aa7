/**
 * Errors: one class per stable error code of the bap-engine API, plus the client's own.
 *
 *     BapError                      any non-2xx answer, or no answer at all
 *     ├── ValidationError           VALIDATION_ERROR        400
 *     ├── RouteNotFound             NOT_FOUND               404 (usually a wrong base URL)
 *     ├── MethodNotAllowed          METHOD_NOT_ALLOWED      405
 *     ├── PayloadTooLarge           PAYLOAD_TOO_LARGE       413
 *     ├── InvalidPlatformKey        INVALID_PLATFORM_KEY    401
 *     ├── InvalidAdminKey           INVALID_ADMIN_KEY       401
 *     ├── PolicyDenied              POLICY_DENIED           403
 *     ├── ProductNotFound           PRODUCT_NOT_FOUND       404
 *     ├── EngineNotFound            ENGINE_NOT_FOUND        404
 *     ├── WebhookNotFound           WEBHOOK_NOT_FOUND       404
 *     ├── ProductSlugExists         PRODUCT_SLUG_EXISTS     409
 *     ├── EngineAlreadyExists       ENGINE_ALREADY_EXISTS   409
 *     ├── EngineNotRunning          ENGINE_NOT_RUNNING      409
 *     ├── EngineAlreadyRunning      ENGINE_ALREADY_RUNNING  409
 *     ├── EngineBusy                ENGINE_BUSY             409 (retried)
 *     ├── QuotaExceeded             QUOTA_EXCEEDED          429
 *     ├── RateLimited               RATE_LIMITED            429 (retried; `retryAfter`)
 *     ├── InternalError             INTERNAL_ERROR          500
 *     ├── BackendError              BACKEND_ERROR           502
 *     ├── PortExhaustion            PORT_EXHAUSTION         503 (retried)
 *     ├── ServiceUnavailable        SERVICE_UNAVAILABLE     503 (retried)
 *     ├── BootTimeout               BOOT_TIMEOUT            504
 *     ├── NotAdmitted               admit answered `admitted: false` (`reason`)
 *     ├── MissingKey                the client has no key for this call
 *     └── ConnectionFailed          CONNECTION_ERROR (nothing sent; retried) / TRANSPORT_ERROR / TIMEOUT
 *
 * Messages come from the server (which never puts a key in them) or from the client itself.
 */

/** The stable codes of the API's error envelope `{"error": {"code", "message"}}`. */
export type ApiErrorCode =
  | "VALIDATION_ERROR"
  | "NOT_FOUND"
  | "METHOD_NOT_ALLOWED"
  | "PAYLOAD_TOO_LARGE"
  | "INVALID_PLATFORM_KEY"
  | "INVALID_ADMIN_KEY"
  | "POLICY_DENIED"
  | "PRODUCT_NOT_FOUND"
  | "ENGINE_NOT_FOUND"
  | "WEBHOOK_NOT_FOUND"
  | "PRODUCT_SLUG_EXISTS"
  | "ENGINE_ALREADY_EXISTS"
  | "ENGINE_NOT_RUNNING"
  | "ENGINE_ALREADY_RUNNING"
  | "ENGINE_BUSY"
  | "QUOTA_EXCEEDED"
  | "RATE_LIMITED"
  | "INTERNAL_ERROR"
  | "BACKEND_ERROR"
  | "PORT_EXHAUSTION"
  | "SERVICE_UNAVAILABLE"
  | "BOOT_TIMEOUT";

/** Codes the client produces itself. */
export type ClientErrorCode =
  | "CLIENT_ERROR"
  | "BAD_RESPONSE"
  | "NOT_ADMITTED"
  | "MISSING_KEY"
  | "CONNECTION_ERROR"
  | "TRANSPORT_ERROR"
  | "TIMEOUT";

export interface BapErrorInit {
  /** The API's code; defaults to the class's own. An unknown server code is kept as is. */
  code?: string;
  /** HTTP status (0: no answer). */
  status?: number;
  /** Seconds from the `Retry-After` header, when the server sent one. */
  retryAfter?: number;
  /** The server's `X-Request-ID`, to find the request in its logs. */
  requestId?: string;
  cause?: unknown;
}

/** Base of every error the client throws: `code` is the API's stable code, `status` the HTTP status. */
export class BapError extends Error {
  static readonly code: string = "CLIENT_ERROR";
  readonly code: string;
  readonly status: number;
  readonly retryAfter: number | undefined;
  readonly requestId: string | undefined;

  constructor(message: string, init: BapErrorInit = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code ?? (new.target as typeof BapError).code;
    this.status = init.status ?? 0;
    this.retryAfter = init.retryAfter;
    this.requestId = init.requestId;
  }
}

export class ValidationError extends BapError {
  static override readonly code = "VALIDATION_ERROR";
}
export class RouteNotFound extends BapError {
  static override readonly code = "NOT_FOUND";
}
export class MethodNotAllowed extends BapError {
  static override readonly code = "METHOD_NOT_ALLOWED";
}
export class PayloadTooLarge extends BapError {
  static override readonly code = "PAYLOAD_TOO_LARGE";
}
export class InvalidPlatformKey extends BapError {
  static override readonly code = "INVALID_PLATFORM_KEY";
}
export class InvalidAdminKey extends BapError {
  static override readonly code = "INVALID_ADMIN_KEY";
}
export class PolicyDenied extends BapError {
  static override readonly code = "POLICY_DENIED";
}
export class ProductNotFound extends BapError {
  static override readonly code = "PRODUCT_NOT_FOUND";
}
export class EngineNotFound extends BapError {
  static override readonly code = "ENGINE_NOT_FOUND";
}
export class WebhookNotFound extends BapError {
  static override readonly code = "WEBHOOK_NOT_FOUND";
}
export class ProductSlugExists extends BapError {
  static override readonly code = "PRODUCT_SLUG_EXISTS";
}
export class EngineAlreadyExists extends BapError {
  static override readonly code = "ENGINE_ALREADY_EXISTS";
}
export class EngineNotRunning extends BapError {
  static override readonly code = "ENGINE_NOT_RUNNING";
}
export class EngineAlreadyRunning extends BapError {
  static override readonly code = "ENGINE_ALREADY_RUNNING";
}
/** Another transition is in progress on the engine; retried with backoff. */
export class EngineBusy extends BapError {
  static override readonly code = "ENGINE_BUSY";
}
/** The product reached its `max_engines`; not retried. */
export class QuotaExceeded extends BapError {
  static override readonly code = "QUOTA_EXCEEDED";
}
/** The product's admit rate limit is spent; retried after `retryAfter` seconds. */
export class RateLimited extends BapError {
  static override readonly code = "RATE_LIMITED";
}
export class InternalError extends BapError {
  static override readonly code = "INTERNAL_ERROR";
}
/** Docker, Kubernetes, the process backend or the engine failed. */
export class BackendError extends BapError {
  static override readonly code = "BACKEND_ERROR";
}
/** No free engine port; retried. */
export class PortExhaustion extends BapError {
  static override readonly code = "PORT_EXHAUSTION";
}
/** The server is starting or its database is down; retried. */
export class ServiceUnavailable extends BapError {
  static override readonly code = "SERVICE_UNAVAILABLE";
}
export class BootTimeout extends BapError {
  static override readonly code = "BOOT_TIMEOUT";
}

/** admit answered `admitted: false`; `reason` is the contract's reason (`engine_sleeping`, `engine_stopped`, ...). */
export class NotAdmitted extends BapError {
  static override readonly code = "NOT_ADMITTED";
  readonly reason: string;

  constructor(reason: string) {
    super(`engine not admitted: ${reason}`, { status: 200 });
    this.reason = reason;
  }
}

/** The call needs a platform or admin key the client was not given. */
export class MissingKey extends BapError {
  static override readonly code = "MISSING_KEY";
}

/** The server could not be reached (`CONNECTION_ERROR`, retried: nothing was sent), the exchange broke
 * after sending (`TRANSPORT_ERROR`, not retried), or no answer came in time (`TIMEOUT`). */
export class ConnectionFailed extends BapError {
  static override readonly code = "CONNECTION_ERROR";
}

const API_ERRORS = [
  ValidationError, RouteNotFound, MethodNotAllowed, PayloadTooLarge, InvalidPlatformKey, InvalidAdminKey,
  PolicyDenied, ProductNotFound, EngineNotFound, WebhookNotFound, ProductSlugExists, EngineAlreadyExists, EngineNotRunning,
  EngineAlreadyRunning, EngineBusy, QuotaExceeded, RateLimited, InternalError, BackendError, PortExhaustion,
  ServiceUnavailable, BootTimeout,
] as const;

/** The error class of each API code. */
export const ERROR_CLASSES: Readonly<Record<ApiErrorCode, typeof BapError>> = Object.freeze(
  Object.fromEntries(API_ERRORS.map((cls) => [cls.code, cls])) as Record<ApiErrorCode, typeof BapError>,
);

/** Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or undefined. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const raw = value.trim();
  if (/^\d+(\.\d+)?$/.test(raw)) return Number(raw);
  const at = Date.parse(raw);
  return Number.isNaN(at) ? undefined : Math.max(0, (at - now) / 1000);
}

/** The typed error for a non-2xx answer: the class of its envelope's code, the base class otherwise. */
export async function errorFromResponse(response: Response): Promise<BapError> {
  let code = `HTTP_${response.status}`;
  let message = response.statusText || "error";
  let text = "";
  try {
    text = await response.text();
  } catch {
    // body unreadable: keep the status line
  }
  try {
    const doc: unknown = text ? JSON.parse(text) : undefined;
    const error = typeof doc === "object" && doc !== null ? (doc as { error?: unknown }).error : undefined;
    if (typeof error === "object" && error !== null) {
      const e = error as { code?: unknown; message?: unknown };
      if (typeof e.code === "string") code = e.code;
      if (typeof e.message === "string") message = e.message;
    }
  } catch {
    // not JSON: keep the status line
  }
  const cls = (ERROR_CLASSES as Record<string, typeof BapError>)[code] ?? BapError;
  return new cls(message, {
    code,
    status: response.status,
    retryAfter: parseRetryAfter(response.headers.get("retry-after")),
    requestId: response.headers.get("x-request-id") ?? undefined,
  });
}
