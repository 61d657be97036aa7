/**
 * @bap-engine/client — the TypeScript client of bap-engine (ESM, no runtime dependencies: the
 * platform's `fetch`, Node ≥ 18).
 *
 *     import { BapClient, RateLimited } from "@bap-engine/client";
 *
 *     const bap = new BapClient({ baseUrl: "http://127.0.0.1:8000", platformKey: process.env.BAP_PLATFORM_KEY });
 *     const adm = await bap.admit("user-42");                // auto_provision and auto_wake on by default
 *     const res = await bap.callEngine("user-42", "GET", "/history"); // re-admits once on a rotated key
 */
export {
  BapClient,
  DEFAULT_URL,
  STALE_KEY_CODES,
  VERSION,
  engineUrl,
  isStaleKeyResponse,
  requireAdmitted,
} from "./client.js";
export type {
  AdmitOptions,
  AuditOptions,
  BapClientOptions,
  EngineCallInit,
  IterEnginesOptions,
  ListEnginesOptions,
} from "./client.js";
export {
  BackendError,
  BapError,
  BootTimeout,
  ConnectionFailed,
  ERROR_CLASSES,
  EngineAlreadyExists,
  EngineAlreadyRunning,
  EngineBusy,
  EngineNotFound,
  EngineNotRunning,
  InternalError,
  InvalidAdminKey,
  InvalidPlatformKey,
  MethodNotAllowed,
  MissingKey,
  NotAdmitted,
  PayloadTooLarge,
  PolicyDenied,
  PortExhaustion,
  ProductNotFound,
  ProductSlugExists,
  QuotaExceeded,
  RateLimited,
  RouteNotFound,
  ServiceUnavailable,
  ValidationError,
  WebhookNotFound,
  errorFromResponse,
  parseRetryAfter,
} from "./errors.js";
export type { ApiErrorCode, BapErrorInit, ClientErrorCode } from "./errors.js";
export { DEFAULT_RETRY_CODES } from "./retry.js";
export type { RetryInfo, RetryOptions } from "./retry.js";
export type {
  AdminActionResult,
  AdmitBody,
  Admission,
  AdmittedEngine,
  AuditEvent,
  AuditPage,
  AuditQuery,
  DestroyResult,
  Engine,
  EngineListItem,
  EnginePage,
  EngineStatus,
  FleetMetrics,
  FleetStatus,
  ListEnginesQuery,
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
  RequestBodyOf,
  ResponseOf,
  QueryOf,
  RotatedEngine,
  StartResult,
  StopResult,
} from "./types.js";
export type { components, operations, paths } from "./schema.js";
