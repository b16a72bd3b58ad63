import t from 'tap'
import { EventEmitter } from 'node:events'
import Fastify from 'fastify'
import concurrencyLimit, { InvalidOptionError, StoreUnavailableError } from '../lib/index.js'
import { Limiter, NORMAL, type RejectReason, type Waiter } from '../lib/limiter.js'
import { checkStore, type RedisClient, type StoreSettings } from '../lib/store/options.js'
import { RedisPermits } from '../lib/store/redis.js'
import { sleep, waitFor } from './helpers/server.js'

// The store's control flow, driven by a client whose every answer the test
// gives by hand. What it means against a real Redis: store-redis.test.ts.

interface Call {
  command: 'evalsha' | 'eval'
  script: string
  args: Array<string | number>
  resolve: (value: unknown) => void
  reject: (err: unknown) => void
}

class FakeSubscriber extends EventEmitter {
  channels: string[] = []
  disconnected = false
  async subscribe (...channels: string[]): Promise<unknown> {
    this.channels.push(...channels)
    return channels.length
  }

  disconnect (): void {
    this.disconnected = true
  }
}

class FakeRedis implements RedisClient {
  calls: Call[] = []
  subscriber = new FakeSubscriber()
  #push (command: Call['command'], script: string, args: Array<string | number>): Promise<unknown> {
    return new Promise((resolve, reject) => { this.calls.push({ command, script, args, resolve, reject }) })
  }

  async evalsha (sha: string, _n: number, ...args: Array<string | number>): Promise<unknown> {
    return await this.#push('evalsha', sha, args)
  }

  async eval (lua: string, _n: number, ...args: Array<string | number>): Promise<unknown> {
    return await this.#push('eval', lua, args)
  }

  duplicate (): FakeSubscriber {
    return this.subscriber
  }

  /** The oldest call not answered yet. */
  next (): Call {
    const call = this.calls.shift()
    if (call === undefined) throw new Error('no call made')
    return call
  }
}

class TestWaiter implements Waiter {
  prev: Waiter | null = null
  next: Waiter | null = null
  enqueuedAt = 0
  deadline = 0
  readonly level = NORMAL
  alive = true
  outcome: string | null = null
  admit (): boolean {
    if (!this.alive) return false
    this.outcome = 'admitted'
    return true
  }

  reject (reason: RejectReason): void {
    this.outcome = reason
  }
}

function setup (store: Partial<StoreSettings> = {}, pool = { maxConcurrency: 2, maxQueue: 5, queueTimeout: 60_000 }) {
  const redis = new FakeRedis()
  const settings = { ...checkStore('', { redis }, []), ...store }
  let permits: RedisPermits | null = null
  const limiter = new Limiter('p', { ...pool, store: settings }, undefined, (l) => (permits = new RedisPermits(l, settings)))
  return { redis, limiter, permits: permits as unknown as RedisPermits }
}

const tick = async (): Promise<void> => { await sleep(0) }
// An acquire's keys (leases, turns, seen), limit, leaseMs, instance,
// staleMs, channel, running requests without a lease, then the ids.
const RUNNING = 8
const ids = (call: Call): Array<string | number> => call.args.slice(RUNNING + 1)

