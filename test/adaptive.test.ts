import t, { type Test } from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify, { type FastifyInstance } from 'fastify'
import { request as httpRequest } from 'node:http'
import http2 from 'node:http2'
import { once } from 'node:events'
import { Readable } from 'node:stream'
import concurrencyLimit from '../lib/index.js'
import { DROP, IGNORE, Limiter, NORMAL, SUCCESS, type RejectReason, type Waiter } from '../lib/limiter.js'
import { FixedLimit } from '../lib/limits/fixed.js'
import { GradientLimit } from '../lib/limits/gradient.js'
import { DEFAULT_ADAPTIVE, poolSettings, resolveOptions, resolveRouteConfig, samePool } from '../lib/options.js'

const tick = () => new Promise<void>((resolve) => process.nextTick(resolve))

class TestWaiter implements Waiter {
  prev: Waiter | null = null
  next: Waiter | null = null
  enqueuedAt = 0
  deadline = 0
  readonly level = NORMAL
  admitted = false
  alive = true
  admit (): boolean {
    if (!this.alive) return false
    this.admitted = true
    return true
  }

  reject (_reason: RejectReason): void {}
}

const gradient = (over: object = {}) => new GradientLimit({ ...DEFAULT_ADAPTIVE, maxConcurrency: 100, ...over })

t.test('a fixed limit never moves and has no state', async (t) => {
  const fixed = new FixedLimit(7)
  fixed.onSample()
  fixed.onClientLeft()
  t.equal(fixed.limit, 7)
  t.equal(fixed.adaptive, false)
  t.equal(fixed.state(), null)
})

t.test('gradient: no state before the first window; a drop cuts the limit by a tenth', async (t) => {
  const limit = gradient({ initialConcurrency: 50 })
  t.same(limit.state(), { baselineMs: null, recentMs: null })
  limit.onSample(0, 10, 50, true)
  t.equal(limit.limit, 50, 'not before the window is over')
  limit.onSample(0, 60, 50, true)
  t.equal(limit.limit, 45)
  t.same(limit.state(), { baselineMs: null, recentMs: null }, 'a drop is no latency sample')
})

t.test('gradient: clients gone on work slower than the target cut the limit when they outnumber the samples', async (t) => {
  const limit = gradient({ initialConcurrency: 50 })
  for (let i = 0; i < 12; i++) limit.onClientLeft(i, 2000, 2)
  t.equal(limit.limit, 50, 'no baseline yet: no target to be slower than')
  for (let i = 0; i < 10; i++) limit.onSample(3000 + 2 * i, 40, 2, false)
  t.same(limit.state(), { baselineMs: 40, recentMs: 40 })
  t.equal(limit.limit, 50)
  // The target: 40 x 1.25 + 1 = 51 ms. Within it, a client left for reasons of its own.
  for (let i = 0; i < 12; i++) limit.onClientLeft(3100 + i, 51, 50)
  t.equal(limit.limit, 50, 'within the target: nothing')
  // Past it, but with the samples more than a fifth of the window: a route
  // where some requests are slow and their clients give up on them.
  for (let i = 0; i < 7; i++) limit.onClientLeft(3200 + 10 * i, 102, 50)
  for (let i = 0; i < 3; i++) limit.onSample(3270 + 10 * i, 40, 50, false)
  t.equal(limit.limit, 63, 'seven gone and three samples: the samples decide (at the baseline, at the limit: growth)')
  // Nearly all gone: target / their mean time, half at most.
  for (let i = 0; i < 9; i++) limit.onClientLeft(3400 + 10 * i, 204, 63)
  limit.onSample(3490, 40, 63, false)
  t.equal(limit.limit, 31, '51 / 204 is a quarter: halved')
  t.same(limit.state(), { baselineMs: 40, recentMs: 40 }, 'and no latency sample')
  for (let i = 0; i < 10; i++) limit.onClientLeft(3800 + 10 * i, 80, 31)
  t.equal(limit.limit, 20, '51 / 80 of 31.5')
})

