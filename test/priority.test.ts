import t from 'tap'
import Fastify from 'fastify'
import concurrencyLimit from '../lib/index.js'
import { CRITICAL, Limiter, NORMAL, SHEDDABLE, type Level, type RejectReason, type Waiter } from '../lib/limiter.js'
import { LoopTurn } from '../lib/loop-turn.js'
import { build, client, Gauge, get, listen, sleep, waitFor, type Answer } from './helpers/server.js'

class TestWaiter implements Waiter {
  prev: Waiter | null = null
  next: Waiter | null = null
  enqueuedAt = 0
  deadline = 0
  rejected: RejectReason | null = null
  constructor (readonly name: string, readonly level: Level, readonly log: string[]) {}
  admit (): boolean {
    this.log.push(`admit ${this.name}`)
    return true
  }

  reject (reason: RejectReason): void {
    this.rejected = reason
    this.log.push(`reject ${this.name} ${reason}`)
  }
}

const tick = async () => await new Promise<void>((resolve) => process.nextTick(resolve))

t.test('a full queue makes room for a more important class: its newest waiter of the least important class leaves', async (t) => {
  const log: string[] = []
  const limiter = new Limiter('p', { maxConcurrency: 1, maxQueue: 2, queueTimeout: 60_000 })
  t.ok(limiter.tryAcquire(SHEDDABLE))
  const s1 = new TestWaiter('s1', SHEDDABLE, log)
  const s2 = new TestWaiter('s2', SHEDDABLE, log)
  t.equal(limiter.refuse(SHEDDABLE), null)
  t.equal(limiter.enqueue(s1), null)
  t.equal(limiter.enqueue(s2), null)
  t.equal(limiter.refuse(SHEDDABLE), 'queueFull', 'a sheddable request finds no room')
  t.equal(limiter.refuse(NORMAL), null, 'a normal one does: a sheddable waiter gives way')
  const n1 = new TestWaiter('n1', NORMAL, log)
  t.equal(limiter.enqueue(n1), null)
  t.same(log, ['reject s2 queueFull'], 'the newest sheddable waiter left')
  const c1 = new TestWaiter('c1', CRITICAL, log)
  t.equal(limiter.enqueue(c1), null)
  t.same(log, ['reject s2 queueFull', 'reject s1 queueFull'], 'then the other one')
  t.equal(limiter.refuse(NORMAL), 'queueFull', 'a normal request does not push out a normal waiter')
  const c2 = new TestWaiter('c2', CRITICAL, log)
  t.equal(limiter.enqueue(c2), null, 'a critical one pushes out a normal waiter')
  t.equal(n1.rejected, 'queueFull')
  t.equal(limiter.refuse(CRITICAL), 'queueFull', 'a queue full of critical waiters refuses a critical request')

  // The slot goes to the oldest critical waiter.
  limiter.release()
  await tick()
  t.same(log.slice(-1), ['admit c1'])
  limiter.release()
  await tick()
  t.same(log.slice(-1), ['admit c2'])

  const { priority, rejected, admitted } = limiter.stats()
  t.same(priority, {
    critical: { admitted: 2, rejected: 1 },
    normal: { admitted: 0, rejected: 2 },
    sheddable: { admitted: 1, rejected: 3 }
  })
  t.equal(rejected.queueFull, 6)
  t.equal(admitted, 3)
})

t.test('a freed slot goes to the most important class waiting, oldest first', async (t) => {
  const log: string[] = []
  const limiter = new Limiter('p', { maxConcurrency: 1, maxQueue: 10, queueTimeout: 60_000 })
  t.ok(limiter.tryAcquire())
  for (const [name, level] of [['s1', SHEDDABLE], ['n1', NORMAL], ['s2', SHEDDABLE], ['c1', CRITICAL], ['n2', NORMAL]] as const) {
    limiter.enqueue(new TestWaiter(name, level, log))
  }
  for (let i = 0; i < 5; i++) {
    limiter.release()
    await tick()
  }
  t.same(log, ['admit c1', 'admit n1', 'admit n2', 'admit s1', 'admit s2'])
  t.equal(limiter.queued, 0)
})

t.test('queue timeouts reach every class, in order of deadline', async (t) => {
  const log: string[] = []
  const limiter = new Limiter('p', { maxConcurrency: 1, maxQueue: 10, queueTimeout: 40 })
  t.ok(limiter.tryAcquire())
  limiter.enqueue(new TestWaiter('n', NORMAL, log))
  await sleep(15)
  limiter.enqueue(new TestWaiter('c', CRITICAL, log))
  limiter.enqueue(new TestWaiter('s', SHEDDABLE, log))
  await waitFor(() => log.length === 3, 2000, 'every waiter to time out')
  t.same(log, ['reject n queueTimeout', 'reject c queueTimeout', 'reject s queueTimeout'])
  t.same(limiter.stats().priority, { critical: { admitted: 0, rejected: 1 }, normal: { admitted: 1, rejected: 1 }, sheddable: { admitted: 0, rejected: 1 } })
})

