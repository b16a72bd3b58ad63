import Fastify from 'fastify'
import { Redis } from 'ioredis'
import { expectAssignable, expectError, expectType } from 'tsd'
import concurrencyLimit, {
  StoreUnavailableError,
  type OnStoreError,
  type RedisClient,
  type StoreOptions,
  type StoreStats
} from 'fastify-concurrency-limit'

const app = Fastify()
const redis = new Redis({ lazyConnect: true })

// An ioredis client is what `store.redis` takes.
expectAssignable<RedisClient>(redis)
app.register(concurrencyLimit, {
  groups: {
    renders: {
      maxConcurrency: 20,
      maxQueue: 50,
      queueTimeout: 2000,
      store: { redis, leaseMs: 30_000, onStoreError: 'refuse' }
    },
    db: { store: { redis, onStoreError: 'local', instances: 4, nameSpace: 'shop:', timeout: 200 } }
  }
})
app.register(concurrencyLimit, { store: { redis, onStoreError: 'allow' } })
app.get('/render', { config: { concurrencyLimit: { group: 'renders' } } }, async () => 'x')
app.get('/own', { config: { concurrencyLimit: { store: { redis } } } }, async () => 'x')
expectAssignable<StoreOptions>({ redis })
expectAssignable<OnStoreError>('local')

expectError(app.register(concurrencyLimit, { store: { redis, onStoreError: 'ignore' } }))
expectError(app.register(concurrencyLimit, { store: { redis: 'redis://localhost' } }))
expectError(app.register(concurrencyLimit, { store: { leaseMs: 1000 } }))
expectError(app.register(concurrencyLimit, { store: { redis, leaseMs: '30s' } }))

const stats = app.concurrencyLimit.stats('renders')
expectType<StoreStats | null>(stats.store)
expectType<number | undefined>(stats.store?.leases)
expectType<boolean | undefined>(stats.store?.available)
expectType<'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE'>(new StoreUnavailableError().code)
