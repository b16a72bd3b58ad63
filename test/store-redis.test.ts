import t, { type Test } from 'tap'
import { performance } from 'node:perf_hooks'
import Fastify, { type FastifyInstance } from 'fastify'
import { Pool } from 'undici'
import type { Redis } from 'ioredis'
import concurrencyLimit, { channels, type ConcurrencyLimitOptions, type RefuseMessage, type StoreOptions } from '../lib/index.js'
import { Limiter, NORMAL, type RejectReason, type Waiter } from '../lib/limiter.js'
import * as loopLoad from '../lib/loop-load.js'
import { checkStore } from '../lib/store/options.js'
import { RedisPermits } from '../lib/store/redis.js'
import { abortAfter, client, get, listen, sleep, waitFor } from './helpers/server.js'
import { RedisServer } from './helpers/redis.js'

// Every test here runs against a redis-server of its own (see helpers/redis.ts).
t.setTimeout(120_000)

/** What the handlers of every app in one test share: how many run now and at most. */
class Downstream {
  current = 0
  peak = 0
  calls = 0
  async call (ms: number): Promise<void> {
    this.calls++
    if (++this.current > this.peak) this.peak = this.current
    try {
      await sleep(ms)
    } finally {
      this.current--
    }
  }
}

interface Instance {
  app: FastifyInstance
  origin: string
}

async function instance (t: Test, store: StoreOptions, pool: { maxConcurrency: number, maxQueue?: number, queueTimeout?: number },
  routes: (app: FastifyInstance) => void): Promise<Instance> {
  const app = Fastify({ forceCloseConnections: true })
  await app.register(concurrencyLimit, { global: false, rejectDelay: 0, groups: { renders: { ...pool, store } } })
  routes(app)
  t.teardown(() => app.close())
  return { app, origin: await listen(app) }
}

const renders = { config: { concurrencyLimit: { group: 'renders' } } }

/** `count` instances sharing the group, each with a route that calls `downstream` for `ms`. */
async function renderers (t: Test, server: RedisServer, count: number, pool: { maxConcurrency: number, maxQueue: number, queueTimeout: number },
  downstream: Downstream, ms: number): Promise<Instance[]> {
  const instances: Instance[] = []
  for (let i = 0; i < count; i++) {
    instances.push(await instance(t, { redis: server.client(t) }, pool, (app) => {
      app.get('/render', renders, async () => { await downstream.call(ms); return 'ok' })
    }))
  }
  return instances
}

/**
 * Leases in Redis, once the releases in flight have arrived: a permit goes
 * back after the response closed, a round trip after the client saw it.
 */
async function leases (redis: Redis, key = 'fastify-concurrency-limit:renders'): Promise<number> {
  let count = await redis.zcard(key)
  for (let i = 0; i < 50 && count > 0; i++) {
    await sleep(20)
    count = await redis.zcard(key)
  }
  return count
}

t.test('three instances sharing a group never run more than its maxConcurrency at once, and give every lease back', async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const downstream = new Downstream()
  const instances = await renderers(t, server, 3, { maxConcurrency: 4, maxQueue: 100, queueTimeout: 10_000 }, downstream, 15)
  const clients = instances.map(({ origin }) => client(t, origin, 40))
  const answers = await Promise.all(Array.from({ length: 120 }, (_, i) => get(clients[i % 3], '/render')))
  t.same(answers.map((a) => a.statusCode), Array(120).fill(200), 'every request served')
  t.equal(downstream.calls, 120)
  t.ok(downstream.peak <= 4, `peak at the downstream ${downstream.peak} <= 4`)
  t.equal(downstream.peak, 4, 'and the limit is used in full')
  for (const { app } of instances) {
    const stats = app.concurrencyLimit.stats('renders')
    t.match(stats, { inFlight: 0, queued: 0, store: { leases: 0, available: true, errors: 0 } })
    t.equal(stats.completed, stats.admitted)
  }
  t.equal(await leases(redis), 0, 'no lease left in Redis')
  // Redis's answer to each release says what is out across the fleet: the
  // instance that gave back the last permit saw none left.
  await waitFor(() => instances.some(({ app }) => app.concurrencyLimit.stats('renders').store?.fleetInFlight === 0), 2000,
    'an instance that saw the fleet empty')
  t.ok(instances.every(({ app }) => (app.concurrencyLimit.stats('renders').store?.fleetInFlight as number) < 4), 'none sees the fleet full')
})

