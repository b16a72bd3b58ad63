import t from 'tap'
import { Readable } from 'node:stream'
import { Agent, request } from 'undici'
import { build, listen, waitFor, sleep, Gauge } from './helpers/server.js'

// Thousands of requests over real sockets that end every way a request can:
// replies, throws, rejections, hijacks, streams, POST bodies, and clients that
// leave at random moments. Afterwards every pool must be empty, and a burst
// must be admitted up to exactly maxConcurrency. The long version, by hand:
//   CHAOS_REQUESTS=100000 npx tap --timeout=900 test/chaos.test.ts
const TOTAL = Number(process.env.CHAOS_REQUESTS ?? 2000)
const WORKERS = 64
const MODES = ['ok', 'callback', 'throw', 'reject', 'hijack', 'stream', 'post', 'late-error'] as const

function random (max: number): number {
  return Math.floor(Math.random() * max)
}

t.test(`chaos: ${TOTAL} requests with random endings leave every pool empty`, { timeout: Math.max(120_000, TOTAL * 5) }, async (t) => {
  const app = await build(t, { maxConcurrency: 8, maxQueue: 16, queueTimeout: 150, groups: { shared: { maxConcurrency: 4, maxQueue: 4 } } })
  const limits: Record<string, number> = { default: 8, own: 3, shared: 4 }
  // A request is work in flight while its handler code runs or its response
  // is still open (a stream being produced, a hijacked socket being written).
  interface Work { res: { closed: boolean }, codeRunning: boolean }
  const active: Record<string, Set<Work>> = { default: new Set(), own: new Set(), shared: new Set() }
  const peak: Record<string, number> = { default: 0, own: 0, shared: 0 }
  const running = (pool: string): number => {
    for (const work of active[pool]) if (!work.codeRunning && work.res.closed) active[pool].delete(work)
    return active[pool].size
  }
  const gauge = new Gauge()
  gauge.open()

  const handler = (pool: string) => async (req: any, reply: any) => {
    const { mode, delay } = req.query as { mode: typeof MODES[number], delay: string }
    const ms = Number(delay)
    const work: Work = { res: reply.raw, codeRunning: true }
    running(pool)
    active[pool].add(work)
    if (active[pool].size > peak[pool]) peak[pool] = active[pool].size
    const leave = () => { work.codeRunning = false }
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
        const stream = new Readable({
          read () {
            setTimeout(() => this.push(n++ < 4 ? 'chunk' : null), ms / 4)
          }
        })
        leave()
        return reply.send(stream)
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
  const origin = await listen(app)
  const agent = new Agent({ connections: WORKERS * 2 })
  t.teardown(() => agent.destroy())

  const paths = ['/default', '/default', '/own', '/shared/a', '/shared/b']
  const outcomes: Record<string, number> = {}
  let sent = 0
  async function worker () {
    while (sent < TOTAL) {
      sent++
      const mode = MODES[random(MODES.length)]
      const path = `${paths[random(paths.length)]}?mode=${mode}&delay=${random(20)}`
      const ac = new AbortController()
      const abortIn = Math.random() < 0.3 ? random(25) : -1
      const timer = abortIn >= 0 ? setTimeout(() => ac.abort(), abortIn) : null
      try {
        const res = await request(`${origin}${path}`, {
          method: mode === 'post' ? 'POST' : 'GET',
          body: mode === 'post' ? JSON.stringify({ n: sent }) : undefined,
          headers: mode === 'post' ? { 'content-type': 'application/json' } : {},
          signal: ac.signal,
          dispatcher: agent
        })
        await res.body.dump()
        outcomes[res.statusCode] = (outcomes[res.statusCode] ?? 0) + 1
      } catch {
        outcomes.aborted = (outcomes.aborted ?? 0) + 1
      } finally {
        if (timer !== null) clearTimeout(timer)
      }
    }
  }
  await Promise.all(Array.from({ length: WORKERS }, worker))
  t.comment('outcomes', JSON.stringify(outcomes))
  t.ok((outcomes[200] ?? 0) > 0 && (outcomes[503] ?? 0) > 0 && (outcomes.aborted ?? 0) > 0 && (outcomes[500] ?? 0) > 0, 'every kind of ending happened')

  await waitFor(() => app.concurrencyLimit.pools().every((p) => p.inFlight === 0 && p.queued === 0), 5000, 'the pools to drain')
  await sleep(50)
  for (const stats of app.concurrencyLimit.pools()) {
    const name = stats.name === 'GET,HEAD,TRACE,DELETE,OPTIONS,PATCH,PUT,POST,QUERY /own'
      ? 'own'
      : stats.name
    t.equal(stats.inFlight, 0, `${stats.name}: nothing in flight`)
    t.equal(stats.queued, 0, `${stats.name}: nothing queued`)
    t.equal(stats.completed, stats.admitted, `${stats.name}: every admission released once`)
    t.ok(peak[name] <= limits[name], `${stats.name}: at most ${limits[name]} handlers at once (saw ${peak[name]})`)
    t.equal(stats.peakInFlight, limits[name], `${stats.name}: the limit was reached`)
  }

  // A burst after the storm is admitted up to exactly maxConcurrency.
  gauge.close()
  for (const [path, name] of [['/default', 'default'], ['/own', 'own'], ['/shared/a', 'shared']]) {
    const answers = Array.from({ length: limits[name] + 2 }, () => request(`${origin}${path}?mode=ok&delay=0`, { dispatcher: agent }).then(async (r) => { await r.body.dump(); return r.statusCode }))
    await waitFor(() => running(name) === limits[name], 2000, `${name} to fill`)
    await sleep(30)
    t.equal(running(name), limits[name], `${name}: exactly maxConcurrency admitted after the storm`)
    gauge.open()
    const statuses = await Promise.all(answers)
    t.equal(statuses.filter((s) => s === 200).length, limits[name] + 2, `${name}: the two extra waited in the queue and were served`)
    gauge.close()
  }
  gauge.open()
})
