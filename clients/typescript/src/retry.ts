import type { BapError } from "./errors.js";

/** Codes retried by default: transient answers, and a connection refused before anything was sent. */
export const DEFAULT_RETRY_CODES: readonly string[] = Object.freeze([
  "RATE_LIMITED", "ENGINE_BUSY", "SERVICE_UNAVAILABLE", "PORT_EXHAUSTION", "CONNECTION_ERROR",
]);

export interface RetryInfo {
  /** The error that will be retried. */
  error: BapError;
  /** 0 for the first retry. */
  attempt: number;
  /** How long the client is about to wait. */
  delayMs: number;
}

/**
 * Bounded retries with exponential backoff (+≤10 % jitter) for transient answers: the codes in
 * `retryCodes` and any 503. A `Retry-After` header is honoured; one longer than `maxRetryAfterMs`
 * is not waited for (the error is thrown at once). `attempts: 1` disables retries.
 */
export interface RetryOptions {
  /** Requests in all, the first included (default 4). */
  attempts?: number;
  /** First backoff when the server gives no Retry-After (default 250 ms), doubled each retry. */
  backoffMs?: number;
  /** Backoff cap (default 8000 ms). */
  backoffMaxMs?: number;
  /** The longest Retry-After waited for (default 30000 ms). */
  maxRetryAfterMs?: number;
  /** Error codes retried (default {@link DEFAULT_RETRY_CODES}); any 503 is retried as well. */
  retryCodes?: readonly string[];
  /** Called before each wait (logging, metrics). */
  onRetry?: (info: RetryInfo) => void;
  /** How to wait (default: a timer); for tests and custom schedulers. */
  sleep?: (ms: number) => Promise<void>;
}

export interface ResolvedRetry {
  attempts: number;
  backoffMs: number;
  backoffMaxMs: number;
  maxRetryAfterMs: number;
  retryCodes: ReadonlySet<string>;
  onRetry: ((info: RetryInfo) => void) | undefined;
  sleep: (ms: number) => Promise<void>;
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export function resolveRetry(options: RetryOptions = {}): ResolvedRetry {
  const attempts = options.attempts ?? 4;
  if (!Number.isInteger(attempts) || attempts < 1) throw new RangeError("retry.attempts must be an integer ≥ 1");
  return {
    attempts,
    backoffMs: options.backoffMs ?? 250,
    backoffMaxMs: options.backoffMaxMs ?? 8000,
    maxRetryAfterMs: options.maxRetryAfterMs ?? 30_000,
    retryCodes: new Set(options.retryCodes ?? DEFAULT_RETRY_CODES),
    onRetry: options.onRetry,
    sleep: options.sleep ?? sleep,
  };
}

/** Milliseconds to wait before retry number `attempt + 1`, or undefined to give up. */
export function retryDelay(policy: ResolvedRetry, error: BapError, attempt: number): number | undefined {
  if (attempt + 1 >= policy.attempts) return undefined;
  if (!policy.retryCodes.has(error.code) && error.status !== 503) return undefined;
  if (error.retryAfter !== undefined) {
    const ms = error.retryAfter * 1000;
    return ms > policy.maxRetryAfterMs ? undefined : ms;
  }
  return Math.min(policy.backoffMaxMs, policy.backoffMs * 2 ** attempt) * (1 + Math.random() * 0.1);
}