t.test('a waiter is woken by a permit freed on another instance, without waiting for the poll', async (t) => {
  const server = await RedisServer.start(t)
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  // When Redis announces the freed permit, and when b's handler starts.
  const listener = server.client(t)
  let announced = 0
  listener.on('message', () => { announced ||= performance.now() })
  await listener.subscribe('fastify-concurrency-limit:renders:freed')
  let admitted = 0
  const a = await instance(t, { redis: server.client(t) }, { maxConcurrency: 1 }, (app) => {
    app.get('/render', renders, async () => { await held; return 'a' })
  })
  const b = await instance(t, { redis: server.client(t) }, { maxConcurrency: 1, queueTimeout: 5000 }, (app) => {
    app.get('/render', renders, async () => { admitted = performance.now(); return 'b' })
  })
  const first = get(client(t, a.origin), '/render')
  await waitFor(() => a.app.concurrencyLimit.stats('renders').inFlight === 1)
  const second = get(client(t, b.origin), '/render')
  await waitFor(() => b.app.concurrencyLimit.stats('renders').queued === 1)
  await sleep(400) // past the poll: the permit is still taken
  t.equal(b.app.concurrencyLimit.stats('renders').queued, 1, 'b waits while a holds the permit')
  release()
  t.equal((await first).body, 'a')
  t.equal((await second).body, 'b')
  t.ok(announced > 0, 'the release was announced')
  const waited = admitted - announced
  // The poll would take up to 250 ms; the message is a round trip.
  t.ok(waited < 150, `b admitted ${waited.toFixed(1)} ms after the permit was announced`)
})

t.test('a lease is renewed while its request runs; an instance that vanished frees its permits within leaseMs', async (t) => {
  const server = await RedisServer.start(t)
  const leaseMs = 400
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(release)
  const aRedis = server.client(t)
  const a = await instance(t, { redis: aRedis, leaseMs }, { maxConcurrency: 1 }, (app) => {
    app.get('/render', renders, async () => { await held; return 'a' })
  })
  const b = await instance(t, { redis: server.client(t), leaseMs }, { maxConcurrency: 1, maxQueue: 0 }, (app) => {
    app.get('/render', renders, async () => 'b')
  })
  const bClient = client(t, b.origin)
  get(client(t, a.origin), '/render').catch(() => {})
  await waitFor(() => a.app.concurrencyLimit.stats('renders').inFlight === 1)
  // Three lease lengths later the permit is still a's: renewed, not expired.
  for (let i = 0; i < 3; i++) {
    await sleep(leaseMs)
    const refused = await get(bClient, '/render')
    t.equal(refused.statusCode, 503, `after ${(i + 1) * leaseMs} ms the permit is still held`)
    t.equal(JSON.parse(refused.body).code, 'FST_CONCURRENCY_LIMIT_QUEUE_FULL')
  }
  // a vanishes: it can neither renew nor release.
  aRedis.disconnect()
  const gone = performance.now()
  let freedAfter = -1
  while (performance.now() - gone < leaseMs * 4) {
    if ((await get(bClient, '/render')).statusCode === 200) {
      freedAfter = performance.now() - gone
      break
    }
    await sleep(20)
  }
  t.ok(freedAfter >= 0, 'the permit came free')
  // Renewed at most leaseMs / 3 before it vanished, so not free before 2/3 of leaseMs.
  t.ok(freedAfter >= leaseMs * 2 / 3 - 20, `not given back by a vanished instance: free after ${freedAfter.toFixed(0)} ms`)
  t.ok(freedAfter <= leaseMs + 250, `free ${freedAfter.toFixed(0)} ms after a vanished (leaseMs ${leaseMs})`)
})

