import t, { type Test } from 'tap'
import { EventEmitter } from 'node:events'
import { Client } from 'undici'
import Fastify, { type FastifyPluginAsync } from 'fastify'
import concurrencyLimit, { type ConcurrencyLimitOptions } from '../lib/index.js'
import * as loopLoad from '../lib/loop-load.js'
import { listen, get, waitFor, Gauge, sleep } from './helpers/server.js'

// The plugin with a brake that finds the event loop saturated from the
// start, as in a retry storm: what it holds back, and for how long, without
// having to saturate the loop of the test itself (one test below does).
class SaturatedLoad extends loopLoad.LoopLoad {
  constructor () {
    super()
    this.engaged = true
  }

  override update (): void {}

  // A storm from the start, long confirmed: holds grow at once.
  override get escalates (): boolean {
    return true
  }

  // Saturated for good: the storm never ends, not even when refusals pause.
  override stop (): void {
    super.stop()
    this.engaged = true
  }
}
// Mocks reach a module's own imports: one level at a time, down to the brake's.
const stormPlugin = (await t.mockImport<typeof import('../lib/index.js')>('../lib/index.js', {
  '../lib/rejection.js': await t.mockImport('../lib/rejection.js', {
    '../lib/reject-delay.js': await t.mockImport('../lib/reject-delay.js', {
      '../lib/loop-load.js': { ...loopLoad, LoopLoad: SaturatedLoad }
    })
  })
})).default

// One slot, taken for the whole test; every other request is refused.
async function saturated (t: Test, options: ConcurrencyLimitOptions, plugin: FastifyPluginAsync<ConcurrencyLimitOptions> = stormPlugin) {
  const app = Fastify({ forceCloseConnections: true })
  await app.register(plugin, { maxConcurrency: 1, maxQueue: 0, ...options })
  t.teardown(() => app.close())
  const gauge = new Gauge()
  app.get('/hold', async () => { gauge.enter(); await gauge.wait(); return 'x' })
  const origin = await listen(app)
  const holder = new Client(origin)
  const held = get(holder, '/hold')
  await waitFor(() => gauge.current === 1)
  t.teardown(async () => { gauge.open(); await held; await holder.close() })
  // One keep-alive connection, as a client retrying on the same socket has.
  const connection = (): Client => {
    const c = new Client(origin, { pipelining: 1 })
    t.teardown(() => c.destroy())
    return c
  }
  return { app, origin, connection }
}

async function timed (client: Client): Promise<{ ms: number, status: number, code: string }> {
  const started = Date.now()
  const answer = await get(client, '/hold')
  return { ms: Date.now() - started, status: answer.statusCode, code: JSON.parse(answer.body).code }
}

t.test('with the event loop not saturated, repeated refusals on one keep-alive connection are answered at once', async (t) => {
  const { app, connection } = await saturated(t, {}, concurrencyLimit)
  const client = connection()
  for (let i = 0; i < 8; i++) {
    const answer = await timed(client)
    t.match(answer, { status: 503, code: 'FST_CONCURRENCY_LIMIT_QUEUE_FULL' })
    t.ok(answer.ms < 150, `refusal ${i + 1} is immediate (${answer.ms} ms)`)
    t.equal(app.concurrencyLimit.stats().heldRejections, 0)
  }
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 8)
})

t.test('a retry storm that saturates the event loop engages the brake; once it ends, the brake lets go', async (t) => {
  const { app, connection } = await saturated(t, {}, concurrencyLimit)
  // Clients that retry every refusal at once, in this process: client and
  // server share its event loop, and the refusals fill it.
  const calm = new AbortController()
  const storm = Array.from({ length: 100 }, async () => {
    const client = connection()
    while (!calm.signal.aborted) await get(client, '/hold')
  })
  await waitFor(() => app.concurrencyLimit.stats().heldRejections > 0, 10_000, 'a held refusal')
  t.pass(`held after ${app.concurrencyLimit.stats().rejected.queueFull} refusals`)
  calm.abort()
  await Promise.all(storm)
  // The brake lets go after its hold, once a sample finds the loop free.
  const client = connection()
  await timed(client)
  const started = Date.now()
  let last = await timed(client)
  while (last.ms >= 150 && Date.now() - started < 10_000) last = await timed(client)
  t.ok(last.ms < 150, `released ${Date.now() - started} ms after the storm`)
  for (let i = 0; i < 4; i++) {
    const answer = await timed(client)
    t.ok(answer.ms < 150, `then repeated refusals are immediate again (${answer.ms} ms)`)
  }
})

