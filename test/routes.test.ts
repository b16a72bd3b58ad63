import t from 'tap'
import { build, listen, client, get, waitFor, Gauge, sleep } from './helpers/server.js'
import type { Pool } from 'undici'
import type { FastifyInstance } from 'fastify'
import type { HookName } from '../lib/index.js'

// Fires `count` requests at `path` while every handler waits on the gauge,
// then reports how many ran at once and how were the rest answered.
async function burst (app: FastifyInstance, pool: Pool, gauge: Gauge, path: string, count: number) {
  gauge.close()
  let refusedEarly = 0
  const answers = Array.from({ length: count }, () => get(pool, path).then((answer) => {
    if (answer.statusCode === 503) refusedEarly++
    return answer
  }))
  // Every request has arrived once each one either runs or was refused: on a
  // busy machine that can take longer than any fixed pause.
  const queued = (): number => app.concurrencyLimit.pools().reduce((n, p) => n + p.queued, 0)
  await waitFor(() => gauge.current + refusedEarly + queued() === count, 5000, `${path}: every request to run or be refused`)
  await sleep(20)
  const running = gauge.current
  gauge.open()
  const statuses = (await Promise.all(answers)).map((a) => a.statusCode)
  return { running, ok: statuses.filter((s) => s === 200).length, refused: statuses.filter((s) => s === 503).length }
}

function holding (gauge: Gauge) {
  return async () => {
    gauge.enter()
    await gauge.wait()
    gauge.leave()
    return 'x'
  }
}

t.test('a route with its own limits gets its own pool; false is never limited', async (t) => {
  const app = await build(t, { maxConcurrency: 3, maxQueue: 0 })
  const gauge = new Gauge()
  app.get('/default', holding(gauge))
  app.get('/report', { config: { concurrencyLimit: { maxConcurrency: 2, maxQueue: 1 } } }, holding(gauge))
  app.get('/healthz', { config: { concurrencyLimit: false } }, holding(gauge))
  app.get('/explicit', { config: { concurrencyLimit: true } }, holding(gauge))
  const pool = client(t, await listen(app))

  t.match(await burst(app, pool, gauge, '/default', 5), { running: 3, ok: 3, refused: 2 })
  t.match(await burst(app, pool, gauge, '/report', 5), { running: 2, ok: 3, refused: 2 })
  t.match(await burst(app, pool, gauge, '/healthz', 8), { running: 8, ok: 8, refused: 0 })
  t.match(await burst(app, pool, gauge, '/explicit', 5), { running: 3, ok: 3, refused: 2 }, 'true = the plugin pool')

  const names = app.concurrencyLimit.pools().map((p) => p.name)
  t.same(names, ['default', 'GET /report'])
  t.match(app.concurrencyLimit.stats('GET /report'), { maxConcurrency: 2, maxQueue: 1, queueTimeout: 1000, admitted: 3, completed: 3 })
  t.match(app.concurrencyLimit.stats(), { admitted: 6, completed: 6 })
  t.throws(() => app.concurrencyLimit.stats('nope'), { code: 'FST_CONCURRENCY_LIMIT_UNKNOWN_POOL', message: 'No concurrency-limit pool is named "nope"' })
})

t.test('a route pool takes unset settings from the plugin options', async (t) => {
  const app = await build(t, { maxQueue: 7, queueTimeout: 250 })
  app.get('/a', { config: { concurrencyLimit: { maxConcurrency: 2 } } }, async () => 'x')
  app.get('/b', { config: { concurrencyLimit: { queueTimeout: 10 } } }, async () => 'x')
  await app.ready()
  t.match(app.concurrencyLimit.stats('GET /a'), { maxConcurrency: 2, maxQueue: 7, queueTimeout: 250 })
  t.match(app.concurrencyLimit.stats('GET /b'), { maxConcurrency: 100, maxQueue: 7, queueTimeout: 10 })
  t.match(app.concurrencyLimit.stats(), { maxConcurrency: 100, maxQueue: 7, queueTimeout: 250 })
})