t.test('a waiter is admitted with the lease Redis grants; a script Redis lost is loaded again', async (t) => {
  const { redis, limiter } = setup()
  t.same(redis.subscriber.channels, ['fastify-concurrency-limit:p:freed'])
  t.equal(limiter.tryAcquire(), false, 'a shared pool admits no one by itself')
  const w = new TestWaiter()
  t.equal(limiter.enqueue(w), null)
  t.equal(w.outcome, null, 'not admitted inside enqueue')
  await tick()
  const first = redis.next()
  t.equal(first.command, 'evalsha')
  t.same(first.args.slice(0, 3), ['fastify-concurrency-limit:p', 'fastify-concurrency-limit:p:turns', 'fastify-concurrency-limit:p:seen'])
  t.same(first.args.slice(3, 5), [2, 10_000])
  t.same(first.args.slice(6, RUNNING + 1), [750, 'fastify-concurrency-limit:p:freed', 0], 'staleMs: three poll intervals')
  t.equal(ids(first).length, 1)
  first.reject(new Error('NOSCRIPT No matching script'))
  await tick()
  const again = redis.next()
  t.equal(again.command, 'eval')
  t.match(again.script, /ZREMRANGEBYSCORE/)
  again.resolve([1, 1])
  await tick()
  t.equal(w.outcome, 'admitted')
  t.match(limiter.stats().store, { leases: 1, fleetInFlight: 1, available: true })
  limiter.release()
  const release = redis.next()
  t.same(release.args.slice(1), ['fastify-concurrency-limit:p:freed', ids(again)[0]])
  release.resolve(1)
  await tick()
  t.match(limiter.stats(), { inFlight: 0, completed: 1, store: { leases: 0 } })

  // A waiter that arrives while a call is out is asked for after it, even if
  // that call found no room.
  const [x, y] = [new TestWaiter(), new TestWaiter()]
  limiter.enqueue(x)
  await tick()
  const forX = redis.next()
  limiter.enqueue(y)
  await tick()
  t.equal(redis.calls.length, 0, 'one call out at a time')
  forX.resolve([0, 2])
  await tick()
  const forBoth = redis.next()
  t.equal(ids(forBoth).length, 2)
  forBoth.resolve([2, 2])
  await tick()
  t.same([x.outcome, y.outcome], ['admitted', 'admitted'])
})

t.test('waiters that arrive while Redis answers are asked for together; the queue bound holds once the fleet is full', async (t) => {
  const { redis, limiter } = setup({}, { maxConcurrency: 3, maxQueue: 1, queueTimeout: 60_000 })
  const [a, b, c, d, e] = Array.from({ length: 5 }, () => new TestWaiter())
  limiter.enqueue(a)
  t.equal(limiter.enqueue(b), null, 'within what the pool may still admit')
  t.equal(limiter.enqueue(c), null)
  t.equal(limiter.enqueue(d), null, 'one more: the queue')
  t.equal(limiter.refuse(), 'queueFull', 'and no more')
  await tick()
  t.equal(redis.calls.length, 1, 'one call for the waiters of one tick')
  const first = redis.next()
  t.equal(ids(first).length, 3, 'for as many as the pool has room for')
  first.resolve([1, 3])
  await tick()
  t.same([a.outcome, b.outcome, c.outcome, d.outcome], ['admitted', null, 'queueFull', 'queueFull'],
    'the fleet is full: maxQueue waiters wait, the newest are refused')
  t.equal(limiter.stats().rejected.queueFull, 3)
  // A permit freed elsewhere is announced.
  redis.subscriber.emit('message', 'fastify-concurrency-limit:p:freed', '1')
  const third = redis.next()
  t.equal(ids(third).length, 1)
  // b leaves before Redis answers: the lease is given back.
  b.alive = false
  third.resolve([1, 3])
  await tick()
  const surplus = redis.next()
  t.equal(surplus.args.length, 3, 'one lease goes back (leases are interchangeable: the oldest)')
  surplus.resolve(1)
  t.match(limiter.stats(), { abandoned: 1, inFlight: 1, store: { leases: 1 } })
  limiter.enqueue(e)
  await tick()
  limiter.close()
  t.equal(redis.subscriber.disconnected, true)
  t.equal(e.outcome, 'closing')
  t.equal(redis.calls.length, 2, 'the call for e, then one that gives up the turn')
  const out = redis.next()
  const withdraw = redis.next()
  t.same([withdraw.args[RUNNING], ids(withdraw)], [0, []], 'asks for nothing: the turn goes')
  out.resolve([1, 2])
  await tick()
  withdraw.resolve([0, 2])
  await tick()
  t.equal(redis.next().args.length, 3, 'the lease for a waiter refused at close goes back')
  t.equal(redis.calls.length, 0, 'and nothing else once closed')
})