t.test('a connection refused again within a second is held back a second, then twice as long each time', async (t) => {
  const { app, connection } = await saturated(t, { rejectDelay: 4000 })
  const client = connection()
  const first = await timed(client)
  t.ok(first.ms < 150, `the first refusal is immediate (${first.ms} ms)`)
  const pending = timed(client)
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 1, 500, 'a held refusal')
  const second = await pending
  // Each hold is up to a quarter shorter, at random.
  t.ok(second.ms >= 740 && second.ms < 1350, `the second waits 750 to 1000 ms (${second.ms} ms)`)
  const third = await timed(client)
  t.ok(third.ms >= 1490 && third.ms < 2350, `the third 1500 to 2000 ms (${third.ms} ms)`)
  for (const answer of [first, second, third]) t.match(answer, { status: 503, code: 'FST_CONCURRENCY_LIMIT_QUEUE_FULL' })
  t.equal(app.concurrencyLimit.stats().heldRejections, 0)
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 3)

  const other = await timed(connection())
  t.ok(other.ms < 150, `another connection's first refusal is immediate (${other.ms} ms)`)
})

t.test('the delay stops at rejectDelay, and a quiet second starts afresh', async (t) => {
  const { connection } = await saturated(t, { rejectDelay: 300 })
  const client = connection()
  await timed(client)
  const second = await timed(client)
  t.ok(second.ms >= 220 && second.ms < 550, `capped at 300 ms, a quarter less at most (${second.ms} ms)`)
  const third = await timed(client)
  t.ok(third.ms >= 220 && third.ms < 550, `and again (${third.ms} ms)`)
  await sleep(1100)
  const fresh = await timed(client)
  t.ok(fresh.ms < 150, `after a quiet second the streak is over (${fresh.ms} ms)`)
})

t.test('rejectDelay 0 answers every refusal at once, even in a storm', async (t) => {
  const { connection } = await saturated(t, { rejectDelay: 0 })
  const client = connection()
  for (let i = 0; i < 4; i++) {
    const answer = await timed(client)
    t.ok(answer.ms < 150, `refusal ${i + 1} is immediate (${answer.ms} ms)`)
  }
})

t.test('past maxHeldRejections, refusals are answered at once', async (t) => {
  const { app, connection } = await saturated(t, { maxHeldRejections: 1 })
  const a = connection()
  const b = connection()
  await timed(a)
  await timed(b)
  const heldA = timed(a)
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 1)
  const now = await timed(b)
  t.ok(now.ms < 150, `the line is full: answered at once (${now.ms} ms)`)
  t.ok((await heldA).ms >= 740)
})

t.test('a held client that leaves gets no answer and frees its place', async (t) => {
  const { app, origin } = await saturated(t, {})
  // One connection: refused once, then held, then the client gives up.
  const ac = new AbortController()
  const client = new Client(origin)
  t.teardown(() => client.destroy())
  await get(client, '/hold')
  const pending = client.request({ path: '/hold', method: 'GET', signal: ac.signal }).catch((err: Error) => err)
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 1)
  ac.abort()
  t.type(await pending, Error)
  // Before its hold (0.75 to 1 s) would end.
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 0, 700, 'the held refusal to go')
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 2)
})

t.test('close() answers held refusals at once', async (t) => {
  const app = Fastify({ return503OnClosing: false })
  await app.register(stormPlugin, { maxConcurrency: 1, maxQueue: 0, rejectDelay: 5000 })
  const gauge = new Gauge()
  app.get('/hold', async () => { gauge.enter(); await gauge.wait(); return 'x' })
  const origin = await listen(app)
  const holder = new Client(origin)
  const client = new Client(origin)
  const held = get(holder, '/hold')
  await waitFor(() => gauge.current === 1)
  await timed(client)
  const refused = timed(client)
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 1)
  const closing = app.close()
  const answer = await refused
  t.ok(answer.ms < 1000, `answered on close, not after 5 s (${answer.ms} ms)`)
  t.equal(answer.status, 503)
  gauge.open()
  await held
  await Promise.all([client.close(), holder.close()])
  await closing
})

t.test('closeOnReject sends Connection: close with every refusal', async (t) => {
  const { connection } = await saturated(t, { closeOnReject: true })
  const answer = await get(connection(), '/hold')
  t.equal(answer.statusCode, 503)
  t.equal(answer.headers.connection, 'close')
})