t.test('gradient: a few clients gone among the samples, or in a quiet pool, or admitted under an older limit, cut nothing', async (t) => {
  const withBaseline = () => {
    const limit = gradient({ initialConcurrency: 50 })
    for (let i = 0; i < 10; i++) limit.onSample(2 * i, 40, 2, false)
    t.same([limit.limit, limit.state().baselineMs], [50, 40])
    return limit
  }
  // One slow request in ten whose client left, on a pool at its limit: the
  // samples, at the baseline, say the work is fine.
  const busy = withBaseline()
  for (let round = 0; round < 20; round++) {
    const now = 100 + 100 * round
    for (let i = 0; i < 9; i++) busy.onSample(now + i, 40, busy.limit, false)
    busy.onClientLeft(now + 9, 300, busy.limit)
  }
  t.ok(busy.limit >= 50, `outnumbered by samples: ${busy.limit}`)

  // A quiet pool: clients gone on slow work, never half the limit in flight.
  const quiet = withBaseline()
  for (let i = 0; i < 30; i++) quiet.onClientLeft(100 + 10 * i, 500, 3)
  t.equal(quiet.limit, 50, 'the limit did not make that work slow')

  // Clients gone on work admitted before the limit last moved (at 1,509
  // ms): one cut, not one per window.
  const older = withBaseline()
  for (let i = 0; i < 10; i++) older.onClientLeft(1000 + i, 500, 50)
  t.equal(older.limit, 25, 'one cut, by half at most')
  for (let i = 0; i < 40; i++) older.onClientLeft(1010 + 10 * i, 1000, 50)
  t.equal(older.limit, 25, 'admitted before that cut: no second one')
  for (let i = 0; i < 10; i++) older.onClientLeft(1600 + i, 102, 25)
  t.equal(older.limit, 12, 'admitted after it: the next cut')
})

t.test('gradient: clients gone during a measure of the baseline end it with a cut', async (t) => {
  const limit = gradient({ initialConcurrency: 20, baselineInterval: 1 })
  for (let i = 0; i < 10; i++) limit.onSample(i, 50, 20, false)
  for (let i = 0; i < 10; i++) limit.onSample(110 + i, 58, 25, false)
  const measuring = limit.limit
  t.equal(measuring, 19, 'lowered to measure')
  // No sample to end the measure: every client leaves. The target: 50 x 1.25 + 1 = 63.5 ms.
  for (let i = 0; i < 10; i++) limit.onClientLeft(300 + 10 * i, 127, measuring)
  t.equal(limit.limit, 9, 'halved from 19, not back to 25')
  t.equal(limit.state().baselineMs, 50, 'the baseline stands')
  // The measure is over: a window of samples at the baseline lets the limit grow again.
  for (let i = 0; i < 10; i++) limit.onSample(1000 + 10 * i, 50, 9, false)
  t.ok(limit.limit > 9, `and grows from there: ${limit.limit}`)
})

t.test('gradient: a window of requests admitted under an older limit says nothing', async (t) => {
  const limit = gradient({ initialConcurrency: 50 })
  for (let i = 0; i < 10; i++) limit.onSample(i, 60, 50, false)
  t.equal(limit.state().baselineMs, 60)
  // The limit grew at 69 ms: requests admitted before are not samples of it.
  const grown = limit.limit
  t.ok(grown > 50)
  limit.onSample(0, 200, grown, false)
  t.equal(limit.limit, grown)
  t.equal(limit.state().recentMs, 60)
})

t.test('gradient: a slow window while app-limited does not cut the limit', async (t) => {
  const limit = gradient({ initialConcurrency: 50 })
  for (let i = 0; i < 10; i++) limit.onSample(i, 50, 50, false)
  const before = limit.limit
  for (let i = 0; i < 12; i++) limit.onSample(200 + i, 500, 3, false)
  t.equal(limit.state().recentMs, 500)
  t.equal(limit.limit, before)
})

