import t from 'tap'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { Registry, register as globalRegister } from 'prom-client'
import Fastify from 'fastify'
import { Client } from 'undici'
import concurrencyLimit from '../lib/index.js'
import { loadPromClient, METRICS } from '../lib/metrics.js'
import { abortAfter, build, client, Gauge, get, listen, sleep, waitFor } from './helpers/server.js'
import { parseExposition, valueOf, type Exposition } from './helpers/exposition.js'

const P = 'fastify_concurrency_limit_'

async function scrape (registry: Registry): Promise<Exposition> {
  return parseExposition(await registry.metrics())
}

t.test('the exposition matches stats() after admitted, queued, timed-out, full and abandoned requests', async (t) => {
  const registry = new Registry()
  const gate = new Gauge()
  const app = await build(t, {
    maxConcurrency: 1,
    maxQueue: 2,
    queueTimeout: 300,
    rejectDelay: 0,
    groups: { reports: { maxConcurrency: 3, maxQueue: 0, queueTimeout: 750 } },
    metrics: { registry }
  })
  app.get('/slow', async () => {
    gate.enter()
    await gate.wait()
    gate.leave()
    return 'done'
  })
  app.get('/report', { config: { concurrencyLimit: { group: 'reports' } } }, async () => 'report')
  const url = await listen(app)
  const pool = client(t, url)

  // Nothing yet: every series is there, at zero.
  let m = await scrape(registry)
  t.same(
    [...m.types].filter(([name]) => name.startsWith(P)).sort(),
    [
      [`${P}in_flight`, 'gauge'], [`${P}limit`, 'gauge'], [`${P}max_queue`, 'gauge'], [`${P}priority_requests_total`, 'counter'],
      [`${P}queue_wait_seconds`, 'histogram'], [`${P}queued`, 'gauge'], [`${P}requests_total`, 'counter']
    ],
    'the metrics and their types; no connection metrics without maxConnections')
  for (const name of Object.keys(METRICS).filter((n) => !n.startsWith('connections'))) {
    t.ok(m.help.get(P + name)?.length, `${name} has help`)
  }
  t.equal(valueOf(m, `${P}limit`, { pool: 'default' }), 1)
  t.equal(valueOf(m, `${P}limit`, { pool: 'reports' }), 3)
  t.equal(valueOf(m, `${P}max_queue`, { pool: 'reports' }), 0)
  t.equal(valueOf(m, `${P}requests_total`, { pool: 'default', result: 'admitted' }), 0)

  // A holds the slot; B and C wait; D finds the queue full.
  const a = get(pool, '/slow')
  await waitFor(() => gate.current === 1, 2000, 'A in its handler')
  const b = get(pool, '/slow')
  let leave = (): void => {}
  const c = abortAfter(`${url}/slow`, { until: new Promise<void>((resolve) => { leave = resolve }) })
  await waitFor(() => app.concurrencyLimit.stats().queued === 2, 2000, 'B and C queued')
  m = await scrape(registry)
  t.equal(valueOf(m, `${P}in_flight`, { pool: 'default' }), 1, 'gauges are read at scrape time: one in flight')
  t.equal(valueOf(m, `${P}queued`, { pool: 'default' }), 2, 'two queued')
  t.equal((await get(pool, '/slow')).statusCode, 503, 'D: queue full')
  // C's client leaves while it waits.
  leave()
  await c
  await waitFor(() => app.concurrencyLimit.stats().abandoned === 1, 2000, 'C abandoned')
  // B times out.
  t.equal((await b).statusCode, 503, 'B: queue timeout')
  // E waits until A finishes, and is admitted from the queue.
  const e = get(pool, '/slow')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1, 2000, 'E queued')
  await sleep(20)
  gate.open()
  t.equal((await a).statusCode, 200)
  t.equal((await e).statusCode, 200)
  // F and two reports admitted at once.
  t.equal((await get(pool, '/slow')).statusCode, 200)
  t.equal((await get(pool, '/report')).statusCode, 200)
  t.equal((await get(pool, '/report')).statusCode, 200)
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 0, 2000, 'every slot given back')

  m = await scrape(registry)
  for (const s of app.concurrencyLimit.pools()) {
    const pool = { pool: s.name }
    t.equal(valueOf(m, `${P}in_flight`, pool), s.inFlight, `${s.name}: in_flight`)
    t.equal(valueOf(m, `${P}queued`, pool), s.queued, `${s.name}: queued`)
    t.equal(valueOf(m, `${P}limit`, pool), s.limit, `${s.name}: limit`)
    t.equal(valueOf(m, `${P}max_queue`, pool), s.maxQueue, `${s.name}: max_queue`)
    const count = (result: string): number | undefined => valueOf(m, `${P}requests_total`, { pool: s.name, result })
    t.equal(count('admitted'), s.admitted, `${s.name}: admitted`)
    t.equal(count('queue_full'), s.rejected.queueFull, `${s.name}: queue_full`)
    t.equal(count('queue_timeout'), s.rejected.queueTimeout, `${s.name}: queue_timeout`)
    t.equal(count('closing'), s.rejected.closing, `${s.name}: closing`)
    t.equal(count('abandoned'), s.abandoned, `${s.name}: abandoned`)
    for (const [priority, counts] of Object.entries(s.priority)) {
      t.equal(valueOf(m, `${P}priority_requests_total`, { pool: s.name, priority, result: 'admitted' }), counts.admitted, `${s.name}: ${priority} admitted`)
      t.equal(valueOf(m, `${P}priority_requests_total`, { pool: s.name, priority, result: 'rejected' }), counts.rejected, `${s.name}: ${priority} rejected`)
    }
    t.equal(valueOf(m, `${P}queue_wait_seconds_count`, pool), s.queueWait.count, `${s.name}: waits counted`)
    t.ok(Math.abs((valueOf(m, `${P}queue_wait_seconds_sum`, pool) as number) - s.queueWait.meanMs * s.queueWait.count / 1000) < 1e-9,
      `${s.name}: waits summed`)
  }
  // The known mix, as counted by both.
  t.match(app.concurrencyLimit.stats(), { admitted: 3, rejected: { queueFull: 1, queueTimeout: 1, closing: 0 }, abandoned: 1, queueWait: { count: 1 } })
  t.equal(app.concurrencyLimit.stats('reports').admitted, 2)

  // The buckets include each pool's queueTimeout, and count E's wait (> 20 ms) above 10 ms.
  const les = m.samples.filter((s) => s.name === `${P}queue_wait_seconds_bucket` && s.labels.pool === 'default').map((s) => s.labels.le)
  t.ok(les.includes('0.3') && les.includes('0.75') && les.includes('+Inf'), `buckets with 0.3 and 0.75 s: ${les.join(' ')}`)
  t.equal(valueOf(m, `${P}queue_wait_seconds_bucket`, { pool: 'default', le: '0.01' }), 0)
  t.equal(valueOf(m, `${P}queue_wait_seconds_bucket`, { pool: 'default', le: '+Inf' }), 1)
})