t.test('maxQueue defaults to the pool maxConcurrency', async (t) => {
  const app = await build(t, { maxConcurrency: 5 })
  app.get('/a', { config: { concurrencyLimit: { maxConcurrency: 2 } } }, async () => 'x')
  await app.ready()
  t.match(app.concurrencyLimit.stats(), { maxConcurrency: 5, maxQueue: 5, queueTimeout: 1000 })
  t.match(app.concurrencyLimit.stats('GET /a'), { maxConcurrency: 2, maxQueue: 2 })
})

t.test('a GET route shares its pool with its automatic HEAD route', async (t) => {
  const app = await build(t, { maxQueue: 0 })
  const gauge = new Gauge()
  app.get('/doc', { config: { concurrencyLimit: { maxConcurrency: 1 } } }, holding(gauge))
  const pool = client(t, await listen(app))
  gauge.close()
  const first = get(pool, '/doc')
  await waitFor(() => gauge.current === 1)
  const head = await pool.request({ path: '/doc', method: 'HEAD' })
  await head.body.dump()
  t.equal(head.statusCode, 503, 'HEAD is refused by the same pool')
  gauge.open()
  await first
  t.same(app.concurrencyLimit.pools().map((p) => p.name), ['default', 'GET /doc'])
})

t.test('routes sharing one config object share a pool; a name in use gets a suffix', async (t) => {
  const app = await build(t)
  const shared = { concurrencyLimit: { maxConcurrency: 2 } }
  app.post('/x', { config: shared }, async () => 'x')
  app.put('/x', { config: shared }, async () => 'x')
  app.route({ method: ['PATCH', 'DELETE'], url: '/y', config: { concurrencyLimit: { maxConcurrency: 3 } }, handler: async () => 'x' })
  // The same method and path on another host: the pool name is taken.
  app.post('/x', { constraints: { host: 'other.example' }, config: { concurrencyLimit: { maxConcurrency: 4 } } }, async () => 'x')
  await app.ready()
  t.same(app.concurrencyLimit.pools().map((p) => p.name), ['default', 'POST /x', 'PATCH,DELETE /y', 'POST /x (2)'])
})

t.test('groups: routes naming a group share it, defined in options or on the first route', async (t) => {
  const app = await build(t, { maxQueue: 0, groups: { reports: { maxConcurrency: 2 } } })
  const gauge = new Gauge()
  app.get('/r1', { config: { concurrencyLimit: { group: 'reports' } } }, holding(gauge))
  app.get('/r2', { config: { concurrencyLimit: { group: 'reports', maxConcurrency: 2 } } }, holding(gauge))
  app.get('/e1', { config: { concurrencyLimit: { group: 'exports', maxConcurrency: 1 } } }, holding(gauge))
  app.get('/e2', { config: { concurrencyLimit: { group: 'exports' } } }, holding(gauge))
  app.get('/d', { config: { concurrencyLimit: { group: 'default' } } }, async () => 'x')
  const pool = client(t, await listen(app))
  gauge.close()
  const answers = [get(pool, '/r1'), get(pool, '/r2'), get(pool, '/e1')]
  await waitFor(() => gauge.current === 3)
  t.equal((await get(pool, '/r1')).statusCode, 503, 'reports is full')
  t.equal((await get(pool, '/r2')).statusCode, 503)
  t.equal((await get(pool, '/e2')).statusCode, 503, 'exports is full')
  t.equal((await get(pool, '/d')).statusCode, 200, 'group "default" is the plugin pool, which has room')
  t.equal(app.concurrencyLimit.stats().admitted, 1)
  gauge.open()
  await Promise.all(answers)
  t.same(app.concurrencyLimit.pools().map((p) => p.name), ['default', 'reports', 'exports'])
  t.match(app.concurrencyLimit.stats('reports'), { maxConcurrency: 2, admitted: 2, rejected: { queueFull: 2 } })
  t.match(app.concurrencyLimit.stats('exports'), { maxConcurrency: 1, admitted: 1, rejected: { queueFull: 1 } })
})