t.test('gradient: latency that does not follow the limit down makes a new baseline', async (t) => {
  const limit = gradient({ initialConcurrency: 64, minConcurrency: 2 })
  let now = 0
  const window = (rtt: number, count = 10): void => {
    const start = now
    for (let i = 0; i < count; i++) limit.onSample(start + i * 0.01, rtt, limit.limit, false)
    now = start + rtt + Math.max(50, 2 * rtt) + 1
  }
  window(50)
  t.equal(limit.state().baselineMs, 50)
  // The work is now 4x slower at any concurrency: cuts in a row, then the
  // limit is halved while the latency still falls, and it does not.
  const limits: number[] = []
  for (let i = 0; i < 8 && limit.state().baselineMs !== 200; i++) {
    window(200)
    limits.push(limit.limit)
  }
  t.equal(limit.state().baselineMs, 200, `the baseline follows (limits ${limits.join(', ')})`)
  // Windows of drops only while measuring change nothing.
  const held = limit.limit
  limit.onSample(now, 1000, held, true)
  t.equal(limit.limit, held)
})

t.test('gradient: a window of drops only, while the baseline is measured, changes nothing', async (t) => {
  const limit = gradient({ initialConcurrency: 20, baselineInterval: 1 })
  for (let i = 0; i < 10; i++) limit.onSample(i, 50, 20, false)
  t.equal(limit.limit, 25)
  // Slower than the baseline, not by enough to cut: a measure is due.
  for (let i = 0; i < 10; i++) limit.onSample(110 + i, 58, 25, false)
  const measuring = limit.limit
  t.ok(measuring < 25, `lowered to ${measuring} to measure`)
  limit.onSample(400, 100, measuring, true)
  t.equal(limit.limit, measuring)
  t.equal(limit.state().recentMs, 58)
})

t.test('gradient: stays within min and max', async (t) => {
  const limit = gradient({ initialConcurrency: 3, minConcurrency: 3, maxConcurrency: 4 })
  for (let w = 0; w < 4; w++) {
    for (let i = 0; i < 10; i++) limit.onSample(w * 200 + i, 60, limit.limit, false)
  }
  t.equal(limit.limit, 4)
  for (let i = 0; i < 10; i++) limit.onSample(1000 + i, 6000, 4, false)
  t.equal(limit.limit, 3)
})

function adaptiveLimiter (initialConcurrency: number, maxQueue: number | null = null) {
  return new Limiter('a', {
    maxConcurrency: 10,
    maxQueue,
    queueTimeout: 60_000,
    adaptive: { ...DEFAULT_ADAPTIVE, initialConcurrency, minConcurrency: 1 }
  })
}

t.test('limiter: admits against the adaptive limit, the queue follows it, a rise admits more waiters', async (t) => {
  // The limiter's clock, held still: a window of samples closes after 50 ms,
  // which a busy machine could take between two lines of this test.
  const realNow = performance.now
  let clock = realNow.call(performance)
  performance.now = () => clock
  t.teardown(() => { performance.now = realNow })
  const limiter = adaptiveLimiter(2)
  t.equal(limiter.adaptive, true)
  t.match(limiter.stats(), { limit: 2, maxQueue: 2, maxConcurrency: 10, adaptive: { baselineMs: null } })
  for (let i = 0; i < 9; i++) {
    t.ok(limiter.tryAcquire())
    t.ok(limiter.tryAcquire())
    limiter.release(performance.now() - 1)
    limiter.release(performance.now() - 1)
  }
  t.ok(limiter.tryAcquire())
  t.ok(limiter.tryAcquire())
  t.notOk(limiter.tryAcquire())
  const waiters = [new TestWaiter(), new TestWaiter(), new TestWaiter()]
  t.equal(limiter.enqueue(waiters[0]), null)
  t.equal(limiter.enqueue(waiters[1]), null)
  t.equal(limiter.enqueue(waiters[2]), 'queueFull', 'the queue holds as many as the limit')
  limiter.release(performance.now() - 1, IGNORE)
  await tick()
  t.ok(waiters[0].admitted, 'an ignored release still hands its slot on')
  clock += 60
  limiter.release(performance.now() - 1, SUCCESS)
  t.equal(limiter.limit, 4, 'the window closed: the limit grew')
  t.equal(limiter.maxQueue, 4)
  t.equal(limiter.enqueue(waiters[2]), null)
  const late = new TestWaiter()
  late.alive = false
  t.equal(limiter.enqueue(late), null)
  await tick()
  t.ok(waiters[1].admitted && waiters[2].admitted, 'both admitted at once')
  t.equal(limiter.inFlight, 3)
  const stats = limiter.stats()
  t.match(stats, { limit: 4, abandoned: 1 })
  t.ok(Math.abs((stats.adaptive?.baselineMs as number) - 1) < 0.5)
  limiter.release(performance.now() - 1, DROP)
})