t.test('with no answer from Redis: a poll asks again, the held leases are renewed in one call', async (t) => {
  const { redis, limiter } = setup({ leaseMs: 120 }, { maxConcurrency: 2, maxQueue: 5, queueTimeout: 60_000 })
  // Renewals (every 40 ms) come when they are due, between the other calls.
  const renewals: Call[] = []
  const next = async (): Promise<Call> => {
    for (;;) {
      await waitFor(() => redis.calls.length > 0, 1000, 'a call')
      const call = redis.next()
      if (call.args[1] !== 120) return call
      renewals.push(call)
      call.resolve(call.args.length - 2)
    }
  }
  const [a, b] = [new TestWaiter(), new TestWaiter()]
  limiter.enqueue(a)
  limiter.enqueue(b)
  ;(await next()).resolve([1, 2])
  await tick()
  t.equal(a.outcome, 'admitted')
  // No message: the poll (leaseMs / 4 = 30 ms) asks again.
  const poll = await next()
  t.equal(ids(poll).length, 1)
  poll.resolve([1, 2])
  await tick()
  t.equal(b.outcome, 'admitted')
  // Only renewals are due now.
  await waitFor(() => {
    for (const call of redis.calls.splice(0)) {
      renewals.push(call)
      call.resolve(2)
    }
    return renewals.some((call) => call.args.length === 4)
  }, 1000, 'a renewal of both')
  const both = renewals.find((call) => call.args.length === 4) as Call
  t.same(both.args.slice(0, 2), ['fastify-concurrency-limit:p', 120], 'both leases in one call, for leaseMs')
  limiter.release()
  ;(await next()).resolve(1)
  limiter.release()
  ;(await next()).resolve(1)
  await sleep(100)
  const count = renewals.length
  await sleep(100)
  t.equal(renewals.length + redis.calls.length, count, 'nothing held: no renewal')
})

t.test("a call that times out counts as an error; 'refuse' refuses the waiters; a late grant goes back", async (t) => {
  const { redis, limiter } = setup({ timeout: 20, leaseMs: 400 })
  const [a, b] = [new TestWaiter(), new TestWaiter()]
  limiter.enqueue(a)
  limiter.enqueue(b)
  await tick()
  const call = redis.next()
  await waitFor(() => a.outcome !== null, 1000)
  t.same([a.outcome, b.outcome], ['storeUnavailable', 'storeUnavailable'])
  t.match(limiter.stats().store, { available: false, errors: 1, refused: 2 })
  call.resolve([2, 2])
  await tick()
  const late = redis.next()
  t.same(late.args.slice(1), ['fastify-concurrency-limit:p:freed', ...ids(call)])
  // A late answer that granted nothing needs nothing back (the probe's, below, has no ids).
  const c = new TestWaiter()
  limiter.enqueue(c)
  await tick()
  t.equal(c.outcome, 'storeUnavailable', 'refused at once while Redis is known down')
  // The probe (every 100 ms here) finds Redis back.
  await waitFor(() => redis.calls.length > 0, 1000, 'the probe')
  const probe = redis.next()
  t.equal(ids(probe).length, 0)
  await sleep(30)
  probe.resolve([0, 0])
  t.equal(limiter.stats().store?.errors, 2, 'the probe timed out')
  await waitFor(() => redis.calls.length > 0, 1000, 'the next probe')
  redis.next().resolve([0, 0])
  await tick()
  t.equal(limiter.stats().store?.available, true)
  const d = new TestWaiter()
  limiter.enqueue(d)
  await tick()
  redis.next().resolve([1, 1])
  await tick()
  t.equal(d.outcome, 'admitted')
  // A failed release or renewal also marks Redis unavailable.
  limiter.release()
  redis.next().reject(new Error('connection lost'))
  await tick()
  t.match(limiter.stats().store, { available: false, errors: 3 })
  late.resolve(0)
})

