import t, { type Test } from 'tap'
import { connect as netConnect, type Socket } from 'node:net'
import { connect as h2connect } from 'node:http2'
import { Writable } from 'node:stream'
import Fastify, { type FastifyInstance } from 'fastify'
import { Client } from 'undici'
import concurrencyLimit, { type ConcurrencyLimitDecorator } from '../lib/index.js'
import { build, listen, client, get, waitFor, sleep, Gauge } from './helpers/server.js'

// Ways a request can end that the response's own 'close' does not cover:
// pipelined requests of a client that leaves, HTTP/2 streams reset before
// admission, and a request that passes through two registrations.

async function drained (t: Test, app: { concurrencyLimit: ConcurrencyLimitDecorator }, pool = 'default'): Promise<void> {
  await waitFor(() => app.concurrencyLimit.stats(pool).inFlight === 0 && app.concurrencyLimit.stats(pool).queued === 0, 2000, `${pool} to drain`)
  await sleep(20) // room for a wrong second release to show
  const stats = app.concurrencyLimit.stats(pool)
  t.equal(stats.inFlight, 0, `${pool}: nothing in flight`)
  t.equal(stats.queued, 0, `${pool}: nothing queued`)
  t.equal(stats.completed, stats.admitted, `${pool}: every admission released once`)
}

function rawSocket (origin: string): Promise<Socket> {
  const { hostname, port } = new URL(origin)
  return new Promise((resolve, reject) => {
    const socket = netConnect(Number(port), hostname, () => resolve(socket))
    socket.on('error', reject)
  })
}

const pipelined = (...paths: string[]): string => paths.map((p) => `GET ${p} HTTP/1.1\r\nHost: x\r\n\r\n`).join('')

t.test('HTTP/1.1 pipelining: a connection holds one slot at a time; requests waiting their turn leave with their client', async (t) => {
  const app = await build(t, { maxConcurrency: 3, maxQueue: 0 })
  const gauge = new Gauge()
  const ran: string[] = []
  app.get('/slow', async () => { ran.push('slow'); await gauge.wait(); return 'slow' })
  app.get('/fast', async () => { ran.push('fast'); return 'fast' })
  const origin = await listen(app)

  // In turn: each request asks for its slot when the one ahead is answered.
  const served = await rawSocket(origin)
  let received = ''
  served.setEncoding('latin1')
  served.on('data', (chunk: string) => { received += chunk })
  served.write(pipelined('/slow', '/fast', '/fast'))
  await waitFor(() => ran.length === 1)
  await sleep(30)
  t.same(app.concurrencyLimit.stats().inFlight, 1, 'the requests behind /slow take no slot yet')
  gauge.open()
  await waitFor(() => (received.match(/HTTP\/1\.1 200/g) ?? []).length === 3, 2000, 'three answers')
  t.same(ran, ['slow', 'fast', 'fast'])
  t.equal(app.concurrencyLimit.stats().peakInFlight, 1, 'never more than one slot for the connection')
  served.destroy()

  // The client leaves: the requests waiting their turn never run.
  gauge.close()
  ran.length = 0
  const leaving = await rawSocket(origin)
  leaving.write(pipelined('/slow', '/fast', '/fast'))
  await waitFor(() => ran.length === 1)
  leaving.destroy()
  await sleep(30)
  gauge.open()
  await drained(t, app)
  t.same(ran, ['slow'], 'no request of the client that left ran after it')
  const pool = client(t, origin)
  const statuses = await Promise.all([1, 2, 3].map(async () => (await get(pool, '/fast')).statusCode))
  t.same(statuses, [200, 200, 200], 'the whole pool is free again')
})

