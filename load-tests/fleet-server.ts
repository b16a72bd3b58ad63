// One instance of the fleet scenario, in its own process: a group of
// `maxConcurrency` shared through Redis in front of the downstream
// (fleet-downstream.ts). Settings as JSON in argv[2]. IPC: 'ready' with the
// port, then 'stats' and 'reset'. Admission time is measured from onRequest
// to the handler's start: the round trip to Redis, plus any queueing.
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import { Pool } from 'undici'
import concurrencyLimit, { type OnStoreError } from 'fastify-concurrency-limit'
import { summarize } from './stats.js'

export interface FleetServerSettings {
  redisPort: number
  downstreamPort: number
  maxConcurrency: number
  maxQueue: number
  queueTimeout: number
  leaseMs: number
  onStoreError: OnStoreError
  instances: number
}

const settings = JSON.parse(process.argv[2] ?? '{}') as FleetServerSettings
const redis = new Redis({ port: settings.redisPort, host: '127.0.0.1', retryStrategy: () => 50 })
redis.on('error', () => {})
const app = Fastify({ logger: false, forceCloseConnections: true, keepAliveTimeout: 30_000 })
await app.register(concurrencyLimit, {
  global: false,
  rejectDelay: 0,
  groups: {
    renders: {
      maxConcurrency: settings.maxConcurrency,
      maxQueue: settings.maxQueue,
      queueTimeout: settings.queueTimeout,
      store: {
        redis,
        leaseMs: settings.leaseMs,
        onStoreError: settings.onStoreError,
        ...(settings.onStoreError === 'local' ? { instances: settings.instances } : {})
      }
    }
  }
})
const downstream = new Pool(`http://127.0.0.1:${settings.downstreamPort}`, { connections: 256 })

const admissions = new Float64Array(100_000)
let admitted = 0
const kArrived = Symbol('arrived')
app.decorateRequest(kArrived as unknown as string, 0)
app.addHook('onRequest', (request, _reply, done) => {
  (request as unknown as Record<symbol, number>)[kArrived] = performance.now()
  done()
})

app.get('/render', { config: { concurrencyLimit: { group: 'renders' } } }, async (request) => {
  const waited = performance.now() - (request as unknown as Record<symbol, number>)[kArrived]
  if (admitted < admissions.length) admissions[admitted++] = waited
  const res = await downstream.request({ path: '/', method: 'GET' })
  await res.body.dump()
  return 'ok'
})

process.on('message', (message: { type: string }) => {
  if (message.type === 'stats') {
    process.send?.({
      type: 'stats',
      admission: summarize(Array.from(admissions.subarray(0, admitted))),
      pool: app.concurrencyLimit.stats('renders')
    })
  }
  if (message.type === 'reset') {
    admitted = 0
    process.send?.({ type: 'reset' })
  }
})
process.on('disconnect', () => { process.exit(0) })

await app.listen({ host: '127.0.0.1', port: 0, backlog: 4096 })
const address = app.server.address()
process.send?.({ type: 'ready', port: typeof address === 'object' && address !== null ? address.port : 0 })