t.test("'local' and 'allow' admit without a lease while Redis fails; a lease is given back only when no request needs it", async (t) => {
  const { redis, limiter } = setup({ onStoreError: 'local', instances: 2, timeout: 20 }, { maxConcurrency: 4, maxQueue: 1, queueTimeout: 60_000 })
  const leased = new TestWaiter()
  limiter.enqueue(leased)
  await tick()
  redis.next().resolve([1, 1])
  await tick()
  const [a, b, c] = [new TestWaiter(), new TestWaiter(), new TestWaiter()]
  limiter.enqueue(a)
  limiter.enqueue(b)
  limiter.enqueue(c)
  await tick()
  redis.next().reject(new Error('connection lost'))
  await tick()
  t.same([a.outcome, b.outcome, c.outcome], ['admitted', null, 'queueFull'], '4 / 2 = 2 at once, then the queue bound')
  t.match(limiter.stats().store, { unleased: 1, leases: 1 })
  // The leased request ends first: its lease now stands for the one still running.
  limiter.release()
  await tick()
  t.equal(b.outcome, 'admitted', 'the freed slot goes to the next waiter, without a lease')
  t.equal(redis.calls.length, 0, 'no lease given back')
  // Redis is back: the request admitted without a lease gets one, whatever
  // the count, so that the other instances see it.
  await waitFor(() => redis.calls.length > 0, 2000, 'the probe')
  const probe = redis.next()
  t.same(probe.args.slice(RUNNING), [0])
  probe.resolve([0, 1])
  await tick()
  const backfill = redis.next()
  t.equal(backfill.args[RUNNING], 1)
  t.equal(ids(backfill).length, 1)
  backfill.resolve([0, 2])
  await tick()
  t.match(limiter.stats().store, { leases: 2, available: true, fleetInFlight: 2 })
  // For a poll interval the other instances get to do the same: no new
  // permit is asked for meanwhile.
  const z = new TestWaiter()
  limiter.enqueue(z)
  await tick()
  t.equal(redis.calls.length, 0, 'settling')
  t.equal(z.outcome, null, 'at the fallback limit: waits')
  await waitFor(() => redis.calls.length > 0, 2000, 'the ask after the settling')
  const ask = redis.next()
  t.same([ask.args[RUNNING], ids(ask).length], [0, 1])
  ask.resolve([1, 3])
  await tick()
  t.equal(z.outcome, 'admitted')
  limiter.release()
  const first = redis.next()
  t.equal(first.args.length, 3, 'one lease back per request that ends')
  first.resolve(1)
  limiter.release()
  redis.next().resolve(1)
  limiter.release()
  redis.next().resolve(1)
  t.match(limiter.stats().store, { leases: 0, unleased: 2 })

  // The requests without a lease ended while Redis answered: their new leases go back at once.
  const again = setup({ onStoreError: 'allow', timeout: 20 }, { maxConcurrency: 2, maxQueue: 5, queueTimeout: 60_000 })
  const w = new TestWaiter()
  again.limiter.enqueue(w)
  await tick()
  again.redis.next().reject(new Error('connection lost'))
  await tick()
  t.equal(w.outcome, 'admitted')
  await waitFor(() => again.redis.calls.length > 0, 2000, 'the probe')
  again.redis.next().resolve([0, 0])
  await tick()
  const late = again.redis.next()
  t.equal(late.args[RUNNING], 1)
  again.limiter.release()
  t.equal(again.redis.calls.length, 0)
  late.resolve([0, 1])
  await tick()
  t.same(again.redis.next().args.slice(2), ids(late), 'given back')

  const allow = setup({ onStoreError: 'allow', timeout: 20 }, { maxConcurrency: 2, maxQueue: 5, queueTimeout: 60_000 })
  const waiters = [new TestWaiter(), new TestWaiter(), new TestWaiter()]
  for (const w of waiters) allow.limiter.enqueue(w)
  await tick()
  allow.redis.next().reject(new Error('connection lost'))
  await tick()
  t.same(waiters.map((w) => w.outcome), ['admitted', 'admitted', null], 'up to maxConcurrency')
})

