import t, { type Test } from 'tap'
import { fork } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import Fastify, { type FastifyInstance } from 'fastify'
import { connect, type ClientHttp2Session, type Http2ServerRequest } from 'node:http2'
import concurrencyLimit, { type ConcurrencyLimitOptions } from '../lib/index.js'
import { Gauge, waitFor, watchStreams } from './helpers/server.js'

interface Answer { status: number, body: string, ms: number }

function request (session: ClientHttp2Session, path: string): Promise<Answer> {
  const started = Date.now()
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': path })
    let status = 0
    let body = ''
    stream.on('response', (headers) => { status = Number(headers[':status']) })
    stream.setEncoding('utf8')
    stream.on('data', (chunk: string) => { body += chunk })
    stream.on('end', () => resolve({ status, body, ms: Date.now() - started }))
    stream.on('error', reject)
    stream.end()
  })
}

// Node warns once per process about a Connection header on HTTP/2, so the
// header is also checked on every reply, where it would be set.
function watchWarnings (t: Test): string[] {
  const warnings: string[] = []
  const onWarning = (warning: Error): void => { warnings.push(`${warning.name}: ${warning.message}`) }
  process.on('warning', onWarning)
  t.teardown(() => { process.off('warning', onWarning) })
  return warnings
}

// An HTTP/2 server whose one slot is held by /hold until the gauge opens.
async function saturated (t: Test, options: ConcurrencyLimitOptions, setup = (_app: FastifyInstance): void => {}) {
  const app = Fastify({ http2: true, forceCloseConnections: true, return503OnClosing: false })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0, ...options })
  const connectionHeaders: unknown[] = []
  app.addHook('onSend', async (_request, reply) => { connectionHeaders.push(reply.getHeader('connection')) })
  const gauge = new Gauge()
  app.get('/hold', async () => { gauge.enter(); await gauge.wait(); gauge.leave(); return 'done' })
  setup(app as unknown as FastifyInstance)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const session = (): ClientHttp2Session => {
    const s = connect(`http://127.0.0.1:${port}`)
    s.on('error', () => {})
    t.teardown(() => { s.destroy() })
    return s
  }
  const holderSession = session()
  const held = request(holderSession, '/hold')
  await waitFor(() => gauge.current === 1)
  return { app, gauge, held, session, connectionHeaders }
}

t.test('HTTP/2 refusals on a closing server send no Connection header', async (t) => {
  const warnings = watchWarnings(t)
  const { app, gauge, held, session, connectionHeaders } = await saturated(t, { maxQueue: 1, queueTimeout: 60_000 })
  const queued = request(session(), '/hold')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  const closing = app.close()
  const answer = await queued
  t.equal(answer.status, 503)
  t.equal(JSON.parse(answer.body).code, 'FST_CONCURRENCY_LIMIT_CLOSING')
  gauge.open()
  t.match(await held, { status: 200, body: 'done' })
  await closing
  t.same(connectionHeaders, [undefined, undefined], 'no reply set it')
  t.same(warnings.filter((w) => w.startsWith('UnsupportedWarning')), [], 'Node had no header to drop')
})

t.test('HTTP/2 with closeOnReject: a refusal ends the session with GOAWAY, its other streams finish', async (t) => {
  const warnings = watchWarnings(t)
  const { gauge, held, session, connectionHeaders } = await saturated(t, { closeOnReject: true })
  const client = session()
  let goaway: number | null = null
  client.on('goaway', (code: number) => { goaway = code })
  const answer = await request(client, '/hold')
  t.equal(answer.status, 503, 'the refusal itself arrives in full')
  t.equal(JSON.parse(answer.body).code, 'FST_CONCURRENCY_LIMIT_QUEUE_FULL')
  await waitFor(() => goaway !== null, 1000, 'a GOAWAY')
  t.equal(goaway, 0, 'NO_ERROR: a graceful close')
  await waitFor(() => client.closed, 1000, 'the client session to close')
  gauge.open()
  t.match(await held, { status: 200, body: 'done' }, 'the holder, on another session, is served')
  t.same(connectionHeaders, [undefined, undefined])
  t.same(warnings.filter((w) => w.startsWith('UnsupportedWarning')), [])
})