t.test('close() refuses the waiters of every class', async (t) => {
  const log: string[] = []
  const limiter = new Limiter('p', { maxConcurrency: 1, maxQueue: 10, queueTimeout: 60_000 })
  t.ok(limiter.tryAcquire())
  limiter.enqueue(new TestWaiter('s', SHEDDABLE, log))
  limiter.enqueue(new TestWaiter('c', CRITICAL, log))
  limiter.close()
  t.same(log, ['reject c closing', 'reject s closing'])
  t.equal(limiter.refuse(CRITICAL), 'closing')
  t.same(limiter.stats().priority.critical, { admitted: 0, rejected: 2 })
})

t.test('under a long event-loop turn, sheddable requests are refused first and critical ones last', async (t) => {
  let now = 0
  const turn = new LoopTurn(() => now)
  const limiter = new Limiter('p', { maxConcurrency: 100, maxQueue: 0, queueTimeout: 1000, maxEventLoopDelay: 20 }, turn)
  t.equal(limiter.refuse(SHEDDABLE), null, 'the turn starts')
  // Not shedding yet (a single long turn may be a burst): the ceiling is
  // twice the bound, times the class's factor.
  now = 25
  t.equal(limiter.refuse(SHEDDABLE), 'overloaded', 'sheddable: past the bound')
  t.equal(limiter.refuse(NORMAL), null)
  now = 45
  t.equal(limiter.refuse(NORMAL), 'overloaded', 'normal: past twice the bound')
  t.equal(limiter.refuse(CRITICAL), null)
  now = 85
  t.equal(limiter.refuse(CRITICAL), 'overloaded', 'critical: past four times the bound')
  t.same(limiter.stats().priority, { critical: { admitted: 0, rejected: 1 }, normal: { admitted: 0, rejected: 1 }, sheddable: { admitted: 0, rejected: 1 } })
  turn.stop()
})

t.test('through the plugin: a critical route takes the queue place of a sheddable one', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 1, queueTimeout: 10_000, rejectDelay: 0, groups: { batch: { priority: 'sheddable' } } })
  const gate = new Gauge()
  app.get('/export', { config: { concurrencyLimit: { priority: 'sheddable' } } }, async () => {
    gate.enter()
    await gate.wait()
    gate.leave()
    return 'export'
  })
  app.get('/checkout', { config: { concurrencyLimit: { priority: 'critical' } } }, async () => 'checkout')
  app.get('/report', { config: { concurrencyLimit: { group: 'batch' } } }, async () => 'report')
  const pool = client(t, await listen(app), 8)

  const first = get(pool, '/export')
  await waitFor(() => gate.current === 1, 2000, 'the first export to run')
  const second = get(pool, '/export')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1, 2000, 'the second export to queue')
  const checkout = get(pool, '/checkout')
  const pushedOut: Answer = await second
  t.equal(pushedOut.statusCode, 503)
  t.equal(JSON.parse(pushedOut.body).code, 'FST_CONCURRENCY_LIMIT_QUEUE_FULL')
  // A group's class is its routes' default: the batch pool counts /report as sheddable.
  const report = await get(pool, '/report')
  t.equal(report.statusCode, 200)
  gate.open()
  t.equal((await first).statusCode, 200)
  t.equal((await checkout).body, 'checkout')

  // Routes of several classes share the plugin's pool and the batch group's.
  t.same(app.concurrencyLimit.pools().map((p) => p.name).sort(), ['batch', 'default'])
  t.same(app.concurrencyLimit.stats().priority, {
    critical: { admitted: 1, rejected: 0 },
    normal: { admitted: 0, rejected: 0 },
    sheddable: { admitted: 1, rejected: 1 }
  })
  t.same(app.concurrencyLimit.stats('batch').priority.sheddable, { admitted: 1, rejected: 0 })
  t.same(app.concurrencyLimit.stats('batch').priority.normal, { admitted: 0, rejected: 0 })
})