t.test('a permit is given back exactly once however the request ends', async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const downstream = new Downstream()
  const a = await instance(t, { redis: server.client(t) }, { maxConcurrency: 2, maxQueue: 50, queueTimeout: 5000 }, (app) => {
    app.get('/render', renders, async () => { await downstream.call(40); return 'ok' })
  })
  const url = `${a.origin}/render`
  // Clients that leave while admitted, while queued, and at once, beside ones that stay.
  const ends = []
  for (let i = 0; i < 30; i++) {
    ends.push(i % 3 === 0 ? get(client(t, a.origin, 1), '/render') : abortAfter(url, { ms: (i % 5) * 15 }))
  }
  await Promise.all(ends)
  const app = a.app
  await waitFor(() => app.concurrencyLimit.stats('renders').inFlight === 0 && app.concurrencyLimit.stats('renders').queued === 0, 5000)
  await sleep(50)
  const stats = app.concurrencyLimit.stats('renders')
  t.equal(stats.completed, stats.admitted, 'every admission released once')
  t.ok(downstream.peak <= 2, `peak ${downstream.peak} <= 2`)
  t.equal(stats.store?.leases, 0, 'no lease held')
  t.equal(await leases(redis), 0, 'no lease left in Redis')
  // The pool works on at full size: nothing leaked.
  const c = client(t, a.origin)
  const answers = await Promise.all([get(c, '/render'), get(c, '/render')])
  t.same(answers.map((x) => x.statusCode), [200, 200])
  t.equal(downstream.peak, 2)
})

t.test('nameSpace: apps in one Redis share a group only when they mean to', async (t) => {
  const server = await RedisServer.start(t)
  const gates: Array<() => void> = []
  t.teardown(() => { for (const open of gates) open() })
  const start = async (nameSpace: string | undefined): Promise<Instance> =>
    await instance(t, { redis: server.client(t), ...(nameSpace === undefined ? {} : { nameSpace }) }, { maxConcurrency: 1, maxQueue: 0 }, (app) => {
      app.get('/render', renders, async () => { await new Promise<void>((resolve) => gates.push(resolve)); return 'ok' })
    })
  const shop = await start('shop:')
  const blog = await start('blog:')
  const shop2 = await start('shop:')
  get(client(t, shop.origin), '/render').catch(() => {})
  await waitFor(() => shop.app.concurrencyLimit.stats('renders').inFlight === 1)
  get(client(t, blog.origin), '/render').catch(() => {})
  await waitFor(() => blog.app.concurrencyLimit.stats('renders').inFlight === 1, 2000, 'the other app to admit its own request')
  const refused = await get(client(t, shop2.origin), '/render')
  t.equal(refused.statusCode, 503, 'a second instance of the same app shares the permit')
  t.equal(shop.app.concurrencyLimit.stats('renders').store?.key, 'shop:renders')
  t.equal(blog.app.concurrencyLimit.stats('renders').store?.key, 'blog:renders')
})

t.test("onStoreError 'refuse': Redis down or frozen answers 503 with its own code, and the pool recovers when it is back", async (t) => {
  const server = await RedisServer.start(t)
  const a = await instance(t, { redis: server.client(t), timeout: 150 }, { maxConcurrency: 2, queueTimeout: 2000 }, (app) => {
    app.get('/render', renders, async () => 'ok')
  })
  const c = client(t, a.origin)
  t.equal((await get(c, '/render')).statusCode, 200)

  // Frozen: the connection stays up and nothing answers.
  server.pause()
  let begin = performance.now()
  const frozen = await get(c, '/render')
  const took = performance.now() - begin
  t.equal(frozen.statusCode, 503)
  t.equal(frozen.headers['retry-after'], '1')
  t.same(JSON.parse(frozen.body), {
    statusCode: 503,
    code: 'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE',
    error: 'Service Unavailable',
    message: 'The shared concurrency limit is unavailable, retry later'
  })
  t.ok(took < 1000, `refused after ${took.toFixed(0)} ms (timeout 150 ms)`)
  // While Redis is known to be down, refusals come at once.
  begin = performance.now()
  t.equal((await get(c, '/render')).statusCode, 503)
  t.ok(performance.now() - begin < 100, 'the next refusal does not wait on Redis')
  server.unpause()
  await waitFor(() => a.app.concurrencyLimit.stats('renders').store?.available === true, 3000, 'Redis to be seen again')
  t.equal((await get(c, '/render')).statusCode, 200, 'served again')

  // Down, then restarted (losing every key).
  await server.stop()
  t.equal((await get(c, '/render')).statusCode, 503)
  await server.resume()
  begin = performance.now()
  let back = false
  while (!back && performance.now() - begin < 5000) {
    back = (await get(c, '/render')).statusCode === 200
    if (!back) await sleep(50)
  }
  t.ok(back, `served again ${(performance.now() - begin).toFixed(0)} ms after the restart`)
  const stats = a.app.concurrencyLimit.stats('renders')
  t.ok((stats.store?.refused ?? 0) >= 3, 'refusals counted')
  t.ok((stats.store?.errors ?? 0) >= 2, 'errors counted')
  t.equal(stats.inFlight, 0)
})

