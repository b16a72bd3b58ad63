// The recycle scenario's server: runCluster with two workers and a route
// that leaks 10 KiB per request on purpose. Forked by the lab with the
// cluster options as JSON in argv[2]; the primary reports over IPC: 'ready'
// with the port, 'stats' every 250 ms, 'recycle' as each happens.
import Fastify from 'fastify'
import concurrencyLimit from 'fastify-concurrency-limit'
import { runCluster, type RecycleEvent } from 'fastify-concurrency-limit/cluster'

const options = JSON.parse(process.argv[2] ?? '{}') as Record<string, unknown>
const LEAK_BYTES = 10 * 1024
const leaked: Buffer[] = []

const cluster = await runCluster({ workers: 2, statsInterval: 250, drainTimeout: 10_000, ...options, listen: { port: 0, host: '127.0.0.1' } }, async () => {
  const app = Fastify()
  await app.register(concurrencyLimit, { maxConcurrency: 100, maxQueue: 100, queueTimeout: 2000 })
  const leak = (): void => { leaked.push(Buffer.alloc(LEAK_BYTES, 1)) }
  app.get('/', async () => {
    leak()
    return { ok: true }
  })
  app.post('/', async (request) => {
    leak()
    return { ok: true, echo: request.body }
  })
  return app
})

if (cluster !== null) {
  const send = (message: object): void => { process.send?.(message) }
  const start = performance.now()
  const at = (): number => (performance.now() - start) / 1000
  send({ type: 'ready', port: cluster.port })
  const timer = setInterval(() => {
    const stats = cluster.stats()
    send({ type: 'stats', t: at(), workers: stats.workers.map((w) => ({ pid: w.pid, state: w.state, rssMB: w.rssBytes / 1024 / 1024 })), recycles: stats.recycles, cut: stats.cut })
  }, 250)
  cluster.on('recycle', (event: RecycleEvent) => { send({ type: 'recycle', t: at(), ...event }) })
  process.on('message', (message: { type: string }) => {
    if (message.type !== 'close') return
    clearInterval(timer)
    cluster.close().then(() => {
      send({ type: 'closed', stats: cluster.stats() })
      process.disconnect()
    }, (error: unknown) => { throw error })
  })
}
