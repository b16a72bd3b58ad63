// The drain of one server, in this process, over real sockets: what a worker
// does when the primary tells it to go.
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { readFileSync } from 'node:fs'
import { connect, type Server } from 'node:net'
import { connect as tlsConnect } from 'node:tls'
import { once } from 'node:events'
import { Client } from 'undici'
import concurrencyLimit from '../lib/index.js'
import { Drainer } from '../lib/cluster/drain.js'
import { sleep } from './helpers/server.js'

function deferred (): { promise: Promise<void>, resolve: () => void } {
  let resolve = (): void => {}
  const promise = new Promise<void>((_resolve) => { resolve = _resolve })
  return { promise, resolve }
}

/** Whether the server has accepted `count` connections. */
async function connectionsOf (server: Server, count: number): Promise<boolean> {
  return await new Promise((resolve, reject) => {
    server.getConnections((error, n) => { if (error !== null) reject(error); else resolve(n >= count) })
  })
}

/** An HTTPS app answering GET / with 'ok', its server tracked by a Drainer. */
async function serveHttps (t: Test): Promise<{ app: FastifyInstance, drainer: Drainer, port: number }> {
  const https = { key: readFileSync(new URL('./fixtures/key.pem', import.meta.url)), cert: readFileSync(new URL('./fixtures/cert.pem', import.meta.url)) }
  const app = Fastify({ https })
  app.get('/', async () => 'ok')
  const drainer = new Drainer(() => {})
  drainer.track(app.server)
  await app.listen({ host: '127.0.0.1', port: 0 })
  t.teardown(() => app.close())
  const { port } = app.server.address() as { port: number }
  return { app, drainer, port }
}

interface Served { app: FastifyInstance, drainer: Drainer, origin: string, requests: () => number, release: () => void }

// A Fastify app with the plugin (one slot, a queue) and a /slow route that
// waits until the test releases it.
async function serve (t: Test): Promise<Served> {
  const app = Fastify({ forceCloseConnections: false })
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 10, queueTimeout: 30_000 })
  const gate = deferred()
  app.get('/', async () => 'ok')
  app.post('/', async (request) => request.body)
  app.get('/slow', async () => {
    await gate.promise
    return 'slow'
  })
  let requests = 0
  const drainer = new Drainer(() => { requests++ })
  drainer.track(app.server)
  drainer.track(app.server) // twice is once
  await app.listen({ host: '127.0.0.1', port: 0 })
  t.teardown(async () => {
    drainer.cut()
    gate.resolve()
    await app.close()
  })
  const { port } = app.server.address() as { port: number }
  return {
    app,
    drainer,
    origin: `http://127.0.0.1:${port}`,
    requests: () => requests,
    release: () => { gate.resolve() }
  }
}

t.test('a drain answers what was accepted, queued requests included, each with Connection: close', async (t) => {
  const { drainer, origin, release, requests } = await serve(t)
  const clients = [new Client(origin), new Client(origin), new Client(origin)]
  t.teardown(() => Promise.all(clients.map((c) => c.destroy())))
  // One admitted, two waiting in the plugin's queue.
  const pending = clients.map((client) => client.request({ path: '/slow', method: 'GET' }))
  while (drainer.inFlight < 3) await sleep(5)
  t.equal(requests(), 3, 'every request counted')
  const drained = drainer.drain()
  t.equal(drainer.drain(), drained, 'a second drain is the first')
  t.equal(drainer.draining, true)
  // No new connection is accepted.
  const refused = connect(new URL(origin).port as unknown as number, '127.0.0.1')
  const [error] = await once(refused, 'error') as [NodeJS.ErrnoException]
  t.equal(error.code, 'ECONNREFUSED', 'the listening socket is closed')
  release()
  const responses = await Promise.all(pending)
  for (const response of responses) {
    t.equal(response.statusCode, 200, 'served, not 503')
    t.equal(await response.body.text(), 'slow')
    t.equal(response.headers.connection, 'close')
  }
  await drained
  t.equal(drainer.inFlight, 0)
})