t.test('a Redis slower than queueTimeout never holds a request past queueTimeout', async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const a = await instance(t, { redis: server.client(t), timeout: 5000 }, { maxConcurrency: 2, queueTimeout: 300 }, (app) => {
    app.get('/render', renders, async () => 'ok')
  })
  const c = client(t, a.origin)
  server.pause()
  const begin = performance.now()
  const answer = await get(c, '/render')
  const took = performance.now() - begin
  t.equal(answer.statusCode, 503)
  t.equal(JSON.parse(answer.body).code, 'FST_CONCURRENCY_LIMIT_QUEUE_TIMEOUT')
  t.ok(took < 1000, `answered after ${took.toFixed(0)} ms (queueTimeout 300)`)
  // Redis then answers the call the request had made: the lease it took for
  // a waiter that is gone goes back at once.
  server.unpause()
  await waitFor(() => a.app.concurrencyLimit.stats('renders').queued === 0)
  await sleep(100)
  t.equal(await leases(redis), 0, 'no lease left behind')
  t.equal((await get(c, '/render')).statusCode, 200)
})

t.test("onStoreError 'allow' admits up to maxConcurrency per instance while Redis is down", async (t) => {
  const server = await RedisServer.start(t)
  const downstream = new Downstream()
  const a = await instance(t, { redis: server.client(t, { enableOfflineQueue: false }), onStoreError: 'allow' }, { maxConcurrency: 3, maxQueue: 10, queueTimeout: 5000 }, (app) => {
    app.get('/render', renders, async () => { await downstream.call(50); return 'ok' })
  })
  const c = client(t, a.origin)
  await server.stop()
  const answers = await Promise.all(Array.from({ length: 6 }, () => get(c, '/render')))
  t.same(answers.map((x) => x.statusCode), Array(6).fill(200))
  t.equal(downstream.peak, 3, 'up to maxConcurrency, on this instance alone')
  t.match(a.app.concurrencyLimit.stats('renders').store, { available: false, unleased: 6, leases: 0 })
})

t.test("onStoreError 'local' admits maxConcurrency / instances per instance while Redis is down", async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const downstream = new Downstream()
  let gate = (): void => {}
  let opened = new Promise<void>((resolve) => { gate = resolve })
  const a = await instance(t, { redis: server.client(t), onStoreError: 'local', instances: 2, timeout: 100 }, { maxConcurrency: 4, maxQueue: 10, queueTimeout: 5000 }, (app) => {
    app.get('/render', renders, async () => { await opened; await downstream.call(30); return 'ok' })
  })
  const c = client(t, a.origin)
  // One request holds a lease when Redis goes away.
  const first = get(c, '/render')
  await waitFor(() => a.app.concurrencyLimit.stats('renders').inFlight === 1)
  await server.stop()
  const rest = Array.from({ length: 4 }, () => get(c, '/render'))
  await waitFor(() => a.app.concurrencyLimit.stats('renders').store?.unleased === 1, 3000, 'a fallback admission')
  await sleep(100)
  t.equal(a.app.concurrencyLimit.stats('renders').inFlight, 2, 'maxConcurrency / instances = 2, the leased request included')
  gate()
  const answers = await Promise.all([first, ...rest])
  t.same(answers.map((x) => x.statusCode), Array(5).fill(200))
  t.ok(downstream.peak <= 2, `peak ${downstream.peak} <= 2`)
  // Back: leases again, and the lease the first request held (lost in the
  // restart) was not given back twice.
  await server.resume()
  opened = Promise.resolve()
  let back = false
  for (let i = 0; i < 100 && !back; i++) {
    await get(c, '/render')
    back = a.app.concurrencyLimit.stats('renders').store?.available === true
    if (!back) await sleep(50)
  }
  t.ok(back, 'Redis seen again')
  t.equal((await get(c, '/render')).statusCode, 200)
  t.equal(await leases(redis), 0)
  t.match(a.app.concurrencyLimit.stats('renders'), { inFlight: 0, store: { leases: 0 } }, 'every permit given back')
})

