import t, { type Test } from 'tap'
import { Readable } from 'node:stream'
import { connect as netConnect } from 'node:net'
import { connect as h2connect, constants as h2, type ClientHttp2Session } from 'node:http2'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import { Agent, request } from 'undici'
import concurrencyLimit from '../lib/index.js'
import { waitFor, sleep, Gauge } from './helpers/server.js'

// Thousands of requests over real sockets that end every way a request can:
// replies, throws, rejections, hijacks, streams, POST bodies, and clients that
// leave at random moments: undici clients, raw sockets that pipeline one to
// four requests and may be destroyed at any moment, and HTTP/2 sessions whose
// streams are reset at random (also while an earlier async hook runs) and
// which are sometimes destroyed whole. Afterwards every pool must be empty,
// and a burst must be admitted up to exactly maxConcurrency. The long
// version, by hand:
//   CHAOS_REQUESTS=100000 npx tap --disable-coverage --timeout=3600 test/chaos.test.ts
const TOTAL = Number(process.env.CHAOS_REQUESTS ?? 2000)
const WORKERS = 64
const MODES = ['ok', 'callback', 'throw', 'reject', 'hijack', 'stream', 'post', 'late-error'] as const
type Mode = typeof MODES[number]
const LIMITS: Record<string, number> = { default: 8, own: 3, shared: 4 }
const PATHS = ['/default', '/default', '/own', '/shared/a', '/shared/b']
const OWN_POOL = 'GET,HEAD,TRACE,DELETE,OPTIONS,PATCH,PUT,POST,QUERY /own'

function random (max: number): number {
  return Math.floor(Math.random() * max)
}

function randomPath (mode: Mode): string {
  // One request in four waits in an earlier async hook, where a client can leave too.
  const hook = Math.random() < 0.25 ? `&hook=${random(10)}` : ''
  return `${PATHS[random(PATHS.length)]}?mode=${mode}&delay=${random(20)}${hook}`
}

/** The routes, and a count of the work in flight per pool as the handlers see it. */
function serve (app: FastifyInstance): { peak: Record<string, number>, running: (pool: string) => number, gauge: Gauge } {
  // A request is work in flight while its handler code runs or its response
  // is still open (a stream being produced, a hijacked socket being written).
  interface Work { open: () => boolean, codeRunning: boolean }
  const active: Record<string, Set<Work>> = { default: new Set(), own: new Set(), shared: new Set() }
  const peak: Record<string, number> = { default: 0, own: 0, shared: 0 }
  const running = (pool: string): number => {
    for (const work of active[pool]) if (!work.codeRunning && !work.open()) active[pool].delete(work)
    return active[pool].size
  }
  const gauge = new Gauge()
  gauge.open()

  // Stands for an auth lookup: an instance hook that runs before admission.
  app.addHook('onRequest', async (req) => {
    const { hook } = req.query as { hook?: string }
    if (hook !== undefined) await sleep(Number(hook))
  })

  const handler = (pool: string) => async (req: FastifyRequest, reply: FastifyReply) => {
    const { mode, delay } = req.query as { mode: Mode, delay: string }
    const ms = Number(delay)
    const stream = (req.raw as { stream?: { destroyed: boolean } }).stream
    const raw = reply.raw as { closed?: boolean }
    const work: Work = { open: stream === undefined ? () => raw.closed !== true : () => !stream.destroyed, codeRunning: true }
    running(pool)
    active[pool].add(work)
    if (active[pool].size > peak[pool]) peak[pool] = active[pool].size
    const leave = (): void => { work.codeRunning = false }
    switch (mode) {
      case 'throw':
        leave()
        throw new Error('thrown')
      // Work the handler's promise does not track must stop when the client
      // leaves (request.signal), or it would run on after its slot is gone.
      case 'callback': {
        const timer = setTimeout(() => { leave(); reply.send('cb') }, ms)
        req.signal.addEventListener('abort', () => { clearTimeout(timer); leave() })
        return reply
      }
      case 'hijack': {
        reply.hijack()
        reply.raw.writeHead(200)
        const timer = setTimeout(() => { leave(); reply.raw.end('hijacked') }, ms)
        // A hijacked reply detaches request.signal: watch the raw response.
        reply.raw.on('close', () => { clearTimeout(timer); leave() })
        return
      }
      case 'stream': {
        let n = 0
        const body = new Readable({
          read () {
            setTimeout(() => this.push(n++ < 4 ? 'chunk' : null), ms / 4)
          }
        })
        leave()
        return reply.send(body)
      }
      default:
        await sleep(ms)
        await gauge.wait()
        leave()
        if (mode === 'reject') throw new Error('rejected')
        if (mode === 'late-error') return reply.code(418).send({ teapot: true })
        return mode === 'post' ? req.body : 'ok'
    }
  }
  app.all('/default', handler('default'))
  app.all('/own', { config: { concurrencyLimit: { maxConcurrency: 3, maxQueue: 2, queueTimeout: 100 } } }, handler('own'))
  app.all('/shared/a', { config: { concurrencyLimit: { group: 'shared' } } }, handler('shared'))
  app.all('/shared/b', { config: { concurrencyLimit: { group: 'shared' } } }, handler('shared'))
  return { peak, running, gauge }
}

