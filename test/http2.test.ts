import t from 'tap'
import Fastify from 'fastify'
import { connect, type ClientHttp2Session } from 'node:http2'
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
