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

t.test('HTTP/1.1 pipelining: responses queued behind a slow one are released when the client leaves', async (t) => {
  const app = await build(t, { maxConcurrency: 3, maxQueue: 0 })
  const gauge = new Gauge()
  let fastDone = 0
  app.get('/slow', async () => { await gauge.wait(); return 'slow' })
  app.get('/fast', async () => { fastDone++; return 'fast' })
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  socket.write(pipelined('/slow', '/fast', '/fast'))
  // The fast handlers finish; their responses wait behind /slow's in Node's queue.
  await waitFor(() => fastDone === 2, 2000, 'the fast handlers')
  t.equal(app.concurrencyLimit.stats().inFlight, 3, 'the queued responses hold their slots while they wait')
  socket.destroy()
  // /slow's handler still runs: its slot stays taken until it settles.
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 1, 2000, 'the queued responses to be released')
  gauge.open()
  await drained(t, app)
  const pool = client(t, origin)
  const statuses = await Promise.all([1, 2, 3].map(async () => (await get(pool, '/fast')).statusCode))
  t.same(statuses, [200, 200, 200], 'the whole pool is free again')
})

t.test('HTTP/1.1 pipelining behind an exempt route cannot lock the pool', async (t) => {
  const app = await build(t, { maxConcurrency: 2, maxQueue: 0, queueTimeout: 100 })
  const gauge = new Gauge()
  app.get('/exempt', { config: { concurrencyLimit: false } }, async () => { await gauge.wait(); return 'x' })
  app.get('/limited', async () => 'limited')
  const origin = await listen(app)
  for (let i = 0; i < 2; i++) {
    const socket = await rawSocket(origin)
    socket.write(pipelined('/exempt', '/limited'))
    await waitFor(() => app.concurrencyLimit.stats().admitted === i + 1, 2000, 'the limited request to be admitted')
    socket.destroy()
  }
  await drained(t, app)
  const pool = client(t, origin)
  t.equal((await get(pool, '/limited')).statusCode, 200, 'an idle server serves')
  gauge.open()
})

t.test('HTTP/1.1 pipelining: queued requests of a client that left give up their queue places', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 2, queueTimeout: 5000 })
  const gauge = new Gauge()
  const ran: string[] = []
  app.get('/work', async (request) => {
    ran.push((request.query as { id: string }).id)
    await gauge.wait()
    return 'done'
  })
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  socket.write(pipelined('/work?id=a', '/work?id=b', '/work?id=c'))
  await waitFor(() => app.concurrencyLimit.stats().queued === 2, 2000, 'two pipelined requests to queue')
  socket.destroy()
  await waitFor(() => app.concurrencyLimit.stats().queued === 0, 1000, 'the queue to empty')
  gauge.open()
  await drained(t, app)
  t.same(ran, ['a'], 'no queued request of the client that left ran')
  t.equal(app.concurrencyLimit.stats().abandoned, 2)
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
    admitted += 4
    await waitFor(() => app.concurrencyLimit.stats().admitted === admitted, 2000, 'the pipelined requests to be admitted')
    await sleep(10) // the short handlers finish; their responses wait behind the first
    t.equal(app.concurrencyLimit.stats().inFlight, 4, 'four pipelined requests hold slots')
    await c.destroy()
    await Promise.all(pending)
  }
  // The 300 ms handlers run on after their client left: then all is back.
  t.equal(app.concurrencyLimit.stats().admitted, 20)
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

t.test('HTTP/1.1 pipelining: a queued response whose client left closes, so request.signal and clean-up run', async (t) => {
  const app = await build(t, { maxConcurrency: 4 })
  const gauge = new Gauge()
  const seen: string[] = []
  app.get('/slow', async () => { await gauge.wait(); return 'slow' })
  app.get('/watched', async (request, reply) => {
    request.signal.addEventListener('abort', () => seen.push('signal'))
    reply.raw.on('close', () => seen.push('close'))
    setTimeout(() => reply.send('late'), 20)
    return reply
  })
  const origin = await listen(app)
  const socket = await rawSocket(origin)
  socket.write(pipelined('/slow', '/watched'))
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 2)
  socket.destroy()
  await waitFor(() => seen.length === 2, 1000, 'the queued response to close')
  t.same(seen.sort(), ['close', 'signal'])
  gauge.open()
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