async function buildApp (t: Test, http2: boolean): Promise<{ app: FastifyInstance, origin: string } & ReturnType<typeof serve>> {
  const app = Fastify({ forceCloseConnections: true, http2 } as { http2: false }) as unknown as FastifyInstance
  await app.register(concurrencyLimit, { maxConcurrency: 8, maxQueue: 16, queueTimeout: 150, groups: { shared: { maxConcurrency: 4, maxQueue: 4 } } })
  t.teardown(() => app.close())
  const state = serve(app)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  return { app, origin: `http://127.0.0.1:${port}`, ...state }
}

/** Every pool empty, every admission released once, the limits held and reached, then a clean burst. */
async function settle (t: Test, app: FastifyInstance, state: ReturnType<typeof serve>, send: (path: string) => Promise<number>): Promise<void> {
  const { peak, running, gauge } = state
  const drained = (): boolean => app.concurrencyLimit.pools().every((p) => p.inFlight === 0 && p.queued === 0)
  await waitFor(drained, 5000, 'the pools to drain').catch((err: Error) => {
    // What is left, to start from when this fails.
    for (const p of app.concurrencyLimit.pools()) t.comment(`${p.name}: inFlight ${p.inFlight}, queued ${p.queued}, admitted ${p.admitted}, completed ${p.completed}`)
    throw err
  })
  await sleep(50)
  for (const stats of app.concurrencyLimit.pools()) {
    const name = stats.name === OWN_POOL ? 'own' : stats.name
    t.equal(stats.inFlight, 0, `${stats.name}: nothing in flight`)
    t.equal(stats.queued, 0, `${stats.name}: nothing queued`)
    t.equal(stats.completed, stats.admitted, `${stats.name}: every admission released once`)
    t.ok(peak[name] <= LIMITS[name], `${stats.name}: at most ${LIMITS[name]} handlers at once (saw ${peak[name]})`)
    t.equal(stats.peakInFlight, LIMITS[name], `${stats.name}: the limit was reached`)
  }
  // A burst after the storm is admitted up to exactly maxConcurrency.
  gauge.close()
  for (const [path, name] of [['/default', 'default'], ['/own', 'own'], ['/shared/a', 'shared']]) {
    const answers = Array.from({ length: LIMITS[name] + 2 }, () => send(`${path}?mode=ok&delay=0`))
    await waitFor(() => running(name) === LIMITS[name], 2000, `${name} to fill`)
    await sleep(30)
    t.equal(running(name), LIMITS[name], `${name}: exactly maxConcurrency admitted after the storm`)
    gauge.open()
    const statuses = await Promise.all(answers)
    t.equal(statuses.filter((s) => s === 200).length, LIMITS[name] + 2, `${name}: the two extra waited in the queue and were served`)
    gauge.close()
  }
  gauge.open()
}

function count (outcomes: Record<string, number>, key: string | number, n = 1): void {
  outcomes[key] = (outcomes[key] ?? 0) + n
}

/** One raw connection that pipelines 1 to 4 requests and may be destroyed at any moment. */
function pipelinedBatch (origin: string, outcomes: Record<string, number>, size: number): Promise<void> {
  const { port } = new URL(origin)
  const destroyIn = Math.random() < 0.4 ? random(30) : -1
  let wire = ''
  for (let i = 0; i < size; i++) {
    const mode = MODES[random(MODES.length)]
    const last = i === size - 1 ? 'Connection: close\r\n' : ''
    if (mode === 'post') {
      const body = JSON.stringify({ n: i })
      wire += `POST ${randomPath(mode)} HTTP/1.1\r\nHost: x\r\n${last}Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`
    } else {
      wire += `GET ${randomPath(mode)} HTTP/1.1\r\nHost: x\r\n${last}\r\n`
    }
  }
  return new Promise((resolve) => {
    let received = ''
    const socket = netConnect(Number(port), '127.0.0.1', () => socket.write(wire))
    socket.setEncoding('latin1')
    socket.on('data', (chunk: string) => { received += chunk })
    socket.on('error', () => {})
    const timers = [
      destroyIn >= 0 ? setTimeout(() => socket.destroy(), destroyIn) : null,
      setTimeout(() => socket.destroy(), 5000) // a bound on a hung batch: it would fail the drain check
    ]
    socket.on('close', () => {
      for (const timer of timers) if (timer !== null) clearTimeout(timer)
      let answered = 0
      for (const [, status] of received.matchAll(/HTTP\/1\.1 (\d{3})/g)) {
        answered++
        count(outcomes, status)
      }
      count(outcomes, 'pipelined')
      if (answered < size) count(outcomes, 'aborted', size - answered)
      resolve()
    })
  })
}