t.test('closing requests are counted', async (t) => {
  const registry = new Registry()
  const gate = new Gauge()
  const app = Fastify({ forceCloseConnections: true })
  await app.register(concurrencyLimit, { maxConcurrency: 1, metrics: { registry } })
  app.get('/', async () => { gate.enter(); await gate.wait(); return 'ok' })
  const url = await listen(app)
  const pool = client(t, url)
  const a = get(pool, '/')
  await waitFor(() => gate.current === 1)
  const b = get(pool, '/')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  const closed = app.close()
  t.equal((await b).statusCode, 503, 'the waiter is refused at close')
  gate.open()
  await a.catch(() => {})
  await closed
  // A closed app takes its metrics away with it.
  t.equal(registry.getSingleMetric(`${P}requests_total`), undefined, 'metrics removed on close')
})

t.test('a closed app gives its metric names back; the next one takes them', async (t) => {
  const registry = new Registry()
  const first = Fastify()
  await first.register(concurrencyLimit, { metrics: { registry } })
  await first.ready()
  t.ok(registry.getSingleMetric(`${P}queue_wait_seconds`))
  await first.close()
  t.same(registry.getMetricsAsArray().map((metric) => metric.name), [], 'nothing left on the registry')
  const second = Fastify()
  t.teardown(() => second.close())
  await second.register(concurrencyLimit, { metrics: { registry } })
  await second.ready()
  t.equal(valueOf(await scrape(registry), `${P}limit`, { pool: 'default' }), 100)
})

