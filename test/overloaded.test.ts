import t from 'tap'
import { connect as netConnect, type Socket } from 'node:net'
import { connect as h2connect } from 'node:http2'
import Fastify from 'fastify'
import concurrencyLimit, { channels, OverloadedError } from '../lib/index.js'
import { Limiter } from '../lib/limiter.js'
import { build, client, get, listen, waitFor, type Answer } from './helpers/server.js'

/** Keeps the CPU busy for `ms`, as a handler that renders or parses would. */
function burn (ms: number): void {
  const until = performance.now() + ms
  while (performance.now() < until);
}

const BOUND = 20
const WORK = 15

t.test('requests arriving in a turn that ran past maxEventLoopDelay are refused at once', async (t) => {
  const app = await build(t, { maxEventLoopDelay: BOUND, rejectDelay: 0 })
  app.get('/cpu', async () => { burn(WORK); return 'ok' })
  // No bound of its own: the plugin's pool has one, this route's pool not.
  app.get('/light', { config: { concurrencyLimit: { maxEventLoopDelay: 0 } } }, async () => 'ok')
  const origin = await listen(app)
  const pool = client(t, origin, 32)
  // Open every connection first: a burst then reaches the server in one turn.
  await Promise.all(Array.from({ length: 32 }, () => get(pool, '/light')))

  const answers: Answer[] = await Promise.all([
    ...Array.from({ length: 24 }, () => get(pool, '/cpu')),
    ...Array.from({ length: 8 }, () => get(pool, '/light'))
  ])
  const cpu = answers.slice(0, 24)
  const light = answers.slice(24)
  const ok = cpu.filter((a) => a.statusCode === 200).length
  const refused = cpu.filter((a) => a.statusCode === 503)
  t.ok(ok >= 1, `some requests were served (${ok})`)
  t.ok(refused.length >= 1, `some were refused (${refused.length})`)
  t.equal(ok + refused.length, 24, 'every request was served or refused')
  // 24 x 15 ms of work would make the last request wait 345 ms; with a bound
  // of 20 ms no turn admits more than two or three of them.
  t.ok(ok <= 12, `a bound of ${BOUND} ms admitted ${ok} requests of ${WORK} ms`)
  for (const answer of refused) {
    t.same(JSON.parse(answer.body), {
      statusCode: 503,
      code: 'FST_CONCURRENCY_LIMIT_OVERLOADED',
      error: 'Service Unavailable',
      message: new OverloadedError().message
    })
    t.ok(Number(answer.headers['retry-after']) >= 1, 'with Retry-After')
  }
  t.same(light.map((a) => a.statusCode), Array(8).fill(200), 'a pool without the bound is not refused')

  const stats = app.concurrencyLimit.stats()
  t.equal(stats.rejected.overloaded, refused.length, 'stats count each refusal')
  t.equal(stats.rejected.queueFull, 0)
  t.equal(app.concurrencyLimit.stats('GET /light').rejected.overloaded, 0)
})

t.test('requests one after another are never refused, however long each takes', async (t) => {
  const app = await build(t, { maxEventLoopDelay: BOUND })
  app.get('/cpu', async () => { burn(WORK * 2); return 'ok' })
  const pool = client(t, await listen(app), 1)
  for (let i = 0; i < 15; i++) {
    const answer = await get(pool, '/cpu')
    t.equal(answer.statusCode, 200)
  }
  t.equal(app.concurrencyLimit.stats().rejected.overloaded, 0)
})

t.test('a pool made without the plugin marks the turns itself', async (t) => {
  const limiter = new Limiter('alone', { maxConcurrency: 1, maxQueue: 0, queueTimeout: 1000, maxEventLoopDelay: 5 })
  t.equal(limiter.refuse(), null, 'the first arrival starts the turn')
  limiter.tryAcquire()
  burn(12)
  t.equal(limiter.refuse(), 'overloaded', 'twelve milliseconds later in the same turn: past twice the bound')
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(limiter.refuse(), 'queueFull', 'the next turn starts afresh; the one slot is taken')
  limiter.close()
})

t.test('a group and a route pool take the bound of their own', async (t) => {
  const app = await build(t, { groups: { render: { maxConcurrency: 4, maxEventLoopDelay: 50 } } })
  app.get('/a', { config: { concurrencyLimit: { group: 'render' } } }, async () => 'a')
  app.get('/b', { config: { concurrencyLimit: { maxEventLoopDelay: 30 } } }, async () => 'b')
  await app.ready()
  const byName = new Map(app.concurrencyLimit.pools().map((p) => [p.name, p]))
  t.equal(byName.get('render')?.rejected.overloaded, 0)
  t.equal(byName.get('GET /b')?.rejected.overloaded, 0)
  t.equal((await app.inject('/a')).statusCode, 200)
  t.equal((await app.inject('/b')).statusCode, 200)
})