t.test('an idle keep-alive connection is left open; a request on it is served with Connection: close', async (t) => {
  const { drainer, origin } = await serve(t)
  const client = new Client(origin, { pipelining: 1 })
  t.teardown(() => client.destroy())
  const first = await client.request({ path: '/', method: 'GET' })
  t.equal(first.headers.connection, 'keep-alive')
  await first.body.text()
  let drained = false
  const drain = drainer.drain().then(() => { drained = true })
  await sleep(100)
  t.equal(drained, false, 'the drain waits for the idle connection')
  // The client reuses its connection after the drain began: served.
  const second = await client.request({ path: '/', method: 'POST', body: 'payload', headers: { 'content-type': 'text/plain' } })
  t.equal(second.statusCode, 200)
  t.equal(await second.body.text(), 'payload')
  t.equal(second.headers.connection, 'close', 'and told not to reuse it')
  await drain
  t.equal(drained, true, 'the drain ends once the connection closed')
})

t.test('a response under way when the drain starts is sent with Connection: close', async (t) => {
  const { drainer, origin, release } = await serve(t)
  const client = new Client(origin)
  t.teardown(() => client.destroy())
  const pending = client.request({ path: '/slow', method: 'GET' })
  while (drainer.inFlight < 1) await sleep(5)
  const drained = drainer.drain()
  release()
  const response = await pending
  t.equal(response.headers.connection, 'close')
  await response.body.text()
  await drained
})

t.test('cut ends every connection left and counts them', async (t) => {
  const { drainer, origin } = await serve(t)
  const busy = new Client(origin)
  const idle = new Client(origin)
  t.teardown(() => Promise.all([busy.destroy(), idle.destroy()]))
  await (await idle.request({ path: '/', method: 'GET' })).body.text()
  const pending = busy.request({ path: '/slow', method: 'GET' }).then(() => 'answered', (error: Error) => error.message)
  while (drainer.inFlight < 1) await sleep(5)
  const drained = drainer.drain()
  t.same(drainer.cut(), { inFlight: 1, idle: 1 })
  t.match(await pending, /other side closed|socket/i, 'the cut request fails at the client')
  await drained
})

t.test('over HTTPS too: a request on an idle connection during the drain is served with Connection: close', async (t) => {
  const { drainer, port } = await serveHttps(t)
  const client = new Client(`https://127.0.0.1:${port}`, { connect: { rejectUnauthorized: false } })
  t.teardown(() => client.destroy())
  await (await client.request({ path: '/', method: 'GET' })).body.text()
  const drained = drainer.drain()
  const response = await client.request({ path: '/', method: 'GET' })
  t.equal(await response.body.text(), 'ok')
  t.equal(response.headers.connection, 'close')
  await drained
})

t.test('over HTTPS, a connection still in its TLS handshake when the drain starts is waited for, and served', async (t) => {
  const { app, drainer, port } = await serveHttps(t)
  // Connected, no ClientHello sent yet.
  const raw = connect(port, '127.0.0.1')
  await once(raw, 'connect')
  while (!(await connectionsOf(app.server, 1))) await sleep(5)
  let done = false
  const drained = drainer.drain().then(() => { done = true })
  await sleep(100)
  t.equal(done, false, 'the drain waits for the connection in its handshake')
  const secure = tlsConnect({ socket: raw, rejectUnauthorized: false })
  await once(secure, 'secureConnect')
  secure.write('GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
  let answer = ''
  secure.setEncoding('utf8').on('data', (chunk: string) => { answer += chunk })
  await once(secure, 'end')
  t.match(answer, /^HTTP\/1\.1 200 /, 'served')
  t.match(answer, /\r\nconnection: close\r\n/i, 'with Connection: close')
  secure.destroy()
  await drained
  t.equal(done, true)
})

t.test('over HTTPS, cut ends a connection still in its TLS handshake and counts it idle', async (t) => {
  const { app, drainer, port } = await serveHttps(t)
  const client = new Client(`https://127.0.0.1:${port}`, { connect: { rejectUnauthorized: false } })
  t.teardown(() => client.destroy())
  await (await client.request({ path: '/', method: 'GET' })).body.text()
  const raw = connect(port, '127.0.0.1')
  await once(raw, 'connect')
  while (!(await connectionsOf(app.server, 2))) await sleep(5)
  const drained = drainer.drain()
  t.same(drainer.cut(), { inFlight: 0, idle: 2 }, 'the idle TLS connection and the one in its handshake')
  await once(raw, 'close')
  await drained
})
