// A demo app with the plugin's metrics, for examples/prometheus/run.mjs (or
// on its own: `npm run build && node examples/prometheus/app.mjs 3000`).
// Prints {"port": N} once it listens.
import Fastify from 'fastify'
import { Registry, collectDefaultMetrics } from 'prom-client'
import concurrencyLimit from '../../dist/index.js'

const registry = new Registry()
collectDefaultMetrics({ register: registry })

const app = Fastify({ forceCloseConnections: true })
await app.register(concurrencyLimit, {
  maxConcurrency: 8,
  maxQueue: 8,
  queueTimeout: 100,
  maxConnections: 40,
  exempt: ['/metrics'],
  groups: { reports: { maxConcurrency: 2, maxQueue: 2, queueTimeout: 500 } },
  metrics: { registry }
})

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

app.get('/metrics', async (_request, reply) => {
  reply.type(registry.contentType)
  return registry.metrics()
})
// ?ms= how long the work takes.
app.get('/work', async (request) => {
  await sleep(Math.min(5000, Number(request.query.ms ?? 20)))
  return 'done'
})
app.get('/report', { config: { concurrencyLimit: { group: 'reports' } } }, async () => {
  await sleep(50)
  return 'report'
})

const shutdown = () => { app.close().then(() => process.exit(0), () => process.exit(1)) }
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)

await app.listen({ host: '127.0.0.1', port: Number(process.argv[2] ?? 0) })
console.log(JSON.stringify({ port: app.server.address().port }))