// The brake on its own, with requests reduced to what it reads.
t.test('the brake, unit by unit', async (t) => {
  const { RECENT_SAMPLES, RejectDelay, STREAK_WINDOW } = await import('../lib/reject-delay.js')
  type Limiter = import('../lib/limiter.js').Limiter
  type Request = import('fastify').FastifyRequest
  type Reply = import('fastify').FastifyReply
  const limiter = { heldRejections: 0 } as unknown as Limiter
  const request = (socket: object, httpVersionMajor = 1): Request => ({ raw: { httpVersionMajor, socket } }) as unknown as Request
  // A response that emits 'close' when its client leaves.
  const reply = (closed = false): Reply => ({ raw: Object.assign(new EventEmitter(), { closed }) }) as unknown as Reply
  const brake = () => {
    const answered: Request[] = []
    const load = new loopLoad.LoopLoad({ sample: () => 0, every: () => () => {} })
    const delay = new RejectDelay(1000, 10, (_limiter, req) => { answered.push(req) }, load)
    return { delay, load, answered }
  }

  t.test('disengaged, a refusal leaves a small integer on its connection, and is counted', async (t) => {
    const { delay, load } = brake()
    const socket: Record<symbol, unknown> = {}
    load.samples = 7
    for (let i = 0; i < 3; i++) t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), false)
    t.same(Object.getOwnPropertySymbols(socket).map((key) => socket[key]), [7], 'the sample it was refused in')
    t.equal(load.sampling, true, 'the refusals are counted')
  })

  t.test('engaged, a connection refused just before is held at its first refusal; one refused earlier is not', async (t) => {
    const { delay, load, answered } = brake()
    const recent = {}
    const earlier = {}
    load.samples = 10
    delay.hold(limiter, request(earlier), reply(), 'queueFull')
    load.samples = 10 + RECENT_SAMPLES
    delay.hold(limiter, request(recent), reply(), 'queueFull')
    load.samples += RECENT_SAMPLES
    load.engaged = true
    t.equal(delay.hold(limiter, request(recent), reply(), 'queueFull'), true, `refused ${RECENT_SAMPLES} samples before: a retry`)
    t.equal(delay.hold(limiter, request(earlier), reply(), 'queueFull'), false, `refused ${2 * RECENT_SAMPLES} samples before: a first try`)
    t.equal(delay.hold(limiter, request(earlier), reply(), 'queueFull'), true, 'and its retry is held')
    delay.drain()
    t.equal(answered.length, 2)
  })

  t.test('holds grow past the first only once the brake has held for a first hold', async (t) => {
    let clock = 0
    const load = new loopLoad.LoopLoad({ sample: () => 0, every: () => () => {}, now: () => clock })
    const delay = new RejectDelay(4000, 10, () => {}, load)
    t.teardown(() => { delay.drain() })
    for (let i = 0; i < loopLoad.ENGAGE_SAMPLES; i++) {
      clock += loopLoad.SAMPLE_MS
      load.update(1, loopLoad.MIN_REFUSALS, clock)
    }
    t.equal(load.engaged, true)
    t.equal(load.escalates, false, 'just engaged: it may be a burst')
    const socket: Record<symbol, { delay: number }> = {}
    const streak = (): number => socket[Object.getOwnPropertySymbols(socket)[0]].delay
    t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), false, 'a first try')
    t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), true)
    t.equal(streak(), 1000)
    t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), true)
    t.equal(streak(), 1000, 'not longer while the engagement is young')
    clock += loopLoad.FIRST_HOLD_MS
    t.equal(load.escalates, true, 'held for a first hold: a storm')
    t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), true)
    t.equal(streak(), 2000, 'then twice as long')
    t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), true)
    t.equal(streak(), 4000, 'up to rejectDelay')
  })

  t.test('each refusal tells the brake whether it is a retry: its connection refused within RECENT_SAMPLES, or held', async (t) => {
    const seen: boolean[] = []
    class Recording extends loopLoad.LoopLoad {
      override refused (retry: boolean): void {
        seen.push(retry)
        super.refused(retry)
      }
    }
    const load = new Recording({ sample: () => 0, every: () => () => {} })
    const delay = new RejectDelay(1000, 10, () => {}, load)
    const socket = {}
    load.samples = 10
    delay.hold(limiter, request(socket), reply(), 'queueFull')
    load.samples = 10 + RECENT_SAMPLES
    delay.hold(limiter, request(socket), reply(), 'queueFull')
    load.samples += RECENT_SAMPLES + 1
    delay.hold(limiter, request(socket), reply(), 'queueFull')
    t.same(seen, [false, true, false], 'new, refused RECENT_SAMPLES before, refused longer before')
    load.engaged = true
    delay.hold(limiter, request(socket), reply(), 'queueFull')
    delay.hold(limiter, request(socket), reply(), 'queueFull')
    t.same(seen.slice(3), [true, true], 'engaged: a retry, then a connection with a streak')
    delay.drain()
    // A streak answered longer than STREAK_WINDOW ago: an idle connection.
    const streak = (socket as Record<symbol, { answeredAt: number }>)[Object.getOwnPropertySymbols(socket)[0]]
    streak.answeredAt = performance.now() - STREAK_WINDOW - 10
    delay.hold(limiter, request(socket), reply(), 'queueFull')
    t.equal(seen.at(-1), false, 'a streak over STREAK_WINDOW old: a first try')
  })

  t.test('a held client that leaves frees its place at once and gets no answer', async (t) => {
    const answered: Request[] = []
    const load = new loopLoad.LoopLoad({ sample: () => 0, every: () => () => {} })
    const delay = new RejectDelay(1000, 10, (_limiter, req) => { answered.push(req) }, load)
    load.engaged = true
    const req = request({})
    const res = reply()
    delay.hold(limiter, req, res, 'queueFull')
    t.equal(delay.hold(limiter, req, res, 'queueFull'), true)
    t.equal(delay.size, 1)
    t.equal(load.held(), 1, 'the brake sees how many are held')
    t.equal(limiter.heldRejections, 1)
    res.raw.emit('close')
    t.equal(delay.size, 0)
    t.equal(limiter.heldRejections, 0)
    delay.drain()
    t.same(answered, [], 'not answered, not even at close()')
    // Answered: its response closes after, which is no client leaving.
    const other = reply()
    load.engaged = true
    t.equal(delay.hold(limiter, req, other, 'queueFull'), true)
    delay.drain()
    other.raw.emit('close')
    t.equal(answered.length, 1)
    t.equal(delay.size, 0)
    t.equal(other.raw.listenerCount('close'), 0)
  })

  t.test('the refusal of a client that already left is answered at once, not held', async (t) => {
    const { delay, load } = brake()
    load.engaged = true
    const req = request({})
    delay.hold(limiter, req, reply(), 'queueFull')
    t.equal(delay.hold(limiter, req, reply(true), 'queueFull'), false)
    t.equal(delay.size, 0)
    t.equal(delay.hold(limiter, req, reply(), 'queueFull'), true, 'the connection\'s next refusal is held')
    delay.drain()
  })

  t.test('engaged, HTTP/2 refusals are neither held nor counted', async (t) => {
    const { delay, load } = brake()
    load.engaged = true
    const session = {}
    for (let i = 0; i < 3; i++) t.equal(delay.hold(limiter, request(session, 2), reply(), 'queueFull'), false)
    t.equal(load.sampling, false)
    t.same(Object.getOwnPropertySymbols(session), [])
  })

  t.test('holds are up to a quarter shorter, at random', async (t) => {
    const { delay, load } = brake()
    load.engaged = true
    const originalRandom = Math.random
    t.teardown(() => { Math.random = originalRandom })
    const holds: number[] = []
    for (const random of [0, 0.999]) {
      Math.random = () => random
      const socket: Record<symbol, { answeredAt: number }> = {}
      delay.hold(limiter, request(socket), reply(), 'queueFull')
      const before = performance.now()
      t.equal(delay.hold(limiter, request(socket), reply(), 'queueFull'), true)
      holds.push(Math.round(socket[Object.getOwnPropertySymbols(socket)[0]].answeredAt - before))
    }
    // Measured from just before the call: a busy machine adds a few ms.
    t.ok(holds[0] >= 999 && holds[0] <= 1050, `${holds[0]} ms`)
    t.ok(holds[1] >= 750 && holds[1] <= 800, `${holds[1]} ms`)
    delay.drain()
  })

  t.test('when the brake lets go, what it holds waits out its hold; drain() answers it and stops sampling', async (t) => {
    const { delay, load, answered } = brake()
    load.engaged = true
    const sockets = [{}, {}]
    const requests = sockets.map((socket) => request(socket))
    for (const req of requests) t.equal(delay.hold(limiter, req, reply(), 'queueFull'), false, 'a first refusal is answered')
    for (const req of requests) t.equal(delay.hold(limiter, req, reply(), 'queueFull'), true, 'a repeated one is held')
    t.equal(delay.size, 2)
    t.equal(limiter.heldRejections, 2)
    load.engaged = false
    t.equal(delay.hold(limiter, requests[0], reply(), 'queueFull'), false, 'released: even a repeated refusal is answered at once')
    t.same(answered, [])
    delay.drain()
    t.same(answered, requests)
    t.equal(delay.size, 0)
    t.equal(limiter.heldRejections, 0)
    t.equal(load.sampling, false)
  })

  t.test('when holding did not lighten the loop, what it holds is answered at once', async (t) => {
    const { delay, load, answered } = brake()
    load.engaged = true
    const req = request({})
    delay.hold(limiter, req, reply(), 'queueFull')
    t.equal(delay.hold(limiter, req, reply(), 'queueFull'), true)
    load.onMisjudged?.()
    t.same(answered, [req])
    t.equal(delay.size, 0)
    delay.drain()
  })
})
