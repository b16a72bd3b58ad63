import createError, { type FastifyErrorConstructor } from '@fastify/error'

// Each class is typed by its own annotation, with the constructor type
// imported by name: left to inference, the emitted declarations name it
// through the default import (`createError.FastifyErrorConstructor`), which
// resolves under NodeNext only, not under `bundler` or `node10`.

/** An error class of this plugin: its code and status known to the type. */
type ErrorClass<C extends string, S extends number, A extends unknown[] = [any?, any?, any?]> = FastifyErrorConstructor<{ code: C, statusCode: S }, A>

/** Thrown at registration (or when a route is added) for an invalid option or route config. */
export const InvalidOptionError: ErrorClass<'FST_CONCURRENCY_LIMIT_INVALID_OPTION', 500, [message: string]> = createError(
  'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
  'Invalid concurrency-limit option: %s',
  500,
  TypeError
)

/** Thrown by `stats(name)` for a pool that does not exist. */
export const UnknownPoolError: ErrorClass<'FST_CONCURRENCY_LIMIT_UNKNOWN_POOL', 500, [pool: string]> = createError(
  'FST_CONCURRENCY_LIMIT_UNKNOWN_POOL',
  'No concurrency-limit pool is named "%s"',
  500
)

// The rejection errors are never thrown: their code, status and message
// are serialized once per pool into the body of the rejection response. They
// are exported so that an `errorResponseBuilder` or a client can match codes.

export const QueueFullError: ErrorClass<'FST_CONCURRENCY_LIMIT_QUEUE_FULL', 503> = createError(
  'FST_CONCURRENCY_LIMIT_QUEUE_FULL',
  'Too many requests in flight and the queue is full, retry later',
  503
)

export const QueueTimeoutError: ErrorClass<'FST_CONCURRENCY_LIMIT_QUEUE_TIMEOUT', 503> = createError(
  'FST_CONCURRENCY_LIMIT_QUEUE_TIMEOUT',
  'The request waited too long for a free slot, retry later',
  503
)

export const ConnectionLimitError: ErrorClass<'FST_CONCURRENCY_LIMIT_CONNECTIONS', 503> = createError(
  'FST_CONCURRENCY_LIMIT_CONNECTIONS',
  'Too many open connections, retry later',
  503
)

export const OverloadedError: ErrorClass<'FST_CONCURRENCY_LIMIT_OVERLOADED', 503> = createError(
  'FST_CONCURRENCY_LIMIT_OVERLOADED',
  'The server is too busy to take this request now, retry later',
  503
)

export const ClosingError: ErrorClass<'FST_CONCURRENCY_LIMIT_CLOSING', 503> = createError(
  'FST_CONCURRENCY_LIMIT_CLOSING',
  'The server is shutting down, retry on another instance',
  503
)

export const StoreUnavailableError: ErrorClass<'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE', 503> = createError(
  'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE',
  'The shared concurrency limit is unavailable, retry later',
  503
)