/** An app whose group's Redis is gone (stopped), so that every request of it is refused for that. */
async function storeDown (t: Test, options: ConcurrencyLimitOptions, plugin = concurrencyLimit): Promise<{ app: FastifyInstance, origin: string }> {
  const server = await RedisServer.start(t)
  const app = Fastify({ forceCloseConnections: true })
  await app.register(plugin, {
    global: false,
    rejectDelay: 0,
    ...options,
    groups: { renders: { maxConcurrency: 2, queueTimeout: 2000, store: { redis: server.client(t), timeout: 150 } } }
  })
  app.get('/render', renders, async () => 'ok')
  t.teardown(() => app.close())
  const origin = await listen(app)
  await server.stop()
  return { app, origin }
}

t.test('a store-unavailable refusal is answered as every other refusal: statusCode, errorResponseBuilder, retryAfter, channels, stats', async (t) => {
  const { app, origin } = await storeDown(t, {
    statusCode: 429,
    errorResponseBuilder: (_request, rejection) => ({ reason: rejection.reason, code: rejection.code, status: rejection.statusCode, retryAfter: rejection.retryAfter, pool: rejection.pool })
  })
  const refused: RefuseMessage[] = []
  const onRefuse = (message: unknown): void => { refused.push(message as RefuseMessage) }
  channels.refuse.subscribe(onRefuse)
  t.teardown(() => { channels.refuse.unsubscribe(onRefuse) })
  const c = client(t, origin)
  for (let i = 0; i < 2; i++) {
    const answer = await get(c, '/render')
    t.equal(answer.statusCode, 429, 'the statusCode option')
    t.equal(answer.headers['retry-after'], '1', 'Redis is asked again within a second')
    t.same(JSON.parse(answer.body), { reason: 'storeUnavailable', code: 'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE', status: 429, retryAfter: 1, pool: 'renders' }, 'the errorResponseBuilder option')
  }
  t.same(refused.map((m) => [m.pool, m.reason]), [['renders', 'storeUnavailable'], ['renders', 'storeUnavailable']], 'published on the refuse channel')
  t.match(app.concurrencyLimit.stats('renders'), { rejected: { storeUnavailable: 2, queueFull: 0 }, store: { refused: 2, available: false } })

  // The default body keeps the code, with the status the application chose.
  const plain = await storeDown(t, { statusCode: 429, retryAfter: 7 })
  const answer = await get(client(t, plain.origin), '/render')
  t.equal(answer.statusCode, 429)
  t.equal(answer.headers['retry-after'], '7', 'the retryAfter option')
  t.same(JSON.parse(answer.body), {
    statusCode: 429,
    code: 'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE',
    error: 'Too Many Requests',
    message: 'The shared concurrency limit is unavailable, retry later'
  })
})

t.test('a retry storm against a pool whose Redis is down is braked as one against a full queue', async (t) => {
  // A brake that finds the event loop saturated from the start (see reject-delay.test.ts).
  class SaturatedLoad extends loopLoad.LoopLoad {
    constructor () {
      super()
      this.engaged = true
    }

    override update (): void {}
  }
  const stormPlugin = (await t.mockImport<typeof import('../lib/index.js')>('../lib/index.js', {
    '../lib/rejection.js': await t.mockImport('../lib/rejection.js', {
      '../lib/reject-delay.js': await t.mockImport('../lib/reject-delay.js', {
        '../lib/loop-load.js': { ...loopLoad, LoopLoad: SaturatedLoad }
      })
    })
  })).default
  const { origin } = await storeDown(t, { rejectDelay: 300 }, stormPlugin)
  // Another client finds Redis down first: from then on, refusals come at once.
  t.equal(JSON.parse((await get(client(t, origin), '/render')).body).code, 'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE')
  const c = new Pool(origin, { connections: 1, pipelining: 1 })
  t.teardown(() => c.destroy())
  const timings: number[] = []
  for (let i = 0; i < 2; i++) {
    const begin = performance.now()
    const answer = await get(c, '/render')
    timings.push(performance.now() - begin)
    t.equal(answer.statusCode, 503)
    t.equal(JSON.parse(answer.body).code, 'FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE', 'held, then answered with its own code')
  }
  t.ok(timings[0] < 150, `the first refusal on the connection at once (${timings[0].toFixed(0)} ms)`)
  t.ok(timings[1] >= 220, `the repeated one held back (${timings[1].toFixed(0)} ms, rejectDelay 300)`)
})