t.test('store options are checked', async (t) => {
  const redis = new FakeRedis()
  const register = async (options: unknown): Promise<unknown> => {
    const app = Fastify()
    try {
      await app.register(concurrencyLimit, options as object)
      await app.ready()
      return null
    } catch (err) {
      return err
    } finally {
      await app.close()
    }
  }
  const invalid: Array<[string, unknown, RegExp]> = [
    ['not an object', { store: 5 }, /^Invalid concurrency-limit option: store must be an object such as \{ redis \}, received 5$/],
    ['a function', { store: () => ({}) }, /store must be an object such as \{ redis \}, received a function$/],
    ['null', { groups: { g: { store: null } } }, /groups.g.store must be an object such as \{ redis \}, received null$/],
    ['no client', { store: {} }, /store.redis must be an ioredis client \(with evalsha, eval and duplicate\), received undefined$/],
    ['symbol', { store: { redis, nameSpace: Symbol('x') } }, /store.nameSpace must be a string, received Symbol\(x\)$/],
    ['not a client', { store: { redis: 'redis://x' } }, /store.redis must be an ioredis client \(with evalsha, eval and duplicate\), received "string"$/],
    ['null client', { store: { redis: null } }, /store.redis must be an ioredis client .*received "object"$/],
    ['unknown key', { store: { redis, ttl: 5 } }, /store.ttl is not an option \(expected one of redis, leaseMs, onStoreError, instances, nameSpace, timeout\)$/],
    ['leaseMs', { store: { redis, leaseMs: 50 } }, /store.leaseMs must be an integer number of milliseconds from 100 to 2147483647, received 50$/],
    // JSON would show both as null.
    ['leaseMs Infinity', { store: { redis, leaseMs: Infinity } }, /store.leaseMs must be .*, received Infinity$/],
    ['timeout NaN', { store: { redis, timeout: NaN } }, /store.timeout must be .*, received NaN$/],
    ['onStoreError', { store: { redis, onStoreError: 'ignore' } }, /store.onStoreError must be one of refuse, allow, local, received "ignore"$/],
    ['instances', { store: { redis, onStoreError: 'local', instances: 0 } }, /store.instances must be an integer >= 1, received 0$/],
    ['local without instances', { store: { redis, onStoreError: 'local' } }, /store.instances must be set with onStoreError 'local'/],
    ['instances without local', { store: { redis, instances: 3 } }, /store.instances is only read with onStoreError 'local', received onStoreError 'refuse'$/],
    ['nameSpace', { store: { redis, nameSpace: 5 } }, /store.nameSpace must be a string, received 5$/],
    ['timeout', { store: { redis, timeout: 0 } }, /store.timeout must be an integer number of milliseconds from 1 to 2147483647, received 0$/],
    ['adaptive', { groups: { g: { adaptive: true, store: { redis } } } }, /store shares a fixed maxConcurrency between instances: it does not work with adaptive/]
  ]
  for (const [name, options, message] of invalid) {
    const err = await register(options)
    t.type(err, InvalidOptionError, name)
    t.match(err, { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message }, name)
  }
  const circular: Record<string, unknown> = {}
  circular.self = circular
  t.match(await register({ store: { redis, timeout: circular } }), { message: /store.timeout must be .*received \[object Object\]$/ })
  t.match(await register({ store: { redis, nameSpace: () => 'x' } }), { message: /store.nameSpace must be a string, received a function$/ })
  t.match(checkStore('', { redis, onStoreError: 'local', instances: 4, nameSpace: 'a:', leaseMs: 1000, timeout: 50 }, []),
    { onStoreError: 'local', instances: 4, nameSpace: 'a:', leaseMs: 1000, timeout: 50 })
  t.equal(new StoreUnavailableError().statusCode, 503)
})

t.test('a store timeout that may outlast the leases it renews is warned of, once, at registration', async (t) => {
  const redis = new FakeRedis()
  const warned = (store: Record<string, unknown>): string[] => {
    const warnings: string[] = []
    checkStore('groups.g.', { redis, ...store }, warnings)
    return warnings
  }
  t.same(warned({ leaseMs: 600 }), ['groups.g.store.timeout is 500 ms (the default), more than two thirds of leaseMs (600 ms): ' +
    'a slow renewal can outlast the leases it renews, and other instances then take permits whose requests still run; ' +
    'keep timeout at or under 400 ms'])
  t.match(warned({ leaseMs: 300, timeout: 5000 }), [/^groups.g.store.timeout is 5000 ms, more than two thirds of leaseMs \(300 ms\).* at or under 200 ms$/])
  t.same(warned({ leaseMs: 750 }), [], 'the default timeout, two thirds of the lease')
  t.same(warned({ leaseMs: 300, timeout: 200 }), [])
  t.same(warned({}), [], 'the defaults')

  const lines: string[] = []
  const app = Fastify({ logger: { level: 'warn', stream: { write: (line: string) => { lines.push(JSON.parse(line).msg) } } } })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { store: { redis, leaseMs: 400 } })
  app.get('/', { config: { concurrencyLimit: { maxConcurrency: 1, store: { redis, leaseMs: 300, timeout: 250 } } } }, async () => 'x')
  await app.ready()
  t.equal(lines.length, 2, 'one line each, none for the HEAD route that shares the config')
  t.match(lines, [/^store.timeout is 500 ms \(the default\)/, /^route GET \/: config.concurrencyLimit.store.timeout is 250 ms/])
})

t.test('a local pool has no store and pays nothing for it', async (t) => {
  const limiter = new Limiter('local', { maxConcurrency: 1, maxQueue: 1, queueTimeout: 1000 })
  t.equal(limiter.tryAcquire(), true)
  t.equal(limiter.stats().store, null)
})