t.test('errorResponseBuilder and retryAfter are told the reason', async (t) => {
  const reasons: string[] = []
  const app = await build(t, {
    maxEventLoopDelay: 10,
    rejectDelay: 0,
    retryAfter: (_request, rejection) => { reasons.push(rejection.reason); return 3 },
    errorResponseBuilder: (_request, rejection) => ({ reason: rejection.reason, code: rejection.code, retryAfter: rejection.retryAfter })
  })
  app.get('/cpu', async () => { burn(WORK); return 'ok' })
  const pool = client(t, await listen(app), 16)
  await Promise.all(Array.from({ length: 16 }, () => get(pool, '/cpu')))
  const answers = await Promise.all(Array.from({ length: 16 }, () => get(pool, '/cpu')))
  const refused = answers.filter((a) => a.statusCode === 503)
  t.ok(refused.length >= 1, `some were refused (${refused.length})`)
  for (const answer of refused) {
    t.same(JSON.parse(answer.body), { reason: 'overloaded', code: 'FST_CONCURRENCY_LIMIT_OVERLOADED', retryAfter: 3 })
    t.equal(answer.headers['retry-after'], '3')
  }
  t.ok(reasons.length >= refused.length && reasons.every((r) => r === 'overloaded'))
})

async function registerWith (options: unknown, route?: unknown): Promise<unknown> {
  const app = Fastify()
  try {
    await app.register(concurrencyLimit, options as never)
    if (route !== undefined) app.get('/', { config: { concurrencyLimit: route as never } }, async () => 'x')
    await app.ready()
    return null
  } catch (err) {
    return err
  } finally {
    await app.close()
  }
}

t.test('maxEventLoopDelay is validated where it is given', async (t) => {
  const expected = `an integer number of milliseconds from 0 (off) to ${2 ** 31 - 1}`
  for (const [bad, shown] of [[-1, '-1'], [1.5, '1.5'], ['50', '"50"'], [Infinity, 'Infinity'], [null, 'null'], [2 ** 31, String(2 ** 31)]]) {
    t.match(await registerWith({ maxEventLoopDelay: bad }), {
      code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
      message: `maxEventLoopDelay must be ${expected}, received ${shown as string}`
    }, `plugin option ${String(shown)}`)
  }
  t.match(await registerWith({ groups: { g: { maxEventLoopDelay: -5 } } }), { message: /groups\.g\.maxEventLoopDelay must be an integer/ })
  t.match(await registerWith({}, { maxEventLoopDelay: 'x' }), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /GET \/: config\.concurrencyLimit\.maxEventLoopDelay must be/ })
  t.equal(await registerWith({ maxEventLoopDelay: 0 }), null, '0 turns it off')
})

t.test('a bound under 10 ms is accepted with a warning', async (t) => {
  const warnings: string[] = []
  const app = Fastify({ logger: { level: 'warn', stream: { write: (line: string) => { warnings.push(JSON.parse(line).msg) } } } })
  await app.register(concurrencyLimit, { maxEventLoopDelay: 5 })
  await app.ready()
  t.match(warnings.join('\n'), /maxEventLoopDelay is 5 ms: a single garbage collection/)
  await app.close()
})

t.test('a group given other bounds by two routes is refused', async (t) => {
  const app = Fastify()
  await app.register(concurrencyLimit)
  app.get('/a', { config: { concurrencyLimit: { group: 'g', maxEventLoopDelay: 20 } } }, async () => 'a')
  t.throws(() => app.get('/b', { config: { concurrencyLimit: { group: 'g', maxEventLoopDelay: 40 } } }, async () => 'b'),
    { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /sets other limits for group "g"/ })
  await app.close()
})