t.test('a route naming a group that does not exist, without limits, is an error (a typo is not a default)', async (t) => {
  const app = await build(t, { groups: { exports: { maxConcurrency: 1 } } })
  t.throws(() => app.get('/pdf', { config: { concurrencyLimit: { group: 'export' } } }, async () => 'x'), {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /route GET \/pdf: config.concurrencyLimit.group "export" is not defined; define it in the groups option \(defined: exports\), or give the route its limits/
  })
  const bare = await build(t)
  t.throws(() => bare.get('/pdf', { config: { concurrencyLimit: { group: 'export' } } }, async () => 'x'), {
    message: /group "export" is not defined; define it in the groups option, or give/
  })
})

t.test('routes that share one config constant get a pool each', async (t) => {
  const app = await build(t, { rejectDelay: 0 })
  const heavy = { maxConcurrency: 1, maxQueue: 0 }
  const gauge = new Gauge()
  app.get('/a', { config: { concurrencyLimit: heavy } }, holding(gauge))
  app.get('/b', { config: { concurrencyLimit: heavy } }, holding(gauge))
  const pool = client(t, await listen(app))
  gauge.close()
  const answers = [get(pool, '/a'), get(pool, '/b')]
  await waitFor(() => gauge.current === 2, 2000, 'both routes to run at once')
  gauge.open()
  t.same((await Promise.all(answers)).map((a) => a.statusCode), [200, 200])
  t.match(app.concurrencyLimit.stats('GET /a'), { admitted: 1, maxConcurrency: 1 })
  t.match(app.concurrencyLimit.stats('GET /b'), { admitted: 1, maxConcurrency: 1 })
})

t.test('a route that sets other limits for an existing group is an error', async (t) => {
  const app = await build(t, { groups: { reports: { maxConcurrency: 2 } } })
  t.throws(() => app.get('/r', { config: { concurrencyLimit: { group: 'reports', maxConcurrency: 3 } } }, async () => 'x'), {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /route GET \/r: config.concurrencyLimit sets other limits for group "reports"/
  })
})

t.test('global: false limits only the routes that ask', async (t) => {
  const app = await build(t, { global: false, maxConcurrency: 1, maxQueue: 0 })
  const gauge = new Gauge()
  app.get('/free', holding(gauge))
  app.get('/limited', { config: { concurrencyLimit: true } }, holding(gauge))
  app.get('/own', { config: { concurrencyLimit: { maxConcurrency: 2 } } }, holding(gauge))
  const pool = client(t, await listen(app))
  t.match(await burst(app, pool, gauge, '/free', 4), { running: 4, refused: 0 })
  t.match(await burst(app, pool, gauge, '/limited', 4), { running: 1, refused: 3 })
  t.match(await burst(app, pool, gauge, '/own', 4), { running: 2, refused: 2 })
})

t.test('routes registered in child plugins and with prefixes are limited', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  const gauge = new Gauge()
  await app.register(async (child) => {
    child.get('/', holding(gauge))
    child.get('/inner', holding(gauge))
  }, { prefix: '/api' })
  const pool = client(t, await listen(app))
  t.match(await burst(app, pool, gauge, '/api/inner', 3), { running: 1, refused: 2 })
  t.match(await burst(app, pool, gauge, '/api', 3), { running: 1, refused: 2 })
  t.match(await burst(app, pool, gauge, '/api/', 3), { running: 1, refused: 2 })
})

