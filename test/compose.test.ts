import t from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import rateLimit from '@fastify/rate-limit'
import underPressure from '@fastify/under-pressure'
import metrics from 'fastify-metrics'
import concurrencyLimit from '../lib/index.js'
import { build, listen, client, get, waitFor, sleep, Gauge } from './helpers/server.js'

// The plugin next to the plugins it is most often used with, as they are
// published: per-client checks come before a request asks for a slot, and
// their own routes (status, metrics) are easy to leave unlimited.

async function sixRequests (app: FastifyInstance): Promise<string[]> {
  const pool = client(t, await listen(app))
  const answers: Array<Promise<string>> = []
  for (let i = 0; i < 6; i++) {
    answers.push(get(pool, '/slow').then((a) => String(a.statusCode)))
    await sleep(5)
  }
  return Promise.all(answers)
}

for (const order of ['rate-limit first', 'rate-limit second']) {
  t.test(`@fastify/rate-limit (${order}): an over-quota request gets its 429 at once, without a queue place`, async (t) => {
    const app = Fastify({ forceCloseConnections: true })
    t.teardown(() => app.close())
    const limits = { max: 2, timeWindow: 60_000 }
    if (order === 'rate-limit first') await app.register(rateLimit, limits)
    await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 2, queueTimeout: 2000 })
    if (order === 'rate-limit second') await app.register(rateLimit, limits)
    app.get('/slow', async () => { await sleep(100); return 'ok' })
    t.same(await sixRequests(app), ['200', '200', '429', '429', '429', '429'])
    t.match(app.concurrencyLimit.stats(), { admitted: 2, rejected: { queueFull: 0, queueTimeout: 0 } }, 'the plugin saw only the requests within quota')
  })
}

t.test('with hook: onRequest the plugin asks first, as README warns', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(rateLimit, { max: 2, timeWindow: 60_000 })
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 2, queueTimeout: 2000, hook: 'onRequest' })
  app.get('/slow', async () => { await sleep(100); return 'ok' })
  const statuses = await sixRequests(app)
  t.ok(statuses.includes('503'), `over-quota requests took queue places and pushed others out: ${statuses.join()}`)
})

t.test('@fastify/under-pressure: its status route is exempt by URL and answers while the pool is full', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0, exempt: ['/status'] })
  await app.register(underPressure, { exposeStatusRoute: '/status', maxEventLoopDelay: 10_000 })
  const gauge = new Gauge()
  app.get('/slow', async () => { gauge.enter(); await gauge.wait(); return 'ok' })
  const pool = client(t, await listen(app))
  const held = get(pool, '/slow')
  await waitFor(() => gauge.current === 1)
  t.equal((await get(pool, '/slow')).statusCode, 503, 'the pool is full')
  t.equal((await get(pool, '/status')).statusCode, 200, 'the health check still answers')
  gauge.open()
  t.equal((await held).statusCode, 200)
  t.equal(app.concurrencyLimit.stats().admitted, 1, 'the status route took no slot')
})

t.test('fastify-metrics: /metrics exempt by a RegExp, scraped while the pool is full', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0, exempt: [/^\/metrics/] })
  await app.register(metrics.default ?? metrics, { endpoint: '/metrics', defaultMetrics: { enabled: false }, clearRegisterOnInit: true })
  const gauge = new Gauge()
  app.get('/slow', async () => { gauge.enter(); await gauge.wait(); return 'ok' })
  const pool = client(t, await listen(app))
  const held = get(pool, '/slow')
  await waitFor(() => gauge.current === 1)
  const scrape = await get(pool, '/metrics')
  t.equal(scrape.statusCode, 200, 'the scrape answers')
  t.match(scrape.body, /http_request_duration_seconds/)
  gauge.open()
  await held
})

t.test('exempt as a predicate on the route; a route config that asks wins over it', async (t) => {
  const app = await build(t, {
    maxConcurrency: 1,
    maxQueue: 0,
    exempt: (route) => route.url.startsWith('/docs')
  })
  const gauge = new Gauge()
  app.get('/slow', async () => { gauge.enter(); await gauge.wait(); return 'ok' })
  app.get('/docs/index', async () => 'docs')
  app.get('/docs/limited', { config: { concurrencyLimit: true } }, async () => 'limited')
  const pool = client(t, await listen(app))
  const held = get(pool, '/slow')
  await waitFor(() => gauge.current === 1)
  t.equal((await get(pool, '/docs/index')).statusCode, 200)
  t.equal((await get(pool, '/docs/limited')).statusCode, 503)
  gauge.open()
  await held
})

t.test('exempt with a global RegExp matches every route, not every other one', async (t) => {
  const app = await build(t, { maxConcurrency: 1, exempt: [/^\/free/g] })
  for (const n of [1, 2, 3, 4]) app.get(`/free/${n}`, async () => 'x')
  await app.ready()
  for (const n of [1, 2, 3, 4]) await app.inject(`/free/${n}`)
  t.equal(app.concurrencyLimit.stats().admitted, 0)
})

t.test('exempt: wrong values are refused with a code', async (t) => {
  for (const exempt of ['/status', [3], [''], { url: '/x' }]) {
    const app = Fastify()
    t.teardown(() => app.close())
    await t.rejects(async () => { await app.register(concurrencyLimit, { exempt } as never) }, {
      code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
      message: /exempt must be an array of URLs \(strings or RegExps\) or a function of the route/
    })
  }
})