t.test('limiter: a limit that came down hands no slot on until in-flight is below it', async (t) => {
  const limiter = adaptiveLimiter(3, 5)
  for (let i = 0; i < 3; i++) t.ok(limiter.tryAcquire())
  const waiter = new TestWaiter()
  t.equal(limiter.enqueue(waiter), null)
  limiter.limit = 1
  limiter.release(performance.now(), IGNORE)
  await tick()
  t.notOk(waiter.admitted)
  t.equal(limiter.inFlight, 2)
  t.equal(limiter.maxQueue, 5, 'a maxQueue set stays')
  limiter.close()
})

t.test('options: adaptive is validated and filled in', async (t) => {
  t.same(resolveOptions({ adaptive: true }).pool, { adaptive: {} })
  t.same(resolveOptions({ adaptive: false }).pool, { adaptive: false })
  const all = { minConcurrency: 2, initialConcurrency: 3, tolerance: 0.5, baselineInterval: 5000 }
  t.same(resolveOptions({ adaptive: all }).pool, { adaptive: all })
  const bad: Array<[unknown, RegExp]> = [
    ['yes', /adaptive must be true, false or an object of adaptive settings, received "yes"/],
    [{ min: 1 }, /adaptive\.min is not an option/],
    [{ minConcurrency: 0 }, /adaptive\.minConcurrency must be an integer >= 1, received 0/],
    [{ initialConcurrency: 1.5 }, /adaptive\.initialConcurrency must be an integer >= 1, received 1.5/],
    [{ tolerance: 0 }, /adaptive\.tolerance must be a number > 0 and <= 10.*received 0/],
    [{ baselineInterval: 0 }, /adaptive\.baselineInterval must be an integer number of milliseconds from 1.*received 0/],
    [{ minConcurrency: 5, initialConcurrency: 2 }, /adaptive\.initialConcurrency must be >= minConcurrency \(5\), received 2/]
  ]
  for (const [adaptive, message] of bad) {
    t.throws(() => resolveOptions({ adaptive }), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message })
  }
  t.throws(() => resolveOptions({ maxConcurrency: 4, adaptive: { minConcurrency: 5 } }), { message: /adaptive\.minConcurrency must be <= maxConcurrency \(4\).*received 5/ })
  t.throws(() => resolveOptions({ groups: { g: { adaptive: 1 } } }), { message: /groups\.g\.adaptive must be/ })
  t.throws(() => resolveRouteConfig('GET /', { adaptive: { tolerance: 'high' } }, true), { message: /route GET \/: config\.concurrencyLimit\.adaptive\.tolerance/ })
  t.same(resolveRouteConfig('GET /', { adaptive: { minConcurrency: 2 } }, true)?.pool, { adaptive: { minConcurrency: 2 } })

  const plugin = { adaptive: {} }
  t.same(poolSettings({}, plugin), { maxConcurrency: 1000, maxQueue: null, queueTimeout: 1000, maxEventLoopDelay: 0, adaptive: DEFAULT_ADAPTIVE })
  t.match(poolSettings({ maxConcurrency: 5 }, plugin), { maxConcurrency: 5, adaptive: { initialConcurrency: 5 } })
  t.match(poolSettings({ maxQueue: 3, adaptive: false }, plugin), { maxConcurrency: 100, maxQueue: 3, adaptive: null })
  t.throws(() => poolSettings({ adaptive: { minConcurrency: 20 } }, { maxConcurrency: 10 }), { message: /minConcurrency must be <= maxConcurrency \(10\)/ })
  t.throws(() => poolSettings({ adaptive: { initialConcurrency: 20 } }, { maxConcurrency: 10 }), { message: /initialConcurrency must be <= maxConcurrency \(10\), received 20/ })
  t.match(poolSettings({ maxConcurrency: 1 }, { adaptive: { initialConcurrency: 1000 } }), { maxConcurrency: 1, adaptive: { initialConcurrency: 1 } },
    'a start the pool inherits yields to its own lower ceiling')
  t.match(poolSettings({ adaptive: { minConcurrency: 2 } }, { maxConcurrency: 4, adaptive: { initialConcurrency: 10 } }), { maxConcurrency: 4, adaptive: { initialConcurrency: 4 } },
    'the pool\'s own adaptive settings go over the plugin\'s: the inherited start yields to the ceiling')
  t.match(poolSettings({ adaptive: true }, { adaptive: { initialConcurrency: 30, minConcurrency: 5 } }), { adaptive: { initialConcurrency: 30, minConcurrency: 5, tolerance: 0.25 } },
    'adaptive: true on a pool takes the plugin\'s knobs')
  t.match(poolSettings({ adaptive: { tolerance: 0.5 } }, { adaptive: { initialConcurrency: 30 } }), { adaptive: { initialConcurrency: 30, tolerance: 0.5 } },
    'a knob of the pool\'s own changes that knob only')
  t.match(poolSettings({ adaptive: { tolerance: 0.5 } }, {}), { adaptive: { initialConcurrency: 20, tolerance: 0.5 } }, 'the defaults fill the rest')
  t.equal(poolSettings({ adaptive: false }, { adaptive: { initialConcurrency: 30 } }).adaptive, null, 'adaptive: false on a pool turns it off')
  t.throws(() => resolveOptions({ maxConcurrency: 10, adaptive: { initialConcurrency: 20 } }), { message: /adaptive\.initialConcurrency must be <= maxConcurrency \(10\).*received 20/ })
  t.throws(() => resolveRouteConfig('GET /', { maxConcurrency: 2, adaptive: { initialConcurrency: 3 } }, true), { message: /route GET \/: config\.concurrencyLimit\.adaptive\.initialConcurrency must be <= maxConcurrency \(2\)/ })
  const a = poolSettings({ adaptive: { tolerance: 0.5 } }, {})
  t.ok(samePool(a, poolSettings({ adaptive: { tolerance: 0.5 } }, {})))
  t.notOk(samePool(a, poolSettings({ adaptive: { tolerance: 0.4 } }, {})))
  t.notOk(samePool(a, poolSettings({ maxConcurrency: 1000 }, {})))
  t.ok(samePool(poolSettings({}, {}), poolSettings({}, {})))
})