t.test('two registrations on one registry need their own prefixes', async (t) => {
  const registry = new Registry()
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 7, metrics: { registry } })
  await t.rejects(async () => {
    await app.register(async (child) => {
      await child.register(concurrencyLimit, { metrics: { registry } })
    })
  }, {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /already has a metric named fastify_concurrency_limit_in_flight .*metrics\.prefix/
  })

  // Before either is ready (the histogram is made then), the names are taken already.
  const other = Fastify()
  t.teardown(() => other.close())
  await other.register(concurrencyLimit, { maxConcurrency: 9, metrics: { registry: new Registry() } })
  const shared = new Registry()
  const one = Fastify()
  const two = Fastify()
  t.teardown(() => one.close())
  t.teardown(() => two.close())
  await one.register(concurrencyLimit, { metrics: { registry: shared } })
  await t.rejects(async () => { await two.register(concurrencyLimit, { metrics: { registry: shared } }) }, { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION' })

  const both = new Registry()
  const root = Fastify()
  t.teardown(() => root.close())
  await root.register(concurrencyLimit, { maxConcurrency: 7, metrics: { registry: both } })
  await root.register(async (child) => {
    await child.register(concurrencyLimit, { maxConcurrency: 3, metrics: { registry: both, prefix: 'admin_concurrency_limit_' } })
    child.get('/admin', async () => 'admin')
  })
  await root.ready()
  const m = await scrape(both)
  t.equal(valueOf(m, `${P}limit`, { pool: 'default' }), 7)
  t.equal(valueOf(m, 'admin_concurrency_limit_limit', { pool: 'default' }), 3)
  t.equal((await root.inject('/admin')).statusCode, 200)
  t.equal(valueOf(await scrape(both), `${P}requests_total`, { pool: 'default', result: 'admitted' }), 1)
  t.equal(valueOf(await scrape(both), 'admin_concurrency_limit_requests_total', { pool: 'default', result: 'admitted' }), 1)
})

t.test('an adaptive pool shows the limit in force', async (t) => {
  const registry = new Registry()
  const app = await build(t, { adaptive: { initialConcurrency: 12 }, metrics: { registry } })
  await app.ready()
  const m = await scrape(registry)
  t.equal(valueOf(m, `${P}limit`, { pool: 'default' }), 12)
  t.equal(valueOf(m, `${P}max_queue`, { pool: 'default' }), 12, 'the queue follows the limit')
})

t.test('route pools get their own series', async (t) => {
  const registry = new Registry()
  const app = await build(t, { metrics: { registry } })
  app.get('/own', { config: { concurrencyLimit: { maxConcurrency: 4, queueTimeout: 2500 } } }, async () => 'own')
  t.equal((await app.inject('/own')).statusCode, 200)
  const m = await scrape(registry)
  t.equal(valueOf(m, `${P}limit`, { pool: 'GET /own' }), 4)
  t.equal(valueOf(m, `${P}requests_total`, { pool: 'GET /own', result: 'admitted' }), 1)
  t.equal(valueOf(m, `${P}queue_wait_seconds_bucket`, { pool: 'GET /own', le: '2.5' }), 0, 'its queueTimeout is a bucket')
})

t.test('prom-client\'s global registry works', async (t) => {
  const app = await build(t, { metrics: { registry: globalRegister } })
  await app.ready()
  t.equal(valueOf(parseExposition(await globalRegister.metrics()), `${P}limit`, { pool: 'default' }), 100)
})

t.test('connections: open and refused, as the guard counts them', async (t) => {
  const registry = new Registry()
  const app = await build(t, { maxConnections: 1, metrics: { registry } })
  app.get('/', async () => 'ok')
  const url = await listen(app)
  const kept = new Client(url)
  t.teardown(() => kept.destroy())
  t.equal((await get(kept, '/')).statusCode, 200)
  const refused = new Client(url)
  t.teardown(() => refused.destroy())
  t.equal((await get(refused, '/')).statusCode, 503)
  const m = await scrape(registry)
  const connections = app.concurrencyLimit.connections()
  t.match(connections, { open: 1, refused: 1 })
  t.equal(m.types.get(`${P}connections_open`), 'gauge')
  t.equal(m.types.get(`${P}connections_refused_total`), 'counter')
  t.equal(valueOf(m, `${P}connections_open`), connections?.open)
  t.equal(valueOf(m, `${P}connections_refused_total`), connections?.refused)
})

