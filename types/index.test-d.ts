import Fastify, { type FastifyRequest } from 'fastify'
import { expectAssignable, expectError, expectType } from 'tsd'
import concurrencyLimit, {
  fastifyConcurrencyLimit,
  InvalidOptionError,
  OverloadedError,
  QueueFullError,
  type ConcurrencyLimitOptions,
  type ConnectionStats,
  type PoolStats,
  type RejectReason,
  type RejectionWithRetry
} from 'fastify-concurrency-limit'

const app = Fastify()
expectType<typeof concurrencyLimit>(fastifyConcurrencyLimit)

app.register(concurrencyLimit)
app.register(concurrencyLimit, { maxConcurrency: 100, maxQueue: 100, queueTimeout: 1000 })
app.register(concurrencyLimit, {
  global: false,
  hook: 'preHandler',
  statusCode: 429,
  retryAfter: (request, rejection) => {
    expectType<FastifyRequest>(request)
    expectType<RejectReason>(rejection.reason)
    expectType<string>(rejection.pool)
    return 5
  },
  errorResponseBuilder: (_request, rejection) => {
    expectType<RejectionWithRetry>(rejection)
    expectType<number>(rejection.retryAfter)
    return { busy: true }
  },
  groups: { reports: { maxConcurrency: 2 } }
})
app.register(concurrencyLimit, { retryAfter: 2 })
app.register(concurrencyLimit, { adaptive: true, maxConcurrency: 1000 })
app.register(concurrencyLimit, { adaptive: { minConcurrency: 2, initialConcurrency: 10, tolerance: 0.5, baselineInterval: 5000 }, groups: { db: { adaptive: false } } })
expectError(app.register(concurrencyLimit, { adaptive: 'yes' }))
expectError(app.register(concurrencyLimit, { adaptive: { minConcurency: 2 } }))
app.register(concurrencyLimit, { rejectDelay: 0, maxHeldRejections: 100, closeOnReject: true, maxConnections: 5000 })

app.register(concurrencyLimit, { exempt: ['/status', /^\/docs/] })
app.register(concurrencyLimit, {
  exempt: (route) => {
    expectType<string>(route.url)
    return route.url === '/metrics'
  }
})

// Wrong option types do not compile.
expectError(app.register(concurrencyLimit, { exempt: '/status' }))
expectError(app.register(concurrencyLimit, { exempt: [3] }))
expectError(app.register(concurrencyLimit, { maxConcurrency: '100' }))
expectError(app.register(concurrencyLimit, { maxQueue: true }))
expectError(app.register(concurrencyLimit, { queueTimeout: '1s' }))
expectError(app.register(concurrencyLimit, { hook: 'onSend' }))
expectError(app.register(concurrencyLimit, { retryAfter: '5' }))
expectError(app.register(concurrencyLimit, { retryAfter: () => 'soon' }))
expectError(app.register(concurrencyLimit, { global: 'yes' }))
expectError(app.register(concurrencyLimit, { groups: { a: { hook: 'onRequest' } } }))
expectError(app.register(concurrencyLimit, { maxConcurency: 10 }))
expectError(app.register(concurrencyLimit, { rejectDelay: '1s' }))
expectError(app.register(concurrencyLimit, { closeOnReject: 1 }))
expectError(app.register(concurrencyLimit, { maxConnections: '10' }))

// Route config is typed.
app.get('/report', { config: { concurrencyLimit: { maxConcurrency: 2, maxQueue: 10 } } }, async () => 'x')
app.get('/healthz', { config: { concurrencyLimit: false } }, async () => 'ok')
app.get('/shared', { config: { concurrencyLimit: { group: 'reports', hook: 'preHandler' } } }, async () => 'x')
app.get('/on', { config: { concurrencyLimit: true } }, async () => 'x')
expectError(app.get('/bad', { config: { concurrencyLimit: { maxConcurrency: '2' } } }, async () => 'x'))
expectError(app.get('/bad', { config: { concurrencyLimit: { group: 3 } } }, async () => 'x'))
expectError(app.get('/bad', { config: { concurrencyLimit: { hook: 'onResponse' } } }, async () => 'x'))
expectError(app.get('/bad', { config: { concurrencyLimit: { gruop: 'reports' } } }, async () => 'x'))
expectError(app.get('/bad', { config: { concurrencyLimit: 'off' } }, async () => 'x'))
expectError(app.route({ method: 'GET', url: '/bad', config: { concurrencyLimit: { gruop: 'reports' } }, handler: async () => 'x' }))
app.get('/empty', { config: { concurrencyLimit: {} } }, async () => 'x')
app.get('/hook-only', { config: { concurrencyLimit: { hook: 'preHandler' } } }, async () => 'x')
app.get('/timeout-only', { config: { concurrencyLimit: { queueTimeout: 500 } } }, async () => 'x')
app.get('/cpu-bound', { config: { concurrencyLimit: { maxEventLoopDelay: 50 } } }, async () => 'x')
app.register(concurrencyLimit, { maxEventLoopDelay: 50, groups: { render: { maxEventLoopDelay: 100 } } })
expectError(app.register(concurrencyLimit, { maxEventLoopDelay: '50ms' }))
app.register(concurrencyLimit, { priority: 'sheddable', groups: { checkout: { priority: 'critical' } } })
app.register(concurrencyLimit, { priority: (request) => (request.headers['x-prefetch'] === '1' ? 'sheddable' : 'normal') })
expectError(app.register(concurrencyLimit, { priority: 'high' }))
app.get('/checkout', { config: { concurrencyLimit: { priority: 'critical' } } }, async () => 'x')
expectError(app.get('/bad-priority', { config: { concurrencyLimit: { priority: 'urgent' } } }, async () => 'x'))
app.get('/adaptive', { config: { concurrencyLimit: { adaptive: { minConcurrency: 2 } } } }, async () => 'x')
expectError(app.get('/bad', { config: { concurrencyLimit: { adaptive: { minConcurrency: '2' } } } }, async () => 'x'))

// The decorator.
expectType<PoolStats>(app.concurrencyLimit.stats())
expectType<PoolStats>(app.concurrencyLimit.stats('reports'))
expectType<PoolStats[]>(app.concurrencyLimit.pools())
const stats = app.concurrencyLimit.stats()
expectType<number>(stats.inFlight)
expectType<number>(stats.queued)
expectType<number>(stats.rejected.queueFull)
expectType<number>(stats.rejected.overloaded)
expectType<number>(stats.rejected.storeUnavailable)
expectType<{ admitted: number, rejected: number }>(stats.priority.critical)
expectType<number>(stats.queueWait.meanMs)
expectError(app.concurrencyLimit.stats(1))
expectType<number>(stats.heldRejections)
expectType<number>(stats.limit)
expectType<number | null | undefined>(stats.adaptive?.baselineMs)
expectType<ConnectionStats | null>(app.concurrencyLimit.connections())

// Errors carry their codes.
expectType<'FST_CONCURRENCY_LIMIT_QUEUE_FULL'>(new QueueFullError().code)
expectType<'FST_CONCURRENCY_LIMIT_OVERLOADED'>(new OverloadedError().code)
expectType<503>(new QueueFullError().statusCode)
expectType<'FST_CONCURRENCY_LIMIT_INVALID_OPTION'>(new InvalidOptionError('message').code)
expectError(new InvalidOptionError())
expectAssignable<ConcurrencyLimitOptions>({})
