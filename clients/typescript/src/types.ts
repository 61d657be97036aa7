/**
 * Result and body types of the client, taken from the generated OpenAPI types (`schema.ts`) by path
 * and method — so they follow the server's document, and a renamed component schema changes nothing.
 * Field names are the wire's (snake_case): what the server sends is what you get.
 */
import type { paths } from "./schema.js";

type Operation<P extends keyof paths, M extends keyof paths[P]> = NonNullable<paths[P][M]>;

type JsonOf<R> = R extends { content: { "application/json": infer T } } ? T : never;

/** The JSON body of the 200 answer of `M P`. */
export type ResponseOf<P extends keyof paths, M extends keyof paths[P]> =
  Operation<P, M> extends { responses: { 200: infer R } } ? JsonOf<R> : never;

/** The JSON request body of `M P`. */
export type RequestBodyOf<P extends keyof paths, M extends keyof paths[P]> =
  Operation<P, M> extends { requestBody?: infer B } ? JsonOf<NonNullable<B>> : never;

/** The query parameters of `M P`. */
export type QueryOf<P extends keyof paths, M extends keyof paths[P]> =
  Operation<P, M> extends { parameters: { query?: infer Q } } ? NonNullable<Q> : never;

/** A user's engine with its key (GET /engines/{user_id}, and the engine of a successful admit). */
export type Engine = ResponseOf<"/engines/{user_id}", "get">;
/** The answer of admit: `engine` when admitted, else `reason`. */
export type Admission = ResponseOf<"/engines/{user_id}/admit", "post">;
/** An admission that let the request through: its engine has a URL and a key. */
export type AdmittedEngine = Engine & { url: string; api_key: string };
/** A newly provisioned engine and its key. */
export type ProvisionedEngine = ResponseOf<"/engines/provision", "post">;
/** The engine with its new key, after rotate-key. */
export type RotatedEngine = ResponseOf<"/engines/{user_id}/rotate-key", "post">;
export type StartResult = ResponseOf<"/engines/{user_id}/start", "post">;
export type StopResult = ResponseOf<"/engines/{user_id}/stop", "post">;
export type DestroyResult = ResponseOf<"/engines/{user_id}", "delete">;
/** One page of the fleet listing (never with keys) and the total matching. */
export type EnginePage = ResponseOf<"/engines", "get">;
export type EngineListItem = EnginePage["engines"][number];
export type ListEnginesQuery = QueryOf<"/engines", "get">;
/** One of the six engine states. */
export type EngineStatus = NonNullable<ListEnginesQuery["status"]>;
export type FleetStatus = ResponseOf<"/status", "get">;
export type FleetMetrics = ResponseOf<"/metrics", "get">;
export type ProvisionBody = RequestBodyOf<"/engines/provision", "post">;
export type AdmitBody = RequestBodyOf<"/engines/{user_id}/admit", "post">;

/** A product's policy (`{}` = no limits). */
export type Policy = RequestBodyOf<"/products/{product_id}/policy", "put">["policy"];
export type RegisterBody = RequestBodyOf<"/products/register", "post">;
/** A new product; its platform key is shown once. */
export type RegisteredProduct = ResponseOf<"/products/register", "post">;
export type PolicyResult = ResponseOf<"/products/{product_id}/policy", "put">;
export type ProductList = ResponseOf<"/products", "get">;
export type Product = ProductList["products"][number];
export type AuditPage = ResponseOf<"/audit", "get">;
export type AuditEvent = AuditPage["events"][number];
export type AuditQuery = QueryOf<"/audit", "get">;
/** One engine of a product as the admin sees it (without its key). */
export type ProductEngine = ResponseOf<"/products/{product_id}/engines/{user_id}", "get">;
export type ProductMetrics = ResponseOf<"/products/{product_id}/metrics", "get">;
/** The answer of the admin's start, stop, destroy and rotate-key (never with a key). */
export type AdminActionResult = ResponseOf<"/products/{product_id}/engines/{user_id}/stop", "post">;

// Compile-time guard: a path or method missing from the generated document makes its type `never`;
// fail the build instead of shipping a client typed with `never`.
type Present<T> = [T] extends [never] ? false : true;
type AllPresent<T extends readonly unknown[]> = T extends readonly [infer H, ...infer R]
  ? Present<H> extends true ? AllPresent<R> : false
  : true;
type Assert<T extends true> = T;
export type _SchemaCoversClient = Assert<AllPresent<[
  Engine, Admission, ProvisionedEngine, RotatedEngine, StartResult, StopResult, DestroyResult, EnginePage,
  EngineStatus, FleetStatus, FleetMetrics, ProvisionBody, AdmitBody, Policy, RegisterBody, RegisteredProduct,
  PolicyResult, ProductList, AuditPage, AuditQuery, ProductEngine, ProductMetrics, AdminActionResult,
]>>;