t.test('a priority function picks the class per request; a wrong answer is a 500 that names it', async (t) => {
  const seen: string[] = []
  const app = await build(t, {
    maxConcurrency: 1,
    maxQueue: 0,
    rejectDelay: 0,
    hook: 'onRequest',
    priority: (request) => {
      const header = request.headers['x-priority']
      if (header === 'throw') throw new Error('no user')
      // eslint-disable-next-line no-throw-literal
      if (header === 'throw-string') throw 'no user'
      if (header === 'async') return Promise.resolve('critical') as never
      if (header === 'async-throw') return Promise.reject(new Error('lookup failed')) as never
      seen.push(String(header))
      return (header ?? 'normal') as 'normal'
    }
  })
  app.get('/', async () => 'ok')
  await app.ready()
  t.equal((await app.inject({ url: '/', headers: { 'x-priority': 'critical' } })).statusCode, 200)
  t.equal((await app.inject('/')).statusCode, 200)
  const wrong = await app.inject({ url: '/', headers: { 'x-priority': 'urgent' } })
  t.equal(wrong.statusCode, 500)
  t.match(wrong.json(), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /priority\(\) must return 'critical', 'normal' or 'sheddable', returned "urgent"/ })
  t.equal((await app.inject({ url: '/', headers: { 'x-priority': 'throw' } })).statusCode, 500)
  const thrownString = await app.inject({ url: '/', headers: { 'x-priority': 'throw-string' } })
  t.equal(thrownString.statusCode, 500)
  t.match(thrownString.json(), { message: 'no user' })
  // From JavaScript, an async function: its promise is refused, and its
  // rejection, handled here, does not end the process.
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })
  for (const header of ['async', 'async-throw']) {
    const promised = await app.inject({ url: '/', headers: { 'x-priority': header } })
    t.equal(promised.statusCode, 500, header)
    t.match(promised.json(), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /synchronously, returned a promise/ }, header)
  }
  await new Promise((resolve) => setTimeout(resolve, 20))
  t.same(unhandled, [], 'no unhandled rejection')
  const { priority, admitted, inFlight } = app.concurrencyLimit.stats()
  t.same(priority.critical, { admitted: 1, rejected: 0 })
  t.same(priority.normal, { admitted: 1, rejected: 0 })
  t.equal(admitted, 2, 'a request whose class is unknown never takes a slot')
  t.equal(inFlight, 0)
  t.same(seen, ['critical', 'undefined', 'urgent'])
})

t.test('at the default stage too, a priority function that answers wrong gets its request a 500', async (t) => {
  const app = await build(t, { priority: () => 'urgent' as 'normal' })
  app.post('/', async () => 'ok')
  const res = await app.inject({ method: 'POST', url: '/', payload: { a: 1 } })
  t.equal(res.statusCode, 500)
  t.match(res.json(), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION' })
  t.equal(app.concurrencyLimit.stats().admitted, 0)
})

t.test('priority is validated at the plugin, in groups and in route config', async (t) => {
  const expected = "priority must be 'critical', 'normal', 'sheddable' or a function of the request that returns one"
  for (const [options, message] of [
    [{ priority: 'high' }, `${expected}, received "high"`],
    [{ priority: 2 }, `${expected}, received 2`],
    [{ groups: { g: { priority: 'urgent' } } }, `groups.g.${expected}, received "urgent"`]
  ] as const) {
    const app = Fastify()
    let error: unknown = null
    try {
      await app.register(concurrencyLimit, options as never)
      await app.ready()
    } catch (err) {
      error = err
    }
    t.match(error, { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: `Invalid concurrency-limit option: ${message}` })
    await app.close()
  }
  const app = Fastify()
  await app.register(concurrencyLimit)
  t.throws(() => app.get('/', { config: { concurrencyLimit: { priority: 'low' as 'normal' } } }, async () => 'x'),
    { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /route GET \/: config\.concurrencyLimit\.priority must be/ })
  await app.close()
})

t.test('a pool whose permits come from a shared store keeps the classes too', async (t) => {
  const log: string[] = []
  let headroom = 10
  const limiter = new Limiter('shared', { maxConcurrency: 5, maxQueue: 1, queueTimeout: 60_000 }, undefined, () => ({
    wake () {},
    released () {},
    headroom: () => headroom,
    close () {},
    stats: () => ({}) as never
  }))
  const waits: number[] = []
  limiter.onWait = (ms) => { waits.push(ms) }
  t.notOk(limiter.tryAcquire(CRITICAL), 'a shared pool admits nobody by itself')
  for (const [name, level] of [['n1', NORMAL], ['c1', CRITICAL], ['n2', NORMAL], ['c2', CRITICAL]] as const) {
    t.equal(limiter.enqueue(new TestWaiter(name, level, log)), null)
  }
  t.ok(limiter.grant(), 'a permit from the store goes to the oldest critical waiter')
  t.same(log, ['admit c1'])
  t.equal(waits.length, 1, 'its wait is reported')
  // The store found no permit for the rest: the queue goes back to maxQueue,
  // the least important class first, the newest first.
  headroom = 0
  limiter.trimQueue()
  t.same(log, ['admit c1', 'reject n2 queueFull', 'reject n1 queueFull'])
  t.equal(limiter.queued, 1)
  limiter.maxQueue = 0
  limiter.trimQueue()
  t.same(log.slice(-1), ['reject c2 queueFull'], 'then the critical ones')
  t.same(limiter.stats().priority, { critical: { admitted: 1, rejected: 1 }, normal: { admitted: 0, rejected: 2 }, sheddable: { admitted: 0, rejected: 0 } })
})