t.test('HTTP/1.1 pipelining: a request waiting its turn whose response also says it closed (as Node 24 does) ends once', async (t) => {
  const app = await build(t, { maxConcurrency: 2, maxQueue: 0 })
  const gauge = new Gauge()
  const waiting: Array<{ emit: (event: string) => boolean }> = []
  app.addHook('onRequest', async (request, reply) => { if (request.url === '/fast') waiting.push(reply.raw) })
  app.get('/slow', async () => { await gauge.wait(); return 'slow' })
  app.get('/fast', async () => 'fast')
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  socket.write(pipelined('/slow', '/fast', '/fast'))
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 1 && waiting.length === 2)
  socket.destroy()
  await sleep(30) // the server sees the client leave before /slow answers
  gauge.open()
  await drained(t, app)
  const before = app.concurrencyLimit.stats()
  // Node 20 and 22 emit nothing more for these responses: the socket's
  // 'close' ended their tickets. Node 24 emits each one's 'close' as well.
  for (const res of waiting) res.emit('close')
  await sleep(20)
  const after = app.concurrencyLimit.stats()
  t.same([after.inFlight, after.queued, after.admitted, after.completed, after.abandoned], [before.inFlight, before.queued, before.admitted, before.completed, before.abandoned], 'a second ending signal changes nothing')
  t.equal(after.admitted, 1, 'only /slow was admitted')
  const statuses = await Promise.all([1, 2].map(async () => (await get(client(t, origin), '/fast')).statusCode))
  t.same(statuses, [200, 200], 'both slots are free')
})

t.test('HTTP/1.1 pipelining behind an exempt route cannot lock the pool', async (t) => {
  const app = await build(t, { maxConcurrency: 2, maxQueue: 0, queueTimeout: 100 })
  const gauge = new Gauge()
  let limitedRan = 0
  app.get('/exempt', { config: { concurrencyLimit: false } }, async () => { gauge.enter(); await gauge.wait(); return 'x' })
  app.get('/limited', async () => { limitedRan++; return 'limited' })
  const origin = await listen(app)
  for (let i = 0; i < 2; i++) {
    const socket = await rawSocket(origin)
    socket.write(pipelined('/exempt', '/limited'))
    await waitFor(() => gauge.current === i + 1, 2000, 'the exempt request to run')
    await sleep(20)
    socket.destroy()
  }
  await drained(t, app)
  t.equal(app.concurrencyLimit.stats().admitted, 0, 'the limited requests never took a slot')
  t.equal(limitedRan, 0)
  const pool = client(t, origin)
  t.equal((await get(pool, '/limited')).statusCode, 200, 'an idle server serves')
  gauge.open()
})

t.test('HTTP/1.1 pipelining: one connection cannot fill the pool or its queue', async (t) => {
  const app = await build(t, { maxConcurrency: 4, maxQueue: 4, queueTimeout: 1000, rejectDelay: 0 })
  const gauge = new Gauge()
  let fastRan = 0
  app.get('/fast', async () => { fastRan++; return 'fast' })
  app.get('/report', { config: { concurrencyLimit: { maxConcurrency: 1, maxQueue: 0 } } }, async () => { await gauge.wait(); return 'report' })
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  socket.on('data', () => {})
  socket.write(pipelined('/report', ...Array<string>(8).fill('/fast')))
  await waitFor(() => app.concurrencyLimit.stats('GET /report').inFlight === 1)
  await sleep(50)
  t.match(app.concurrencyLimit.stats(), { inFlight: 0, queued: 0 }, 'the requests behind the report hold nothing')
  const pool = client(t, origin)
  const others = await Promise.all([1, 2, 3].map(async () => (await get(pool, '/fast')).statusCode))
  t.same(others, [200, 200, 200], 'other clients are served meanwhile')
  t.equal(fastRan, 3)
  gauge.open()
  await waitFor(() => fastRan === 11, 2000, 'the pipelined requests, in turn')
  socket.destroy()
  await drained(t, app)
})

t.test('HTTP/1.1 pipelining: a request behind one that waits in a slow hook is not starved by it', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 10, queueTimeout: 2000 })
  // Stands for an auth lookup that takes longer for the first request.
  app.addHook('onRequest', async (request) => { await sleep(Number(request.headers['x-auth-ms'] ?? 0)) })
  app.get('/a', async () => 'a')
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  let received = ''
  socket.setEncoding('latin1')
  socket.on('data', (chunk: string) => { received += chunk })
  const started = Date.now()
  socket.write('GET /a HTTP/1.1\r\nHost: x\r\nx-auth-ms: 50\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n')
  await waitFor(() => (received.match(/HTTP\/1\.1 \d+/g) ?? []).length === 2, 1500, 'two answers')
  t.same(received.match(/HTTP\/1\.1 \d+/g), ['HTTP/1.1 200', 'HTTP/1.1 200'])
  t.ok(Date.now() - started < 1000, 'both answered without waiting out a queue timeout')
  socket.destroy()
  await drained(t, app)
})