t.test('invalid metrics options are refused with a code', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    [true, /metrics must be an object \(\{ registry, prefix\? \}\), received true/],
    [{}, /metrics\.registry must be a prom-client Registry .*received undefined/],
    [{ registry: await import('prom-client') }, /metrics\.registry must be a prom-client Registry .*received an object without its methods/],
    [{ registry: 'default' }, /metrics\.registry must be a prom-client Registry .*received "default"/],
    [{ registry: new Registry(), prefix: '1abc_' }, /metrics\.prefix must be the start of a Prometheus metric name .*received "1abc_"/],
    [{ registry: new Registry(), prefix: 'my-app_' }, /metrics\.prefix .*received "my-app_"/],
    [{ registry: new Registry(), prefixe: 'x_' }, /metrics\.prefixe is not an option \(expected one of registry, prefix\)/]
  ]
  for (const [metrics, message] of cases) {
    const app = Fastify()
    await t.rejects(async () => { await app.register(concurrencyLimit, { metrics } as never) }, { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message }, String(message))
    await app.close()
  }
})

t.test('loading prom-client', async (t) => {
  t.ok((await loadPromClient()).Histogram, 'the installed one loads')
  await t.rejects(loadPromClient('prom-client-that-is-not-installed'), {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /metrics needs prom-client >= 15, which is not installed: npm install prom-client/
  })
  await t.rejects(loadPromClient('data:text/javascript,export const Gauge = 1'), {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /does not export its Gauge, Counter and Histogram/
  })
  // A failure inside prom-client is not reported as prom-client missing.
  const dir = t.testdir({ 'broken.mjs': 'import "no-such-dependency"\n' })
  await t.rejects(loadPromClient(pathToFileURL(join(dir, 'broken.mjs')).href), { message: /Cannot find package 'no-such-dependency'/ })
  await t.rejects(loadPromClient('data:text/javascript,throw new RangeError("broken")'), RangeError)
})

t.test('requests of each priority class are counted by result', async (t) => {
  const registry = new Registry()
  const gate = new Gauge()
  const app = await build(t, { maxConcurrency: 1, maxQueue: 1, rejectDelay: 0, metrics: { registry } })
  app.get('/checkout', { config: { concurrencyLimit: { priority: 'critical' } } }, async () => {
    gate.enter()
    await gate.wait()
    return 'ok'
  })
  app.get('/prefetch', { config: { concurrencyLimit: { priority: 'sheddable' } } }, async () => 'ok')
  const url = await listen(app)
  const pool = client(t, url)
  const priority = async (): Promise<Record<string, number | undefined>> => {
    const m = await scrape(registry)
    const out: Record<string, number | undefined> = {}
    for (const level of ['critical', 'normal', 'sheddable']) {
      for (const result of ['admitted', 'rejected']) {
        out[`${level} ${result}`] = valueOf(m, `${P}priority_requests_total`, { pool: 'default', priority: level, result })
      }
    }
    return out
  }
  t.same(await priority(), {
    'critical admitted': 0, 'critical rejected': 0, 'normal admitted': 0, 'normal rejected': 0, 'sheddable admitted': 0, 'sheddable rejected': 0
  }, 'every class is there at zero')

  // A critical request holds the slot; a prefetch waits, and gives way to a second checkout.
  const a = get(pool, '/checkout')
  await waitFor(() => gate.current === 1, 2000, 'the first checkout in its handler')
  const b = get(pool, '/prefetch')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1, 2000, 'the prefetch queued')
  const c = get(pool, '/checkout')
  t.equal((await b).statusCode, 503, 'the prefetch made room')
  t.equal((await get(pool, '/prefetch')).statusCode, 503, 'a prefetch finds the queue full of a critical waiter')
  gate.open()
  t.equal((await a).statusCode, 200)
  t.equal((await c).statusCode, 200)
  t.same(await priority(), {
    'critical admitted': 2, 'critical rejected': 0, 'normal admitted': 0, 'normal rejected': 0, 'sheddable admitted': 0, 'sheddable rejected': 2
  })
  t.same(app.concurrencyLimit.stats().priority, { critical: { admitted: 2, rejected: 0 }, normal: { admitted: 0, rejected: 0 }, sheddable: { admitted: 0, rejected: 2 } },
    'the same as stats()')
})
