import createError from '@fastify/error'

/** Thrown at registration (or when a route is added) for an invalid option or route config. */
export const InvalidOptionError = createError<[string]>(
  'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
  'Invalid concurrency-limit option: %s',
  500,
  TypeError
)

/** Thrown by `stats(name)` for a pool that does not exist. */
export const UnknownPoolError = createError<[string]>(
  'FST_CONCURRENCY_LIMIT_UNKNOWN_POOL',
  'No concurrency-limit pool is named "%s"',
  500
)

// The rejection errors are never thrown: their code, status and message
// are serialized once per pool into the body of the rejection response. They
// are exported so that an `errorResponseBuilder` or a client can match codes.

export const QueueFullError = createError(
  'FST_CONCURRENCY_LIMIT_QUEUE_FULL',
  'Too many requests in flight and the queue is full, retry later',
  503
)

export const QueueTimeoutError = createError(
  'FST_CONCURRENCY_LIMIT_QUEUE_TIMEOUT',
  'The request waited too long for a free slot, retry later',
  503
)

export const ConnectionLimitError = createError(
  'FST_CONCURRENCY_LIMIT_CONNECTIONS',
  'Too many open connections, retry later',
  503
)

export const OverloadedError = createError(
  'FST_CONCURRENCY_LIMIT_OVERLOADED',
  'The server is too busy to take this request now, retry later',
  503
)

export const ClosingError = createError(
  'FST_CONCURRENCY_LIMIT_CLOSING',
  'The server is shutting down, retry on another instance',
  503
)

export const StoreUnavailableError = createError(
  'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE',
  'The shared concurrency limit is unavailable, retry later',
  503
)