t.test('HTTP/1.1 pipelining: a request refused at its turn gets its 503 then; one whose client left at its turn takes nothing', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0, rejectDelay: 0 })
  const gauge = new Gauge()
  let limitedRan = 0
  app.get('/exempt', { config: { concurrencyLimit: false } }, async () => { await sleep(30); return 'x' })
  app.get('/held', async () => { gauge.enter(); await gauge.wait(); return 'held' })
  app.get('/limited', async () => { limitedRan++; return 'limited' })
  // Destroys the connection the moment its response is written: the request
  // behind it gets its turn on a connection that is gone.
  app.get('/last-words', { config: { concurrencyLimit: false } }, async (request, reply) => {
    reply.raw.on('finish', () => request.raw.socket.destroy())
    return 'bye'
  })
  const origin = await listen(app)
  const pool = client(t, origin)
  const held = get(pool, '/held')
  await waitFor(() => gauge.current === 1)

  const socket = await rawSocket(origin)
  let received = ''
  socket.setEncoding('latin1')
  socket.on('data', (chunk: string) => { received += chunk })
  socket.write(pipelined('/exempt', '/limited'))
  await waitFor(() => (received.match(/HTTP\/1\.1 \d+/g) ?? []).length === 2, 2000, 'two answers')
  t.same(received.match(/HTTP\/1\.1 \d+/g), ['HTTP/1.1 200', 'HTTP/1.1 503'], 'refused at its turn: the pool was full')
  t.match(received, /FST_CONCURRENCY_LIMIT_QUEUE_FULL/)
  socket.destroy()
  gauge.open()
  await held

  const leaving = await rawSocket(origin)
  leaving.on('data', () => {})
  leaving.write(pipelined('/last-words', '/limited'))
  await new Promise((resolve) => leaving.once('close', resolve))
  await sleep(30)
  t.equal(limitedRan, 0, 'the request behind never ran')
  await drained(t, app)
  t.equal(app.concurrencyLimit.stats().admitted, 1, 'only /held took a slot')
})

t.test('HTTP/1.1 pipelining: a request admitted at arrival but refused at its turn, when the pool filled meanwhile', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0, rejectDelay: 0 })
  const exempt = new Gauge()
  const held = new Gauge()
  let limitedRan = 0
  app.get('/exempt', { config: { concurrencyLimit: false } }, async () => { exempt.enter(); await exempt.wait(); return 'x' })
  app.get('/held', async () => { held.enter(); await held.wait(); return 'held' })
  app.get('/limited', async () => { limitedRan++; return 'limited' })
  const origin = await listen(app)
  const pool = client(t, origin)

  const socket = await rawSocket(origin)
  let received = ''
  socket.setEncoding('latin1')
  socket.on('data', (chunk: string) => { received += chunk })
  socket.write(pipelined('/exempt', '/limited'))
  await waitFor(() => exempt.current === 1, 2000, '/exempt in its handler')
  // /limited arrived with the pool free: it waits its turn behind /exempt.
  await new Promise((resolve) => setImmediate(resolve))
  const first = get(pool, '/held')
  await waitFor(() => held.current === 1, 2000, '/held took the only slot')
  t.match(app.concurrencyLimit.stats(), { inFlight: 1, rejected: { queueFull: 0 } }, 'nothing refused yet: /limited was let through at arrival')
  exempt.open()
  await waitFor(() => (received.match(/HTTP\/1\.1 \d+/g) ?? []).length === 2, 2000, 'two answers')
  t.same(received.match(/HTTP\/1\.1 \d+/g), ['HTTP/1.1 200', 'HTTP/1.1 503'], 'refused at its turn: the pool had filled')
  t.match(received, /FST_CONCURRENCY_LIMIT_QUEUE_FULL/)
  t.equal(limitedRan, 0)
  t.match(app.concurrencyLimit.stats(), { rejected: { queueFull: 1 } })
  socket.destroy()
  held.open()
  t.equal((await first).statusCode, 200)
  await drained(t, app)
  t.equal(app.concurrencyLimit.stats().admitted, 1, 'only /held took a slot')
})