function get (port: number, path: string, abortAfter?: number): Promise<number> {
  return new Promise((resolve) => {
    const req = httpRequest({ port, path, host: '127.0.0.1', agent: false }, (res) => {
      res.resume()
      res.on('end', () => { resolve(res.statusCode ?? 0) })
    })
    req.on('error', () => { resolve(0) })
    req.end()
    if (abortAfter !== undefined) setTimeout(() => { req.destroy(); resolve(0) }, abortAfter)
  })
}

/**
 * Handlers run on after their clients leave, and queued requests may still
 * be admitted: waits for every slot to come back (5 s at most).
 */
async function allSlotsBack (app: Pick<FastifyInstance, 'concurrencyLimit'>): Promise<void> {
  const deadline = performance.now() + 5000
  while (app.concurrencyLimit.stats().inFlight + app.concurrencyLimit.stats().queued > 0 && performance.now() < deadline) await sleep(20)
}

/** Runs rounds of fast requests until the pool has a baseline (5 s at most); returns it and the limit then. */
async function baselineOf (t: Test, app: Pick<FastifyInstance, 'concurrencyLimit'>, round: () => Promise<void>): Promise<{ baseline: number, limit: number }> {
  const started = performance.now()
  while (app.concurrencyLimit.stats().adaptive?.baselineMs == null && performance.now() - started < 5000) await round()
  const baseline = app.concurrencyLimit.stats().adaptive?.baselineMs as number
  t.ok(baseline >= 10, `a baseline: ${baseline} ms`)
  return { baseline, limit: app.concurrencyLimit.stats().limit }
}