t.test('a group with other store settings on a route is refused', async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { groups: { renders: { maxConcurrency: 2, store: { redis } } } })
  t.throws(() => app.get('/a', { config: { concurrencyLimit: { group: 'renders', maxConcurrency: 2, store: { redis, leaseMs: 500 } } } }, async () => 'a'),
    { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /other limits for group "renders"/ })
  t.throws(() => app.get('/c', { config: { concurrencyLimit: { group: 'renders', maxConcurrency: 2 } } }, async () => 'c'),
    { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message: /other limits for group "renders"/ }, 'a route cannot drop the store of its group')
  app.get('/b', { config: { concurrencyLimit: { group: 'renders', maxConcurrency: 2, store: { redis } } } }, async () => 'b')
  t.equal((await app.inject('/b')).body, 'b', 'the same settings join the group')
})

t.test('instances with equal load get equal shares of a small pool: free permits go by turns kept in Redis', async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const downstream = new Downstream()
  const instances = await renderers(t, server, 2, { maxConcurrency: 4, maxQueue: 8, queueTimeout: 2000 }, downstream, 20)
  // Six clients per instance, each sending its next request when the last is answered.
  const served = [0, 0]
  const end = performance.now() + 2000
  await Promise.all(instances.flatMap(({ origin }, i) => {
    const c = client(t, origin, 6)
    return Array.from({ length: 6 }, async () => {
      while (performance.now() < end) {
        if ((await get(c, '/render')).statusCode === 200) served[i]++
      }
    })
  }))
  const share = served[0] / (served[0] + served[1])
  // Without turns, the instance that tends to ask first kept about 70% of the permits.
  t.ok(share >= 0.4 && share <= 0.6, `served ${served.join(' / ')}: ${(100 * share).toFixed(0)}% to the first, between 40 and 60%`)
  t.ok(downstream.peak <= 4, `peak at the downstream ${downstream.peak} <= 4`)
  // Goodput: 4 permits of 20 ms for 2 s is 400 at most.
  t.ok(served[0] + served[1] >= 200, `${served[0] + served[1]} served`)
  for (const { app } of instances) await app.close()
  t.same(await redis.keys('*'), [], 'no key left in Redis once both are closed')
})

t.test("a dead instance's turn holds the pool no longer than three poll intervals", async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const leaseMs = 400 // a poll every 100 ms: a waiting instance not heard from for 300 ms is dead
  const a = await instance(t, { redis: server.client(t), leaseMs }, { maxConcurrency: 1, queueTimeout: 5000 }, (app) => {
    app.get('/render', renders, async () => 'a')
  })
  // An instance that was waiting for a permit, heard from just now, first in turn, and dead.
  const [seconds, micros] = await redis.time()
  await redis.zadd('fastify-concurrency-limit:renders:turns', 0, 'dead:')
  await redis.zadd('fastify-concurrency-limit:renders:seen', Number(seconds) * 1000 + Math.floor(Number(micros) / 1000), 'dead:')
  const begin = performance.now()
  const answer = await get(client(t, a.origin), '/render')
  const waited = performance.now() - begin
  t.equal(answer.statusCode, 200)
  t.ok(waited >= 200, `the free permit was kept for the dead instance's turn at first (${waited.toFixed(0)} ms)`)
  t.ok(waited <= 300 + 100 + 150, `and given to a live one within a poll of its staleness: ${waited.toFixed(0)} ms`)
  t.equal(await leases(redis), 0)
  t.same(await redis.keys('*'), [], 'the dead turn is gone, and so is the live one that was served')
})