t.test('undici Client with pipelining, destroyed with requests in flight, leaks nothing', async (t) => {
  const app = await build(t, { maxConcurrency: 4, maxQueue: 4, queueTimeout: 5000 })
  app.get('/work', async (request) => {
    await sleep(Number((request.query as { ms: string }).ms))
    return 'done'
  })
  const origin = await listen(app)
  let admitted = 0
  for (let round = 0; round < 5; round++) {
    const c = new Client(origin, { pipelining: 4 })
    // blocking: false lets undici send the next request before this one's headers.
    const pending = [300, 1, 1, 1].map((ms) => c.request({ path: `/work?ms=${ms}`, method: 'GET', blocking: false }).then((r) => r.body.dump(), () => {}))
    admitted += 1
    await waitFor(() => app.concurrencyLimit.stats().admitted === admitted, 2000, 'the first request to be admitted')
    await sleep(10)
    t.equal(app.concurrencyLimit.stats().inFlight, 1, 'the requests behind the first wait their turn')
    await c.destroy()
    await Promise.all(pending)
    // The first handler runs on after its client left, then all is back.
    await waitFor(() => app.concurrencyLimit.stats().inFlight === 0, 2000, 'the round to drain')
  }
  // The 300 ms handlers run on after their client left: then all is back.
  t.equal(app.concurrencyLimit.stats().admitted, 5, 'only the first of each round took a slot')
})

t.test('HTTP/2: a stream reset during an earlier async hook takes no slot and runs no handler', async (t) => {
  const app = Fastify({ http2: true, forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0 })
  let hookEntered = 0
  // An instance-level hook (an auth lookup, say) runs before the plugin's route-level one.
  app.addHook('onRequest', async () => { hookEntered++; await sleep(100) })
  let ran = 0
  app.get('/work', async () => { ran++; return 'done' })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const session = h2connect(`http://127.0.0.1:${port}`)
  t.teardown(() => session.close())
  const stream = session.request({ ':path': '/work' })
  stream.on('error', () => {})
  stream.end()
  await waitFor(() => hookEntered === 1)
  stream.close(0x8) // RST_STREAM CANCEL while the earlier hook waits
  await sleep(200)
  t.equal(ran, 0, 'the handler never ran')
  t.match(app.concurrencyLimit.stats(), { inFlight: 0, admitted: 0 }, 'no slot was taken')
  const next = await new Promise<number>((resolve, reject) => {
    const s = session.request({ ':path': '/work' })
    s.on('response', (h) => resolve(Number(h[':status'])))
    s.on('error', reject)
    s.resume()
    s.end()
  })
  t.equal(next, 200, 'the next request is served')
  await drained(t, app)
})

t.test('HTTP/2: a session destroyed with admitted and queued streams releases them all', async (t) => {
  const app = Fastify({ http2: true, forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 2, maxQueue: 4, queueTimeout: 5000 })
  const gauge = new Gauge()
  app.get('/work', async () => { await gauge.wait(); return 'done' })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const session = h2connect(`http://127.0.0.1:${port}`)
  session.on('error', () => {})
  for (let i = 0; i < 5; i++) {
    const s = session.request({ ':path': '/work' })
    s.on('error', () => {})
    s.end()
  }
  await waitFor(() => app.concurrencyLimit.stats().queued === 3, 2000, 'two admitted, three queued')
  session.destroy()
  await waitFor(() => app.concurrencyLimit.stats().queued === 0, 1000, 'the queue to empty')
  gauge.open()
  await drained(t, app)
  t.equal(app.concurrencyLimit.stats().abandoned, 3)
})

t.test('registered at the root and again in a child: each registration limits and releases', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 3, maxQueue: 0 })
  const gauge = new Gauge()
  let child!: FastifyInstance
  await app.register(async (instance) => {
    await instance.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0 })
    instance.get('/child', async () => { await gauge.wait(); return 'child' })
    child = instance
  })
  app.get('/root', async () => { await gauge.wait(); return 'root' })
  const pool = client(t, await listen(app))
  gauge.open()
  const sequential: number[] = []
  for (let i = 0; i < 4; i++) sequential.push((await get(pool, '/child')).statusCode)
  t.same(sequential, [200, 200, 200, 200], 'one request after another is always served')
  await drained(t, app)
  await drained(t, child)
  t.equal(child.concurrencyLimit.stats().admitted, 4, 'the child pool counted each request')
  t.equal(app.concurrencyLimit.stats().admitted, 4, 'the root pool counted each request too')

  gauge.close()
  const first = get(pool, '/child')
  await waitFor(() => gauge.current === 1 || child.concurrencyLimit.stats().inFlight === 1)
  const refused = await get(pool, '/child')
  t.equal(refused.statusCode, 503, 'the child limit of 1 holds')
  const roots = [get(pool, '/root'), get(pool, '/root')]
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 3, 2000, 'the root pool to fill')
  t.equal((await get(pool, '/root')).statusCode, 503, 'the root limit of 3 covers the child route too')
  gauge.open()
  t.same((await Promise.all([first, ...roots])).map((a) => a.statusCode), [200, 200, 200])
  await drained(t, app)
  await drained(t, child)
})

