import t from 'tap'
import Fastify from 'fastify'
import { connect, type ClientHttp2Session, type ServerHttp2Session } from 'node:http2'
import concurrencyLimit from '../lib/index.js'
import { Gauge, waitFor, sleep } from './helpers/server.js'

interface Answer { status: number, body: string }

function request (session: ClientHttp2Session, path: string, signal?: AbortSignal): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': path }, { signal })
    let status = 0
    let body = ''
    stream.on('response', (headers) => { status = Number(headers[':status']) })
    stream.setEncoding('utf8')
    stream.on('data', (chunk: string) => { body += chunk })
    stream.on('end', () => resolve({ status, body }))
    stream.on('error', reject)
    stream.end()
  })
}

t.test('HTTP/2: streams are limited, queued, refused and released like requests', async (t) => {
  const app = Fastify({ http2: true, forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 1, queueTimeout: 5000 })
  const gauge = new Gauge()
  const ran: string[] = []
  app.get('/work', async (request) => {
    ran.push((request.query as { id: string }).id)
    gauge.enter()
    await gauge.wait()
    gauge.leave()
    return 'done'
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const session = connect(`http://127.0.0.1:${port}`)
  t.teardown(() => session.close())

  const first = request(session, '/work?id=first')
  await waitFor(() => gauge.current === 1)
  const ac = new AbortController()
  const gone = request(session, '/work?id=gone', ac.signal).catch((err: Error) => err)
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  ac.abort() // resets one stream; the connection stays
  t.type(await gone, Error)
  await waitFor(() => app.concurrencyLimit.stats().queued === 0, 1000, 'the reset stream to leave the queue')
  const second = request(session, '/work?id=second')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  const refused = await request(session, '/work?id=refused')
  t.equal(refused.status, 503)
  t.equal(JSON.parse(refused.body).code, 'FST_CONCURRENCY_LIMIT_QUEUE_FULL')
  gauge.open()
  t.same(await first, { status: 200, body: 'done' })
  t.same(await second, { status: 200, body: 'done' })
  t.same(ran, ['first', 'second'], 'the reset stream never ran')
  await sleep(20)
  t.match(app.concurrencyLimit.stats(), { inFlight: 0, queued: 0, admitted: 2, completed: 2, abandoned: 1 })
})

t.test('HTTP/2: sessions the client destroys while their responses are on their way give every slot back', async (t) => {
  // Node closes the server session gracefully on the client's GOAWAY. A
  // stream that the peer closed while its response's last write was under
  // way never finishes that write: Node never destroys it and never emits
  // its 'close' (with or without the plugin). The race is narrow: many
  // sessions, destroyed at random moments, meet it every time here.
  const app = Fastify({ http2: true, forceCloseConnections: true })
  // The sessions Node leaves behind would keep the server from closing.
  const sessions = new Set<ServerHttp2Session>()
  app.server.on('session', (session: ServerHttp2Session) => { sessions.add(session) })
  t.teardown(async () => {
    for (const session of sessions) session.destroy()
    await app.close()
  })
  await app.register(concurrencyLimit, { maxConcurrency: 3, maxQueue: 3, queueTimeout: 200 })
  app.get('/fail', () => { throw new Error('failed on purpose') })
  app.get('/work', async () => 'done')
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  let stuck = 0
  app.server.on('stream', (stream) => {
    stuck++
    stream.on('close', () => { stuck-- })
  })
  for (let round = 0; round < 200; round++) {
    const session = connect(`http://127.0.0.1:${port}`)
    session.on('error', () => {})
    const ended = Array.from({ length: 20 }, () => new Promise<void>((resolve) => {
      const stream = session.request({ ':path': '/fail' })
      stream.on('error', () => {})
      stream.resume()
      stream.on('close', resolve)
    }))
    if (round % 2 === 0) setTimeout(() => { session.destroy() }, (round * 7) % 50)
    await Promise.race([Promise.all(ended), sleep(1000)])
    session.destroy()
  }
  await waitFor(() => app.concurrencyLimit.stats().inFlight === 0 && app.concurrencyLimit.stats().queued === 0, 3000, 'every slot back')
  const stats = app.concurrencyLimit.stats()
  t.equal(stats.admitted, stats.completed)
  t.comment(`server streams never closed: ${stuck}`)
  const session = connect(`http://127.0.0.1:${port}`)
  t.teardown(() => session.destroy())
  t.same(await request(session, '/work'), { status: 200, body: 'done' }, 'the pool serves again')
})