for (const hook of ['onRequest', 'preParsing', 'preValidation', 'preHandler'] as HookName[]) {
  t.test(`hook: ${hook} admits at that stage`, async (t) => {
    const app = await build(t, { maxConcurrency: 1, maxQueue: 1, queueTimeout: 5000, hook })
    const gauge = new Gauge()
    const stages: string[] = []
    app.addHook('onRequest', async (request) => { stages.push(`onRequest ${request.url}`) })
    app.addHook('preParsing', async (request) => { stages.push(`preParsing ${request.url}`) })
    app.addHook('preValidation', async (request) => { stages.push(`preValidation ${request.url}`) })
    app.addHook('preHandler', async (request) => { stages.push(`preHandler ${request.url}`) })
    app.post('/a', async (request) => { gauge.enter(); await gauge.wait(); gauge.leave(); return request.body })
    app.post('/b', async (request) => request.body)
    const pool = client(t, await listen(app))
    gauge.close()
    const a = pool.request({ path: '/a', method: 'POST', body: '{"n":1}', headers: { 'content-type': 'application/json' } })
    await waitFor(() => gauge.current === 1)
    const b = pool.request({ path: '/b', method: 'POST', body: '{"n":2}', headers: { 'content-type': 'application/json' } })
    await waitFor(() => app.concurrencyLimit.stats().queued === 1)
    const order = ['onRequest', 'preParsing', 'preValidation', 'preHandler']
    const reached = stages.filter((s) => s.endsWith('/b')).map((s) => s.split(' ')[0])
    t.same(reached, order.slice(0, order.indexOf(hook) + 1), `the queued request stopped at ${hook}`)
    const c = await pool.request({ path: '/b', method: 'POST', body: '{"n":3}', headers: { 'content-type': 'application/json' } })
    t.equal(c.statusCode, 503, `a third is refused at ${hook}`)
    await c.body.dump()
    gauge.open()
    t.same(await (await a).body.json(), { n: 1 })
    t.same(await (await b).body.json(), { n: 2 }, 'and went on with its body intact')
    t.match(app.concurrencyLimit.stats(), { inFlight: 0, admitted: 2, completed: 2, rejected: { queueFull: 1 } })
  })
}

t.test('a route can choose its own hook', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  let parsed = 0
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => { parsed++; done(null, JSON.parse(body as string)) })
  const gauge = new Gauge()
  app.post('/early', holding(gauge))
  app.post('/late', { config: { concurrencyLimit: { hook: 'preHandler' } } }, async () => 'x')
  const pool = client(t, await listen(app))
  gauge.close()
  const held = pool.request({ path: '/early', method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } })
  await waitFor(() => gauge.current === 1)
  t.equal(parsed, 1)
  const late = await pool.request({ path: '/late', method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } })
  t.equal(late.statusCode, 503)
  await late.body.dump()
  t.equal(parsed, 2, 'refused at preHandler: after its body was parsed')
  const early = await pool.request({ path: '/early', method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } })
  t.equal(early.statusCode, 503)
  await early.body.dump()
  t.equal(parsed, 2, 'refused at preParsing (the default): before its body was read')
  gauge.open()
  await (await held).body.dump()
})

t.test("a route's own hooks of the admission stage run after admission; onRequest hooks before it", async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  let ownHookRan = 0
  let authRan = 0
  const gauge = new Gauge()
  app.get('/a', { preParsing: [async () => { ownHookRan++ }], onRequest: async () => { authRan++ } }, holding(gauge))
  app.get('/b', { preParsing: async () => { ownHookRan++ } }, async () => 'x')
  const pool = client(t, await listen(app))
  gauge.close()
  const held = get(pool, '/a')
  await waitFor(() => gauge.current === 1)
  t.equal((await get(pool, '/a')).statusCode, 503)
  t.equal(ownHookRan, 1, 'the refused request did not run the route hook')
  t.equal(authRan, 2, 'a per-request check in onRequest ran before the refusal')
  gauge.open()
  await held
  t.equal((await get(pool, '/b')).statusCode, 200)
  t.equal(ownHookRan, 2)
})