t.test('registered twice on the same instance: refused with a code', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(concurrencyLimit)
  await t.rejects(async () => { await app.register(concurrencyLimit) }, {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /registered twice on the same instance/
  })
})

function logLines (): { stream: Writable, lines: Array<{ level: number, msg: string }> } {
  const lines: Array<{ level: number, msg: string }> = []
  const stream = new Writable({
    write (chunk, _enc, cb) {
      lines.push(JSON.parse(String(chunk)))
      cb()
    }
  })
  return { stream, lines }
}

t.test('registered without await after the routes: one warning, not silence', async (t) => {
  const { stream, lines } = logLines()
  const app = Fastify({ logger: { level: 'warn', stream } })
  t.teardown(() => app.close())
  // Both mistakes at once: no await, routes added before the plugin runs.
  app.register(concurrencyLimit, { maxConcurrency: 1 })
  app.get('/a', async () => 'a')
  await app.ready()
  const warnings = lines.filter((l) => l.level === 40 && /limits no route/.test(l.msg))
  t.equal(warnings.length, 1, 'one warning')
  t.match(warnings[0].msg, /await fastify\.register/, 'it says how to fix it')
  t.equal(app.concurrencyLimit.stats().admitted, 0)

  const quiet = logLines()
  const ok = Fastify({ logger: { level: 'warn', stream: quiet.stream } })
  t.teardown(() => ok.close())
  await ok.register(concurrencyLimit)
  ok.get('/a', async () => 'a')
  await ok.ready()
  const empty = Fastify({ logger: { level: 'warn', stream: quiet.stream } })
  t.teardown(() => empty.close())
  await empty.register(concurrencyLimit)
  await empty.ready()
  t.same(quiet.lines.map((l) => l.msg), [], 'no warning when the routes come after, or when there are none')
})

t.test('registered with await but after some routes: one warning names them', async (t) => {
  const { stream, lines } = logLines()
  const app = Fastify({ logger: { level: 'warn', stream } })
  t.teardown(() => app.close())
  app.get('/heavy', async () => 'heavy')
  app.register(async (r) => { r.post('/early/:id', async () => 'x') }, { prefix: '/api' })
  await app.register(concurrencyLimit, { maxConcurrency: 1 })
  app.get('/users', async () => 'users')
  app.get('/users/:id', { config: { concurrencyLimit: false } }, async () => 'user')
  await app.ready()
  const warnings = lines.filter((l) => l.level === 40)
  t.equal(warnings.length, 1, 'one warning')
  t.match(warnings[0].msg, /does not limit 3 routes added before it was registered: GET \/heavy, HEAD \/heavy, POST \/api\/early\/:id\./)
})

t.test('the unseen-routes warning: one route, or the first ten of many', async (t) => {
  for (const count of [1, 12]) {
    const { stream, lines } = logLines()
    const app = Fastify({ logger: { level: 'warn', stream }, exposeHeadRoutes: false })
    t.teardown(() => app.close())
    for (let i = 0; i < count; i++) app.get(`/early/${i}`, async () => 'x')
    await app.register(concurrencyLimit)
    app.get('/late', async () => 'x')
    // Fastify prints a wildcard apart from its parent: it must not be named wrongly.
    app.get('/files/:id', async () => 'x')
    app.get('/files/*', async () => 'x')
    await app.ready()
    const [warning] = lines.filter((l) => l.level === 40)
    if (count === 1) {
      t.match(warning.msg, /does not limit 1 route added before it was registered: GET \/early\/0\. Register/)
    } else {
      t.match(warning.msg, /does not limit 12 routes added before it was registered: GET \/early\/0, .* and 2 more\. Register/)
      t.equal(warning.msg.split(', GET').length, 10, 'ten named')
    }
  }
})

