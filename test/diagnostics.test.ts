import t, { type Test } from 'tap'
import diagnostics from 'node:diagnostics_channel'
import { Writable } from 'node:stream'
import Fastify, { type FastifyRequest } from 'fastify'
import concurrencyLimit, { channels, type RequestConcurrencyLimit } from '../lib/index.js'
import { abortAfter, build, client, Gauge, get, listen, sleep, waitFor } from './helpers/server.js'

const NAMES = ['queue', 'admit', 'refuse', 'abandon', 'release'] as const

interface Event { channel: string, path: string, pool: string, reason?: string, queuedMs?: number }

/** Subscribes to every channel for the test; events in the order published. */
function record (t: Test): Event[] {
  const events: Event[] = []
  for (const name of NAMES) {
    const listener = (message: unknown): void => {
      const { request, pool, reason, queuedMs } = message as { request: FastifyRequest, pool: string, reason?: string, queuedMs?: number }
      events.push({ channel: name, path: request.url, pool, ...(reason === undefined ? {} : { reason }), ...(queuedMs === undefined ? {} : { queuedMs }) })
    }
    diagnostics.subscribe(`fastify-concurrency-limit:${name}`, listener)
    t.teardown(() => { diagnostics.unsubscribe(`fastify-concurrency-limit:${name}`, listener) })
  }
  return events
}

t.test('diagnostics channels tell each request\'s way through the pool', async (t) => {
  const events = record(t)
  const gate = new Gauge()
  const facts: Array<[string, RequestConcurrencyLimit | null]> = []
  const app = await build(t, { maxConcurrency: 1, maxQueue: 1, queueTimeout: 200, rejectDelay: 0 })
  app.addHook('onResponse', async (request) => { facts.push([request.url, request.concurrencyLimit]) })
  app.get('/a', async () => { gate.enter(); await gate.wait(); return 'a' })
  for (const path of ['/b', '/c', '/d', '/e', '/f']) app.get(path, async () => path)
  const url = await listen(app)
  const pool = client(t, url)

  const a = get(pool, '/a')
  await waitFor(() => gate.current === 1)
  const b = get(pool, '/b') // queued, times out
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  t.equal((await get(pool, '/c')).statusCode, 503, 'c: queue full')
  t.equal((await b).statusCode, 503, 'b: queue timeout')
  // d: queued, its client leaves.
  await abortAfter(`${url}/d`, { until: waitFor(() => app.concurrencyLimit.stats().queued === 1) })
  await waitFor(() => app.concurrencyLimit.stats().abandoned === 1)
  const e = get(pool, '/e') // queued, admitted when a ends
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  await sleep(30)
  gate.open()
  t.equal((await a).statusCode, 200)
  t.equal((await e).statusCode, 200)
  t.equal((await get(pool, '/f')).statusCode, 200)
  await waitFor(() => events.filter((e) => e.channel === 'release').length === 3)

  const of = (path: string): string[] => events.filter((e) => e.path === path).map((e) => e.channel + (e.reason === undefined ? '' : `:${e.reason}`))
  t.same(of('/a'), ['admit', 'release'])
  t.same(of('/b'), ['queue', 'refuse:queueTimeout'])
  t.same(of('/c'), ['refuse:queueFull'])
  t.same(of('/d'), ['queue', 'abandon'])
  t.same(of('/e'), ['queue', 'admit', 'release'])
  t.same(of('/f'), ['admit', 'release'])
  t.ok(events.every((e) => e.pool === 'default'), 'each names its pool')
  t.equal(events.find((e) => e.path === '/a' && e.channel === 'admit')?.queuedMs, 0, 'admitted at once: 0 ms')
  const waited = events.find((e) => e.path === '/e' && e.channel === 'admit')?.queuedMs as number
  t.ok(waited >= 25, `e waited about 30 ms (${waited})`)
  t.ok((events.find((e) => e.channel === 'abandon')?.queuedMs as number) >= 0, 'an abandon says how long it waited')

  // request.concurrencyLimit: what admitted the request and how long it waited.
  const factsOf = new Map(facts)
  t.same(factsOf.get('/a'), { pool: 'default', queuedMs: 0 })
  t.same(factsOf.get('/e'), { pool: 'default', queuedMs: waited })
  t.ok(Object.isFrozen(factsOf.get('/a')), 'admitted at once: the route\'s shared facts, read-only')
  t.equal(factsOf.get('/b'), null, 'a refused request was never admitted')
  t.equal(factsOf.get('/c'), null)
})

t.test('requests of a route admitted at once share one read-only facts object; a queued one has its own', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 1, rejectDelay: 0 })
  const seen: Array<RequestConcurrencyLimit | null> = []
  app.get('/', async (request) => { seen.push(request.concurrencyLimit); await new Promise((resolve) => setTimeout(resolve, 20)); return 'ok' })
  await app.inject('/')
  await app.inject('/')
  t.equal(seen[0], seen[1], 'the same object')
  t.throws(() => { (seen[0] as { queuedMs: number }).queuedMs = 5 }, TypeError, 'frozen: a handler cannot change what others read')
  await Promise.all([app.inject('/'), app.inject('/')])
  t.not(seen[3], seen[0], 'one that waited has facts of its own')
  t.ok((seen[3]?.queuedMs as number) > 0)
})