/**
 * Batches of three rounds of clients leaving slow work, until the limit is
 * below `limit` or four batches have run. A window still open from the
 * baseline's rounds holds fast samples: closed by the first requests left,
 * it may raise the limit, and then only requests admitted after that change
 * count. Each batch can move the limit once (its requests are admitted
 * before any of them ends).
 */
async function leaveSlowWork (app: Pick<FastifyInstance, 'concurrencyLimit'>, limit: number, round: () => Promise<void>): Promise<void> {
  for (let batch = 0; batch < 4 && app.concurrencyLimit.stats().limit >= limit; batch++) {
    for (let i = 0; i < 3; i++) await round()
    await allSlotsBack(app)
  }
}

/** A POST whose client sends part of its body, then leaves. */
function upload (port: number, abortAfter: number): Promise<void> {
  return new Promise((resolve) => {
    const req = httpRequest({ port, path: '/upload', host: '127.0.0.1', agent: false, method: 'POST', headers: { 'content-type': 'text/plain', 'content-length': 10_000 } })
    req.on('error', () => { resolve() })
    req.write('x'.repeat(100))
    setTimeout(() => { req.destroy(); resolve() }, abortAfter)
  })
}

t.test('plugin: an adaptive pool moves its limit; groups and routes take adaptive too', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, {
    // A wide tolerance: on a loaded machine a 20 ms timer fires late, and
    // this test is about the wiring, not the algorithm (adaptive-sim is).
    adaptive: { initialConcurrency: 2, tolerance: 2 },
    maxConcurrency: 50,
    groups: { fixed: { adaptive: false, maxConcurrency: 3 }, other: { adaptive: { minConcurrency: 2 } } }
  })
  app.get('/work', async () => { await sleep(20); return 'ok' })
  app.get('/fixed', { config: { concurrencyLimit: { group: 'fixed' } } }, async () => 'ok')
  app.get('/own', { config: { concurrencyLimit: { adaptive: { minConcurrency: 2, initialConcurrency: 3 } } } }, async () => 'ok')
  app.get('/other', { config: { concurrencyLimit: { group: 'other', adaptive: { minConcurrency: 2 } } } }, async () => 'ok')
  await t.rejects(async () => {
    const child = Fastify()
    await child.register(concurrencyLimit, { groups: { g: { adaptive: true } } })
    child.get('/x', { config: { concurrencyLimit: { group: 'g', adaptive: { tolerance: 1 } } } }, async () => 'x')
    await child.ready()
  }, { message: /sets other limits for group "g"/ })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  t.match(app.concurrencyLimit.stats(), { limit: 2, maxConcurrency: 50, maxQueue: 2, adaptive: { baselineMs: null, recentMs: null } })
  t.match(app.concurrencyLimit.stats('fixed'), { limit: 3, maxQueue: 3, adaptive: null })
  t.match(app.concurrencyLimit.pools().find((p) => p.name.endsWith('/own')), { limit: 3 })
  const started = performance.now()
  while (performance.now() - started < 1000) {
    // A third waits in the queue at first.
    await Promise.all([get(port, '/work'), get(port, '/work'), get(port, '/work')])
  }
  const stats = app.concurrencyLimit.stats()
  t.ok(stats.limit > 2, `the limit grew: ${stats.limit}`)
  t.ok((stats.adaptive?.baselineMs as number) >= 19, `baseline ${stats.adaptive?.baselineMs} ms`)
  t.equal(await get(port, '/fixed'), 200)
})