t.test('root and child registrations: a route config speaks to the nearest; the root still counts the route', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 2, maxQueue: 0, rejectDelay: 0 })
  const gauge = new Gauge()
  let child!: FastifyInstance
  await app.register(async (instance) => {
    await instance.register(concurrencyLimit, { rejectDelay: 0, groups: { exports: { maxConcurrency: 2, maxQueue: 0 } } })
    instance.get('/export', { config: { concurrencyLimit: { group: 'exports' } } }, async () => { gauge.enter(); await gauge.wait(); return 'x' })
    instance.get('/free', { config: { concurrencyLimit: false } }, async () => 'free')
    child = instance
  }, { prefix: '/c' })
  app.get('/r', async () => { gauge.enter(); await gauge.wait(); return 'r' })
  const pool = client(t, await listen(app))
  gauge.close()
  const answers = [get(pool, '/r'), get(pool, '/c/export'), get(pool, '/r'), get(pool, '/c/export')]
  await sleep(200)
  t.equal(gauge.peak, 2, 'the root limit of 2 holds across the child route')
  t.same(app.concurrencyLimit.pools().map((p) => p.name), ['default'], 'the root made no pool of the child group')
  t.same(child.concurrencyLimit.pools().map((p) => p.name), ['default', 'exports'])
  gauge.open()
  const statuses = (await Promise.all(answers)).map((a) => a.statusCode).sort()
  t.same(statuses, [200, 200, 503, 503])
  const before = [app.concurrencyLimit.stats().admitted, child.concurrencyLimit.stats().admitted]
  t.equal((await get(pool, '/c/free')).statusCode, 200)
  t.same([app.concurrencyLimit.stats().admitted, child.concurrencyLimit.stats().admitted], before, 'config false exempts the route from both')
  await drained(t, app)
  await drained(t, child, 'exports')
})

t.test('another onRoute hook that replaces the route hooks: served unlimited, one warning, never a 500', async (t) => {
  const { stream, lines } = logLines()
  const app = Fastify({ logger: { level: 'warn', stream } })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1 })
  const auth = async function authHook (): Promise<void> {}
  app.addHook('onRoute', (route) => {
    for (const stage of ['onRequest', 'preParsing', 'preValidation', 'preHandler'] as const) {
      if (route.url === '/replaced') (route as unknown as Record<string, unknown>)[stage] = [auth]
    }
  })
  app.get('/replaced', async () => 'served')
  app.get('/kept', async () => 'kept')
  const answers = await Promise.all([1, 2, 3].map(() => app.inject('/replaced')))
  t.same(answers.map((a) => a.statusCode), [200, 200, 200])
  const warnings = lines.filter((l) => /lost its admission hook/.test(l.msg))
  t.equal(warnings.length, 1, 'warned once for the route')
  t.match(warnings[0].msg, /GET \/replaced/)
  t.equal((await app.inject('/kept')).statusCode, 200)
  t.equal(app.concurrencyLimit.stats().admitted, 1, 'the other route is still limited')
  t.match(app.printRoutes({ includeHooks: true, commonPrefix: false }), /concurrencyLimit\(\)/, 'the admission hook has a name in route printouts')
})

t.test('HTTP/2: an async handler that replies after its stream was reset still gives its slot back', async (t) => {
  const app = Fastify({ http2: true, forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0 })
  let entered = 0
  let finished = 0
  app.get('/late', async (_request, reply) => {
    entered++
    await sleep(60)
    finished++
    // Fastify's reply.then waits for a response end that, after the reset, never comes.
    return reply.code(200).send('late')
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const session = h2connect(`http://127.0.0.1:${port}`)
  t.teardown(() => session.close())
  const stream = session.request({ ':path': '/late' })
  stream.on('error', () => {})
  stream.end()
  await waitFor(() => entered === 1)
  stream.close(0x8)
  await waitFor(() => finished === 1)
  await drained(t, app)
})

t.test('keep-alive: a response whose connection drops mid-way closes once', async (t) => {
  const app = await build(t, { maxConcurrency: 2 })
  let closes = 0
  app.get('/first', async () => 'first')
  app.get('/held', async (_request, reply) => {
    reply.raw.on('close', () => { closes++ })
    await sleep(30)
    return 'held'
  })
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  // The socket's first request ends before the second is attached to it.
  socket.write(pipelined('/first'))
  await waitFor(() => app.concurrencyLimit.stats().completed === 1)
  socket.write(pipelined('/held'))
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 1)
  socket.destroy()
  await drained(t, app)
  await sleep(20)
  t.equal(closes, 1, "one 'close' for the response")
})
