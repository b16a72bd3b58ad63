import t from 'tap'
import Fastify from 'fastify'
import { connect } from 'node:net'
import { once } from 'node:events'
import concurrencyLimit from '../lib/index.js'
import { listen, client, get, waitFor, Gauge, sleep } from './helpers/server.js'

t.test('close(): queued requests get 503 CLOSING at once, in-flight ones finish, close ends', async (t) => {
  const app = Fastify({ forceCloseConnections: false, return503OnClosing: false })
  await app.register(concurrencyLimit, { maxConcurrency: 2, maxQueue: 10, queueTimeout: 60_000 })
  const gauge = new Gauge()
  let finished = 0
  app.get('/work', async () => {
    gauge.enter()
    await gauge.wait()
    finished++
    return 'done'
  })
  const pool = client(t, await listen(app))
  const running = [get(pool, '/work'), get(pool, '/work')]
  await waitFor(() => gauge.current === 2)
  const queued = Array.from({ length: 5 }, () => get(pool, '/work'))
  await waitFor(() => app.concurrencyLimit.stats().queued === 5)

  const closing = app.close()
  const started = Date.now()
  const refused = await Promise.all(queued)
  t.ok(Date.now() - started < 500, 'the queue was answered at once, not after queueTimeout')
  for (const answer of refused) {
    t.equal(answer.statusCode, 503)
    t.match(JSON.parse(answer.body), { code: 'FST_CONCURRENCY_LIMIT_CLOSING', error: 'Service Unavailable' })
    t.ok(Number(answer.headers['retry-after']) >= 1)
    t.equal(answer.headers.connection, 'close')
  }
  t.equal(finished, 0, 'in-flight requests are still running')
  gauge.open()
  const served = await Promise.all(running)
  t.same(served.map((a) => a.body), ['done', 'done'], 'and they finish normally')
  // Keep-alive sockets would hold close() for keepAliveTimeout (Fastify's
  // forceCloseConnections decides that, not this plugin).
  await pool.close()
  await closing
  t.match(app.concurrencyLimit.stats(), { inFlight: 0, queued: 0, completed: 2, rejected: { closing: 5 } })
})

t.test('while closing, a request that would queue is refused with CLOSING', async (t) => {
  const app = Fastify({ return503OnClosing: false, forceCloseConnections: false })
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 10 })
  const gauge = new Gauge()
  app.get('/work', async () => { gauge.enter(); await gauge.wait(); return 'x' })
  const origin = await listen(app)
  const pool = client(t, origin, 1)
  const running = get(pool, '/work')
  await waitFor(() => gauge.current === 1)
  // A request whose headers are still arriving when close() begins.
  const socket = connect(Number(new URL(origin).port), '127.0.0.1')
  await once(socket, 'connect')
  socket.write('GET /work HTTP/1.1\r\nHost: x\r\n')
  await sleep(20)
  const closing = app.close()
  await sleep(20)
  let answer = ''
  socket.on('data', (chunk) => { answer += chunk })
  socket.write('\r\n')
  await waitFor(() => answer.includes('FST_CONCURRENCY_LIMIT'))
  t.match(answer, /^HTTP\/1.1 503/)
  t.match(answer, /connection: close/i, 'told not to reuse the connection')
  t.match(answer, /"code":"FST_CONCURRENCY_LIMIT_CLOSING"/)
  gauge.open()
  await running
  await pool.close()
  socket.destroy()
  await closing
})

t.test('close() with nothing queued and nothing in flight', async (t) => {
  const app = Fastify()
  await app.register(concurrencyLimit)
  app.get('/', async () => 'x')
  await app.ready()
  await app.close()
  t.match(app.concurrencyLimit.stats(), { inFlight: 0, queued: 0 })
})