t.test('an instance whose waiters are gone gives up its turn at once', async (t) => {
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(release)
  const a = await instance(t, { redis: server.client(t) }, { maxConcurrency: 1 }, (app) => {
    app.get('/render', renders, async () => { await held; return 'a' })
  })
  const b = await instance(t, { redis: server.client(t) }, { maxConcurrency: 1, queueTimeout: 300 }, (app) => {
    app.get('/render', renders, async () => 'b')
  })
  const first = get(client(t, a.origin), '/render')
  await waitFor(() => a.app.concurrencyLimit.stats('renders').inFlight === 1)
  const turns = async (): Promise<string[]> => await redis.zrange('fastify-concurrency-limit:renders:turns', 0, -1)
  // Left to itself, a turn would go three polls (750 ms) after its
  // instance's last call, and only when another instance asks.

  // b's waiter times out.
  const timedOut = get(client(t, b.origin), '/render')
  await waitFor(() => b.app.concurrencyLimit.stats('renders').queued === 1)
  await sleep(50)
  t.equal((await turns()).length, 1, 'b waits in turn')
  t.equal(JSON.parse((await timedOut).body).code, 'FST_CONCURRENCY_LIMIT_QUEUE_TIMEOUT')
  let gone = performance.now()
  while ((await turns()).length > 0 && performance.now() - gone < 1000) await sleep(2)
  t.ok(performance.now() - gone < 200, `its turn gone ${(performance.now() - gone).toFixed(0)} ms after the timeout, not at the next poll`)

  // b's waiter leaves (its client goes).
  const left = abortAfter(`${b.origin}/render`, { ms: 100 })
  await waitFor(() => b.app.concurrencyLimit.stats('renders').queued === 1)
  await sleep(50)
  t.equal((await turns()).length, 1, 'b waits in turn again')
  await left
  await waitFor(() => b.app.concurrencyLimit.stats('renders').queued === 0)
  gone = performance.now()
  while ((await turns()).length > 0 && performance.now() - gone < 1000) await sleep(2)
  t.ok(performance.now() - gone < 200, `its turn gone ${(performance.now() - gone).toFixed(0)} ms after the client left`)

  // b is closed while it waits.
  const closing = get(client(t, b.origin), '/render')
  await waitFor(() => b.app.concurrencyLimit.stats('renders').queued === 1)
  await sleep(50)
  t.equal((await turns()).length, 1)
  await b.app.close()
  t.equal((await closing).statusCode, 503)
  t.same(await turns(), [], 'gone when b closed')
  release()
  t.equal((await first).body, 'a')
  t.equal(await leases(redis), 0)
  t.same(await redis.keys('*'), [], 'no key left behind')
})

t.test('several permits freed at once are shared out by turns, whichever instance asks first', async (t) => {
  class Counted implements Waiter {
    prev: Waiter | null = null
    next: Waiter | null = null
    enqueuedAt = 0
    deadline = 0
    readonly level = NORMAL
    constructor (readonly admitted: { count: number }) {}
    admit (): boolean {
      this.admitted.count++
      return true
    }

    reject (_reason: RejectReason): void {}
  }
  const server = await RedisServer.start(t)
  const redis = server.client(t)
  const key = 'fastify-concurrency-limit:p'
  for (const first of [0, 1]) {
    // Four permits held elsewhere; two instances wait for them, a first.
    await redis.zadd(key, Date.now() + 60_000, 'x1', Date.now() + 60_000, 'x2', Date.now() + 60_000, 'x3', Date.now() + 60_000, 'x4')
    const instances = [0, 1].map(() => {
      const admitted = { count: 0 }
      const store = checkStore('', { redis: server.client(t) }, [])
      const limiter = new Limiter('p', { maxConcurrency: 4, maxQueue: 10, queueTimeout: 60_000, store }, undefined, (l) => new RedisPermits(l, store))
      t.teardown(() => { limiter.close() })
      return { admitted, limiter }
    })
    for (const [n, { admitted, limiter }] of instances.entries()) {
      for (let i = 0; i < 3; i++) limiter.enqueue(new Counted(admitted))
      for (let i = 0; i < 100 && await redis.zcard(key + ':turns') < n + 1; i++) await sleep(2)
    }
    t.equal(await redis.zcard(key + ':turns'), 2, 'both wait in turn')
    // The four are freed without a message; one instance asks (a new waiter wakes it).
    await redis.del(key)
    instances[first].limiter.enqueue(new Counted(instances[first].admitted))
    await waitFor(() => instances[0].admitted.count + instances[1].admitted.count === 4, 240, 'the four permits taken, before a poll (250 ms)')
    t.same(instances.map((x) => x.admitted.count), [2, 2], `two each, ${first === 0 ? 'the first to wait' : 'the second'} asking first`)
    for (const { limiter } of instances) limiter.close()
    await sleep(20)
    await redis.del(key)
    t.same(await redis.keys('*'), [], 'closed: no turn left')
  }
})