t.test('a new connection whose client left after sending its request is not served', async (t) => {
  const app = await build(t, { maxEventLoopDelay: BOUND })
  let served = 0
  app.get('/cpu', async () => { served++; burn(1); return 'ok' })
  // A pool without the bound decides on every request at once, as before.
  app.get('/light', { config: { concurrencyLimit: { maxEventLoopDelay: 0 } } }, async () => { served++; return 'ok' })
  const port = Number(new URL(await listen(app)).port)
  const events: string[] = []
  const onAbandon = (message: unknown): void => { events.push((message as { pool: string }).pool) }
  channels.abandon.subscribe(onAbandon)
  t.teardown(() => { channels.abandon.unsubscribe(onAbandon) })
  // What a client that gave up leaves in the accept queue: a request, then
  // the connection's end (a FIN) or a reset. Node reads the request a turn
  // before it sees the end.
  const sendAndLeave = async (path: string, leave: 'destroy' | 'resetAndDestroy'): Promise<void> => {
    await new Promise<void>((resolve) => {
      const socket = netConnect(port, '127.0.0.1', () => {
        socket.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`)
        socket[leave]()
      })
      socket.on('error', () => {})
      socket.on('close', () => { resolve() })
    })
  }
  for (const leave of ['destroy', 'resetAndDestroy'] as const) {
    for (let i = 0; i < 3; i++) await sendAndLeave('/cpu', leave)
  }
  await waitFor(() => app.concurrencyLimit.stats().abandoned === 6)
  t.equal(served, 0, 'no handler ran for the six clients that left')
  t.match(app.concurrencyLimit.stats(), { admitted: 0, abandoned: 6, inFlight: 0, queued: 0 }, 'counted as clients that left, with no slot taken')
  t.same(events, Array(6).fill('default'), 'and published on the abandon channel')

  await sendAndLeave('/light', 'destroy')
  await waitFor(() => app.concurrencyLimit.stats('GET /light').completed === 1)
  t.equal(served, 1, 'a pool without the bound runs the handler of a client that left, as Fastify does')

  // A client that stays is served on a new connection and on a kept-alive one.
  const pool = client(t, `http://127.0.0.1:${port}`, 1)
  t.equal((await get(pool, '/cpu')).statusCode, 200)
  t.equal((await get(pool, '/cpu')).statusCode, 200)
  t.equal(served, 3)
  t.match(app.concurrencyLimit.stats(), { admitted: 2, abandoned: 6, inFlight: 0 })
})

t.test('the first requests of many new connections read in one turn are judged where their work runs', async (t) => {
  const app = await build(t, { maxEventLoopDelay: BOUND, rejectDelay: 0 })
  let served = 0
  app.get('/cpu', async () => { served++; burn(WORK); return 'ok' })
  const port = Number(new URL(await listen(app)).port)
  // Twenty connections, accepted by the server before any of them sends.
  let accepted = 0
  app.server.on('connection', () => { accepted++ })
  const sockets = await Promise.all(Array.from({ length: 20 }, async () => await new Promise<Socket>((resolve) => {
    const socket = netConnect(port, '127.0.0.1', () => { resolve(socket) })
  })))
  t.teardown(() => { for (const socket of sockets) socket.destroy() })
  await waitFor(() => accepted === 20)
  // All twenty requests reach the server's socket buffers at once: one turn reads them.
  const statuses = sockets.map(async (socket) => await new Promise<number>((resolve) => {
    socket.once('data', (chunk: Buffer) => { resolve(Number(chunk.toString('latin1').slice(9, 12))) })
  }))
  for (const socket of sockets) socket.write('GET /cpu HTTP/1.1\r\nHost: localhost\r\n\r\n')
  const answers = await Promise.all(statuses)
  const ok = answers.filter((status) => status === 200).length
  t.equal(ok + answers.filter((status) => status === 503).length, 20, 'each was served or refused')
  // Decided as they were read, all twenty would have run in one turn of 300 ms.
  t.ok(ok <= 12, `${ok} of 20 served: a turn of ${WORK} ms requests stops near twice the bound`)
  t.ok(ok >= 1)
  t.equal(served, ok)
  t.equal(app.concurrencyLimit.stats().rejected.overloaded, 20 - ok)
})

t.test('HTTP/2: a pool with the bound serves streams at once', async (t) => {
  const app = Fastify({ http2: true, forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxEventLoopDelay: BOUND })
  app.get('/cpu', async () => { burn(1); return 'ok' })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const session = h2connect(`http://127.0.0.1:${port}`)
  t.teardown(() => session.close())
  const status = async (): Promise<number> => await new Promise<number>((resolve, reject) => {
    const stream = session.request({ ':path': '/cpu' })
    stream.on('response', (headers) => { resolve(Number(headers[':status'])) })
    stream.on('error', reject)
    stream.resume()
    stream.end()
  })
  t.same(await Promise.all([status(), status(), status()]), [200, 200, 200])
  await waitFor(() => app.concurrencyLimit.stats().completed === 3)
  t.match(app.concurrencyLimit.stats(), { admitted: 3, completed: 3, inFlight: 0 })
})