t.test('HTTP/2 with closeOnReject: streams already open on the refused session still finish', async (t) => {
  const { app, gauge, session } = await saturated(t, { maxConcurrency: 2, closeOnReject: true })
  const shared = session()
  let goaway = false
  shared.on('goaway', () => { goaway = true })
  const admitted = request(shared, '/hold')
  await waitFor(() => gauge.current === 2)
  const refused = await request(shared, '/hold')
  t.equal(refused.status, 503)
  await waitFor(() => goaway, 1000, 'a GOAWAY')
  gauge.open()
  t.match(await admitted, { status: 200, body: 'done' }, 'GOAWAY let the admitted stream finish')
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 1)
})

t.test('HTTP/2: the retry-storm brake leaves streams alone; concurrent first tries are answered at once', async (t) => {
  const { app, session } = await saturated(t, {})
  const client = session()
  const answers = await Promise.all(Array.from({ length: 5 }, () => request(client, '/hold')))
  for (const answer of answers) {
    t.equal(answer.status, 503)
    t.ok(answer.ms < 150, `answered at once (${answer.ms} ms)`)
  }
  // A stream is one request: a retry on the same session opens another.
  const retry = await request(client, '/hold')
  t.ok(retry.ms < 150, `a retry on the same session too (${retry.ms} ms)`)
  t.equal(app.concurrencyLimit.stats().heldRejections, 0)
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 6)
})

t.test('HTTP/2 with closeOnReject and an async errorResponseBuilder: the body outlasts the GOAWAY', async (t) => {
  const { session } = await saturated(t, {
    closeOnReject: true,
    errorResponseBuilder: async (_request, rejection) => {
      await new Promise((resolve) => setTimeout(resolve, 20))
      return { busy: rejection.reason }
    }
  })
  const client = session()
  let goaway = false
  client.on('goaway', () => { goaway = true })
  const answer = await request(client, '/hold')
  t.equal(answer.status, 503)
  t.same(JSON.parse(answer.body), { busy: 'queueFull' })
  t.ok(goaway)
})

t.test('HTTP/2 with closeOnReject: a refusal whose stream is already gone closes nothing', async (t) => {
  const gone: boolean[] = []
  const { app, gauge, session } = await saturated(t, { closeOnReject: true }, (app) => {
    // Runs before the plugin's route-level hook: the stream is destroyed, as
    // by a reset that Node reports only later, before the refusal is answered.
    app.addHook('onRequest', (request, _reply, done) => {
      const stream = (request.raw as unknown as Http2ServerRequest).stream
      if (request.url === '/hold?reset') {
        stream.destroy()
        gone.push(stream.session === undefined)
      }
      done()
    })
  })
  const client = session()
  let goaway = false
  client.on('goaway', () => { goaway = true })
  const reset = await request(client, '/hold?reset').catch((err: Error) => err)
  t.notMatch(reset, { status: 503 }, 'the client saw its stream end, with no refusal on it')
  t.same(gone, [true], 'the refusal found no session to close')
  t.equal(goaway, false)
  t.match(await request(client, '/hold'), { status: 503 }, 'the session still works, and is refused as usual')
  gauge.open()
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 2)
})

t.test('HTTP/2: refusals whose sessions the client destroys at once leave no stream behind, and the server closes', async (t) => {
  // A refused stream that the client closed while its 503 was on its way
  // never finishes that write, and Node never destroys it: a storm of such
  // clients would pile up streams and sessions, and app.close() would wait
  // for them for ever.
  const { app, gauge, held } = await saturated(t, { rejectDelay: 0 })
  const streams = watchStreams(app.server)
  const { port } = app.server.address() as { port: number }
  const client = fork(fileURLToPath(new URL('./fixtures/h2-refused-client.ts', import.meta.url)), [`http://127.0.0.1:${port}`, '150'], { execArgv: process.execArgv, stdio: ['ignore', 'pipe', 'inherit', 'ipc'] })
  let out = ''
  client.stdout?.on('data', (chunk: Buffer) => { out += chunk.toString() })
  await once(client, 'exit')
  t.comment(`client saw ${out}`)
  t.ok(app.concurrencyLimit.stats().rejected.queueFull > 0, 'refusals were sent')
  t.ok(streams.unfinished() > 0, `some refused streams were left closed with their write unfinished (${streams.unfinished()})`)
  await waitFor(() => streams.open() === 0, 4000, 'every refused stream closed').catch(() => {})
  t.equal(streams.open(), 0, 'no refused stream left open')
  gauge.open()
  t.equal((await held).status, 200)
  const closed = await Promise.race([app.close().then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 3000))])
  t.ok(closed, 'the server closes')
})
