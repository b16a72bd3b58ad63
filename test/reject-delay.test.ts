import t, { type Test } from 'tap'
import { Client } from 'undici'
import Fastify from 'fastify'
import concurrencyLimit, { type ConcurrencyLimitOptions } from '../lib/index.js'
import { build, listen, get, waitFor, Gauge, sleep } from './helpers/server.js'

// One slot, taken for the whole test; every other request is refused.
async function saturated (t: Test, options: ConcurrencyLimitOptions) {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0, ...options })
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

t.test('a connection refused again within a second is held back, longer each time', async (t) => {
  const { app, connection } = await saturated(t, {})
  const client = connection()
  const first = await timed(client)
  t.ok(first.ms < 150, `the first refusal is immediate (${first.ms} ms)`)
  const pending = timed(client)
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 1, 500, 'a held refusal')
  const second = await pending
  t.ok(second.ms >= 240 && second.ms < 600, `the second waits about 250 ms (${second.ms} ms)`)
  const third = await timed(client)
  t.ok(third.ms >= 490 && third.ms < 900, `the third about 500 ms (${third.ms} ms)`)
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
  t.ok(second.ms >= 240 && second.ms < 500, `250 ms (${second.ms} ms)`)
  const third = await timed(client)
  t.ok(third.ms >= 290 && third.ms < 550, `capped at 300 ms (${third.ms} ms)`)
  await sleep(1100)
  const fresh = await timed(client)
  t.ok(fresh.ms < 150, `after a quiet second the streak is over (${fresh.ms} ms)`)
})

t.test('rejectDelay 0 answers every refusal at once', async (t) => {
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
  t.ok((await heldA).ms >= 240)
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
  await waitFor(() => app.concurrencyLimit.stats().heldRejections === 0, 1000, 'the held refusal to go')
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 2)
})

t.test('close() answers held refusals at once', async (t) => {
  const app = Fastify({ return503OnClosing: false })
  await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0, rejectDelay: 5000 })
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