function h2request (session: ClientHttp2Session, path: string, method: string, body: string | undefined, resetIn: number): Promise<number | 'aborted'> {
  return new Promise((resolve) => {
    const headers: Record<string, string> = { ':path': path, ':method': method }
    if (body !== undefined) headers['content-type'] = 'application/json'
    let stream: ReturnType<ClientHttp2Session['request']>
    try {
      stream = session.request(headers)
    } catch {
      resolve('aborted') // the session was destroyed by another worker
      return
    }
    let status = 0
    const timer = resetIn >= 0 ? setTimeout(() => stream.close(h2.NGHTTP2_CANCEL), resetIn) : null
    stream.on('response', (h) => { status = Number(h[':status']) })
    stream.on('error', () => {})
    stream.resume()
    stream.on('close', () => {
      if (timer !== null) clearTimeout(timer)
      resolve(status > 0 && stream.rstCode === h2.NGHTTP2_NO_ERROR ? status : 'aborted')
    })
    stream.end(body)
  })
}

t.test(`chaos over HTTP/1.1: ${TOTAL} requests, undici and pipelined raw sockets, random endings`, { timeout: Math.max(120_000, TOTAL * 10) }, async (t) => {
  const { app, origin, ...state } = await buildApp(t, false)
  const agent = new Agent({ connections: WORKERS * 2 })
  t.teardown(() => agent.destroy())
  const outcomes: Record<string, number> = {}
  let sent = 0
  async function worker (): Promise<void> {
    while (sent < TOTAL) {
      if (Math.random() < 0.3) {
        const size = 1 + random(4)
        sent += size
        await pipelinedBatch(origin, outcomes, size)
        continue
      }
      sent++
      const mode = MODES[random(MODES.length)]
      const ac = new AbortController()
      const abortIn = Math.random() < 0.3 ? random(25) : -1
      const timer = abortIn >= 0 ? setTimeout(() => ac.abort(), abortIn) : null
      try {
        const res = await request(`${origin}${randomPath(mode)}`, {
          method: mode === 'post' ? 'POST' : 'GET',
          body: mode === 'post' ? JSON.stringify({ n: sent }) : undefined,
          headers: mode === 'post' ? { 'content-type': 'application/json' } : {},
          signal: ac.signal,
          dispatcher: agent
        })
        await res.body.dump()
        count(outcomes, res.statusCode)
      } catch {
        count(outcomes, 'aborted')
      } finally {
        if (timer !== null) clearTimeout(timer)
      }
    }
  }
  await Promise.all(Array.from({ length: WORKERS }, worker))
  t.comment('outcomes', JSON.stringify(outcomes))
  t.ok((outcomes[200] ?? 0) > 0 && (outcomes[503] ?? 0) > 0 && (outcomes.aborted ?? 0) > 0 && (outcomes[500] ?? 0) > 0 && (outcomes.pipelined ?? 0) > 0,
    'every kind of ending happened')
  await settle(t, app, state, async (path) => {
    const res = await request(`${origin}${path}`, { dispatcher: agent })
    await res.body.dump()
    return res.statusCode
  })
})

t.test(`chaos over HTTP/2: ${Math.ceil(TOTAL / 2)} streams with random resets and destroyed sessions`, { timeout: Math.max(120_000, TOTAL * 10) }, async (t) => {
  const { app, origin, ...state } = await buildApp(t, true)
  const total = Math.ceil(TOTAL / 2)
  const outcomes: Record<string, number> = {}
  let sent = 0
  async function worker (): Promise<void> {
    while (sent < total) {
      // A session carries a few streams at once, then ends; one in ten is destroyed mid-flight.
      const session = h2connect(origin)
      session.on('error', () => {})
      const streams = 1 + random(4)
      sent += streams
      const destroy = Math.random() < 0.1 ? setTimeout(() => session.destroy(), random(30)) : null
      const results = await Promise.all(Array.from({ length: streams }, () => {
        const mode = MODES[random(MODES.length)]
        const resetIn = Math.random() < 0.3 ? random(25) : -1
        return h2request(session, randomPath(mode), mode === 'post' ? 'POST' : 'GET', mode === 'post' ? JSON.stringify({ n: sent }) : undefined, resetIn)
      }))
      if (destroy !== null) clearTimeout(destroy)
      for (const result of results) count(outcomes, result)
      session.close()
    }
  }
  await Promise.all(Array.from({ length: WORKERS / 2 }, worker))
  t.comment('outcomes', JSON.stringify(outcomes))
  t.ok((outcomes[200] ?? 0) > 0 && (outcomes[503] ?? 0) > 0 && (outcomes.aborted ?? 0) > 0 && (outcomes[500] ?? 0) > 0,
    'every kind of ending happened')
  const session = h2connect(origin)
  t.teardown(() => session.close())
  await settle(t, app, state, async (path) => {
    const status = await h2request(session, path, 'GET', undefined, -1)
    return status === 'aborted' ? 0 : status
  })
})