t.test('plugin: a route whose own ceiling is under the plugin\'s adaptive start starts at its ceiling', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { adaptive: { initialConcurrency: 500 } })
  app.get('/wide', async () => 'ok')
  app.get('/narrow', { config: { concurrencyLimit: { maxConcurrency: 2 } } }, async () => 'ok')
  await app.ready()
  t.match(app.concurrencyLimit.stats(), { limit: 500, maxConcurrency: 1000 })
  t.match(app.concurrencyLimit.pools().find((p) => p.name === 'GET /narrow'), { limit: 2, maxConcurrency: 2 })
  t.equal((await app.inject('/narrow')).statusCode, 200)
})

t.test('plugin: an error about a pool\'s adaptive settings names the pool', async (t) => {
  const routeApp = Fastify()
  t.teardown(() => routeApp.close())
  await routeApp.register(concurrencyLimit, { adaptive: { minConcurrency: 50 } })
  t.throws(() => routeApp.get('/narrow', { config: { concurrencyLimit: { maxConcurrency: 10 } } }, async () => 'ok'),
    { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /route GET \/narrow: adaptive\.minConcurrency must be <= maxConcurrency \(10\).*received 50/ })
  const groupApp = Fastify()
  t.teardown(() => groupApp.close())
  await t.rejects(async () => { await groupApp.register(concurrencyLimit, { adaptive: { minConcurrency: 50 }, groups: { small: { maxConcurrency: 10 } } }) },
    { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /group "small": adaptive\.minConcurrency must be <= maxConcurrency \(10\)/ })
})

t.test('plugin: clients that leave work slower than the target bring the limit down; a hijacked reply or an abandoned download or upload says nothing', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { adaptive: { initialConcurrency: 8, tolerance: 1, baselineInterval: 60_000 }, maxConcurrency: 50 })
  let slowMs = 10
  app.get('/work', async () => { await sleep(slowMs); return 'ok' })
  app.get('/hijack', (_request, reply) => {
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream' })
    reply.raw.write('data: 1\n\n')
  })
  app.post('/upload', async () => 'ok')
  // A download that takes a second: its client's bandwidth, not the work's latency.
  app.get('/download', async () => Readable.from((async function * () {
    for (let i = 0; i < 20; i++) {
      await sleep(50)
      yield 'x'.repeat(1024)
    }
  })()))
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const round = async (path: string, abortAfter?: number): Promise<void> => {
    await Promise.all(Array.from({ length: 8 }, () => path === '/upload' ? upload(port, abortAfter as number) : get(port, path, abortAfter)))
  }
  const settled = async (): Promise<void> => { await allSlotsBack(app) }
  const { baseline, limit } = await baselineOf(t, app, () => round('/work'))

  // Streams the clients end after 300 ms: never answered in full, but not
  // work left unfinished either.
  for (let i = 0; i < 3; i++) await round('/hijack', 300)
  await settled()
  t.equal(app.concurrencyLimit.stats().limit, limit, 'hijacked replies left the limit alone')
  for (let i = 0; i < 3; i++) await round('/download', 300)
  await settled()
  t.equal(app.concurrencyLimit.stats().limit, limit, 'abandoned downloads left the limit alone')
  for (let i = 0; i < 3; i++) await round('/upload', 300)
  await settled()
  t.equal(app.concurrencyLimit.stats().limit, limit, 'abandoned uploads left the limit alone')

  // The work gets slower than the clients wait: none of it is answered,
  // none is a sample, and each round of clients giving up takes a tenth off.
  // Far slower than the clients' 100 ms, so that they leave first even on
  // a loaded machine, whose timers fire late.
  slowMs = 1000
  await leaveSlowWork(app, limit, () => round('/work', 100))
  const after = app.concurrencyLimit.stats()
  t.equal(after.inFlight, 0)
  t.ok(after.limit < limit, `the limit came down: ${limit} -> ${after.limit}`)
  t.equal(after.adaptive?.baselineMs, baseline, 'with no latency sample taken from them')
})

