import t from 'tap'
import Fastify from 'fastify'
import { readFileSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { connect as tlsConnect } from 'node:tls'
import { once } from 'node:events'
import { Client } from 'undici'
import concurrencyLimit from '../lib/index.js'
import { build, listen, get, waitFor, sleep } from './helpers/server.js'

async function rawGet (socket: Socket): Promise<string> {
  let answer = ''
  socket.on('data', (chunk) => { answer += chunk })
  socket.write('GET /x HTTP/1.1\r\nHost: x\r\n\r\n')
  await once(socket, 'close')
  return answer
}

t.test('maxConnections: one connection too many gets a canned 503, not a reset', async (t) => {
  const app = await build(t, { maxConnections: 2 })
  app.get('/x', async () => 'x')
  const origin = await listen(app)
  const port = Number(new URL(origin).port)
  const a = new Client(origin)
  const b = new Client(origin)
  t.teardown(() => Promise.all([a.destroy(), b.destroy()]))
  t.equal((await get(a, '/x')).body, 'x')
  t.equal((await get(b, '/x')).body, 'x')
  t.match(app.concurrencyLimit.connections(), { maxConnections: 2, open: 2, peakOpen: 2, refused: 0 })

  const socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  const answer = await rawGet(socket)
  t.match(answer, /^HTTP\/1.1 503 Service Unavailable\r\n/)
  t.match(answer, /\r\nConnection: close\r\n/)
  t.match(answer, /\r\nRetry-After: 1\r\n/)
  const body = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4))
  t.same(body, { statusCode: 503, code: 'FST_CONCURRENCY_LIMIT_CONNECTIONS', error: 'Service Unavailable', message: 'Too many open connections, retry later' })

  // An HTTP client sees the answer too.
  const c = new Client(origin)
  t.teardown(() => c.destroy())
  const refused = await get(c, '/x')
  t.equal(refused.statusCode, 503)
  t.equal(app.concurrencyLimit.connections()?.refused, 2)

  // A connection that closes makes room for the next.
  await a.close()
  await waitFor(() => app.concurrencyLimit.connections()?.open === 1)
  const d = new Client(origin)
  t.teardown(() => d.destroy())
  t.equal((await get(d, '/x')).body, 'x')
  t.match(app.concurrencyLimit.connections(), { open: 2, peakOpen: 2 })
})

t.test('a refused socket that never sends is closed after a while, or at close()', async (t) => {
  const app = Fastify()
  await app.register(concurrencyLimit, { maxConnections: 1 })
  app.get('/x', async () => 'x')
  const origin = await listen(app)
  const port = Number(new URL(origin).port)
  const first = connect(port, '127.0.0.1')
  await once(first, 'connect')
  await waitFor(() => app.concurrencyLimit.connections()?.open === 1)
  const silent = connect(port, '127.0.0.1')
  silent.resume()
  const closed = once(silent, 'close')
  await waitFor(() => app.concurrencyLimit.connections()?.refused === 1)
  first.destroy()
  const started = Date.now()
  await app.close()
  await closed
  t.ok(Date.now() - started < 900, 'close() did not wait for the refused socket')
})

t.test('a refused socket lingers at most a second', async (t) => {
  const app = await build(t, { maxConnections: 1 })
  app.get('/x', async () => 'x')
  const origin = await listen(app)
  const port = Number(new URL(origin).port)
  const first = connect(port, '127.0.0.1')
  t.teardown(() => first.destroy())
  await once(first, 'connect')
  await waitFor(() => app.concurrencyLimit.connections()?.open === 1)
  // Half-open: our side stays open after the server's answer.
  const silent = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  t.teardown(() => silent.destroy())
  silent.resume()
  silent.on('error', () => {})
  const sockets = async () => await new Promise<number>((resolve, reject) => app.server.getConnections((err, n) => { if (err) reject(err); else resolve(n) }))
  const started = Date.now()
  await once(silent, 'end')
  // While it lingers, the server reads and drops what we send...
  await sleep(300)
  silent.write('GET /x HTTP/1.1\r\nHost: x\r\n\r\n')
  await sleep(200)
  t.equal(await sockets(), 2, 'a late request is read and dropped; the socket lingers')
  // ...and after about a second the server lets it go.
  await waitFor(() => Date.now() - started > 1100)
  t.equal(await sockets(), 1, 'gone after about a second')
})

t.test('over TLS the canned answer comes after the handshake', async (t) => {
  const app = Fastify({
    forceCloseConnections: true,
    https: { key: readFileSync(new URL('./fixtures/key.pem', import.meta.url)), cert: readFileSync(new URL('./fixtures/cert.pem', import.meta.url)) }
  })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConnections: 1, statusCode: 429 })
  app.get('/x', async () => 'x')
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const tls = { host: '127.0.0.1', port, rejectUnauthorized: false }
  const first = tlsConnect(tls)
  t.teardown(() => first.destroy())
  await once(first, 'secureConnect')
  await waitFor(() => app.concurrencyLimit.connections()?.open === 1)
  const second = tlsConnect(tls)
  await once(second, 'secureConnect')
  const answer = await rawGet(second as unknown as Socket)
  t.match(answer, /^HTTP\/1.1 429 Too Many Requests\r\n/)
  t.match(answer, /"statusCode":429/)
})

t.test('maxConnections is refused for HTTP/2, and connections() is null without it', async (t) => {
  const h2 = Fastify({ http2: true })
  t.teardown(() => h2.close())
  h2.register(concurrencyLimit, { maxConnections: 10 })
  await t.rejects(async () => { await h2.ready() }, {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /maxConnections works with HTTP\/1 servers only/
  })
  const app = await build(t)
  await app.ready()
  t.equal(app.concurrencyLimit.connections(), null)
})