t.test('nothing is published without subscribers', async (t) => {
  const published: string[] = []
  for (const name of NAMES) {
    const channel = channels[name]
    const publish = channel.publish
    channel.publish = (message: unknown) => { published.push(name); publish.call(channel, message) }
    t.teardown(() => { channel.publish = publish })
    t.equal(channel.hasSubscribers, false, `${name}: no subscriber`)
  }
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0, rejectDelay: 0 })
  const gate = new Gauge()
  app.get('/', async () => { gate.enter(); await gate.wait(); return 'ok' })
  const url = await listen(app)
  const pool = client(t, url)
  const a = get(pool, '/')
  await waitFor(() => gate.current === 1)
  t.equal((await get(pool, '/')).statusCode, 503)
  gate.open()
  t.equal((await a).statusCode, 200)
  t.same(published, [])
})

t.test('request.concurrencyLimit is null where no pool admits', async (t) => {
  const app = await build(t, { exempt: ['/health'] })
  app.get('/health', async (request) => ({ facts: request.concurrencyLimit }))
  app.get('/free', { config: { concurrencyLimit: false } }, async (request) => ({ facts: request.concurrencyLimit }))
  app.get('/own', { config: { concurrencyLimit: { maxConcurrency: 2 } } }, async (request) => ({ facts: request.concurrencyLimit }))
  t.same((await app.inject('/health')).json(), { facts: null })
  t.same((await app.inject('/free')).json(), { facts: null })
  t.same((await app.inject('/own')).json(), { facts: { pool: 'GET /own', queuedMs: 0 } })
})

t.test('two registrations share one request decorator', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { groups: { outer: {} } })
  await app.register(async (child) => {
    await child.register(concurrencyLimit, { maxConcurrency: 3 })
    child.get('/inner', async (request) => ({ facts: request.concurrencyLimit }))
  })
  t.same((await app.inject('/inner')).json(), { facts: { pool: 'default', queuedMs: 0 } })
})

t.test('serverTiming adds the queue time to admitted responses', async (t) => {
  const gate = new Gauge()
  const app = await build(t, { maxConcurrency: 1, maxQueue: 1, rejectDelay: 0, serverTiming: true })
  app.get('/', async () => { gate.enter(); await gate.wait(); return 'ok' })
  const url = await listen(app)
  const pool = client(t, url)
  const a = get(pool, '/')
  await waitFor(() => gate.current === 1)
  const b = get(pool, '/')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  const c = await get(pool, '/')
  await sleep(30)
  gate.open()
  t.equal((await a).headers['server-timing'], 'queue;dur=0', 'admitted at once')
  const timing = (await b).headers['server-timing'] as string
  const dur = Number(/^queue;dur=(\d+(?:\.\d)?)$/.exec(timing)?.[1])
  t.ok(dur >= 25 && dur < 5000, `queued: ${timing}`)
  t.equal(c.statusCode, 503)
  t.equal(c.headers['server-timing'], undefined, 'not on a refusal')

  const off = await build(t)
  off.get('/', async () => 'ok')
  t.equal((await off.inject('/')).headers['server-timing'], undefined, 'off by default')
})

function capture (): { stream: Writable, lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = []
  const stream = new Writable({
    write (chunk: Buffer, _encoding, callback) {
      for (const line of chunk.toString().split('\n')) if (line !== '') lines.push(JSON.parse(line) as Record<string, unknown>)
      callback()
    }
  })
  return { stream, lines }
}

t.test('logRefusals logs each refusal with its pool and reason', async (t) => {
  for (const [logRefusals, level] of [['warn', 40], ['debug', 20], [undefined, null], [false, null]] as const) {
    const { stream, lines } = capture()
    const app = Fastify({ logger: { level: 'trace', stream } })
    await app.register(concurrencyLimit, { maxConcurrency: 1, maxQueue: 0, rejectDelay: 0, logRefusals })
    const gate = new Gauge()
    app.get('/', async () => { gate.enter(); await gate.wait(); return 'ok' })
    const a = app.inject('/')
    await waitFor(() => gate.current === 1)
    t.equal((await app.inject('/')).statusCode, 503)
    gate.open()
    await a
    await app.close()
    const refusals = lines.filter((line) => line.msg === 'request refused by fastify-concurrency-limit')
    if (level === null) {
      t.same(refusals, [], `logRefusals ${String(logRefusals)}: none`)
    } else {
      t.match(refusals, [{ level, pool: 'default', reason: 'queueFull', reqId: String }], `logRefusals ${logRefusals}`)
      t.equal(refusals.length, 1)
    }
  }
})

t.test('invalid serverTiming and logRefusals are refused with a code', async (t) => {
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ serverTiming: 'yes' }, /serverTiming must be a boolean, received "yes"/],
    [{ logRefusals: true }, /logRefusals must be false or a log level \(fatal, error, warn, info, debug, trace\), received true/],
    [{ logRefusals: 'verbose' }, /logRefusals must be .*received "verbose"/]
  ]
  for (const [options, message] of cases) {
    const app = Fastify()
    await t.rejects(async () => { await app.register(concurrencyLimit, options) }, { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message })
    await app.close()
  }
})