t.test('plugin, HTTP/2: a reset stream is no sample; only one reset on work left mid-handler can cut the limit', async (t) => {
  const app = Fastify({ http2: true, forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { adaptive: { initialConcurrency: 8, tolerance: 1, baselineInterval: 60_000 }, maxConcurrency: 50 })
  let slowMs = 10
  app.get('/work', async () => { await sleep(slowMs); return 'ok' })
  app.post('/upload', async () => 'ok')
  app.get('/download', async () => Readable.from((async function * () {
    for (let i = 0; i < 20; i++) {
      await sleep(50)
      yield 'x'.repeat(1024)
    }
  })()))
  app.get('/hijack', (_request, reply) => {
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream' })
    reply.raw.write('data: 1\n\n')
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const session = http2.connect(`http://127.0.0.1:${(app.server.address() as { port: number }).port}`)
  t.teardown(() => session.destroy())
  // Eight streams at once; each reset after `resetAfter` ms, or read to its end.
  const round = async (path: string, resetAfter?: number): Promise<void> => {
    await Promise.all(Array.from({ length: 8 }, async () => {
      const post = path === '/upload'
      const stream = session.request({ ':path': path, ':method': post ? 'POST' : 'GET', ...(post ? { 'content-type': 'text/plain', 'content-length': '10000' } : {}) }, { endStream: !post })
      stream.on('error', () => {})
      if (post) stream.write('x'.repeat(100))
      stream.resume()
      if (resetAfter === undefined) {
        await once(stream, 'close')
        return
      }
      await sleep(resetAfter)
      stream.close(http2.constants.NGHTTP2_CANCEL)
    }))
  }
  const settled = async (): Promise<void> => { await allSlotsBack(app) }
  const { baseline, limit } = await baselineOf(t, app, () => round('/work'))
  for (const path of ['/hijack', '/download', '/upload']) {
    for (let i = 0; i < 3; i++) await round(path, 300)
    await settled()
    t.equal(app.concurrencyLimit.stats().limit, limit, `${path}: reset streams left the limit alone`)
  }
  t.equal(app.concurrencyLimit.stats().adaptive?.baselineMs, baseline, 'no sample came from them')
  slowMs = 1000
  await leaveSlowWork(app, limit, () => round('/work', 100))
  const after = app.concurrencyLimit.stats()
  t.equal(after.inFlight, 0)
  t.ok(after.limit < limit, `work reset mid-handler brought it down: ${limit} -> ${after.limit}`)
})

t.test('plugin: requests whose client left, and errors, are not fast successes', async (t) => {
  const app = Fastify({ forceCloseConnections: true })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { adaptive: { initialConcurrency: 4 } })
  app.get('/slow', async () => { await sleep(100); return 'ok' })
  app.get('/sync', (_request, reply) => { setTimeout(() => reply.send('late'), 100) })
  app.get('/error', async () => { throw new Error('boom') })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  for (let round = 0; round < 8; round++) {
    await Promise.all([
      get(port, '/slow', 5), get(port, '/sync', 5), get(port, '/error'), get(port, '/error')
    ])
    await sleep(110)
  }
  const stats = app.concurrencyLimit.stats()
  t.equal(stats.adaptive?.baselineMs, null, 'no sample came from them')
  t.ok(stats.completed > 0)
})
