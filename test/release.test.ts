import t, { type Test } from 'tap'
import { Readable } from 'node:stream'
import { connect } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { request as undiciRequest } from 'undici'
import { build, listen, client, get, abortAfter, waitFor, sleep, Gauge } from './helpers/server.js'

// Each test ends a request one way and checks the slot came back exactly
// once: nothing in flight, as many completions as admissions (a second
// release would show as one completion too many and a negative inFlight).
async function released (t: Test, app: FastifyInstance, admitted: number, pool = 'default'): Promise<void> {
  await waitFor(() => app.concurrencyLimit.stats(pool).inFlight === 0, 2000, 'the slot to come back')
  await sleep(20) // room for a second, wrong release to show up
  const stats = app.concurrencyLimit.stats(pool)
  t.equal(stats.inFlight, 0, 'nothing in flight')
  t.equal(stats.queued, 0, 'nothing queued')
  t.equal(stats.admitted, admitted, 'admissions')
  t.equal(stats.completed, admitted, 'each admission released once')
}

t.test('normal replies: sync send, async return, reply.send from an async handler', async (t) => {
  const app = await build(t, { maxConcurrency: 2 })
  app.get('/sync', (_request, reply) => { reply.send('a') })
  app.get('/async', async () => 'b')
  app.get('/async-send', async (_request, reply) => { setTimeout(() => reply.send('c'), 5); return reply })
  const pool = client(t, await listen(app))
  t.equal((await get(pool, '/sync')).body, 'a')
  t.equal((await get(pool, '/async')).body, 'b')
  t.equal((await get(pool, '/async-send')).body, 'c')
  await released(t, app, 3)
})

t.test('a handler that throws or rejects', async (t) => {
  const app = await build(t, { maxConcurrency: 2 })
  app.get('/throw', () => { throw new Error('boom') })
  app.get('/reject', async () => { throw new Error('boom') })
  const pool = client(t, await listen(app))
  t.equal((await get(pool, '/throw')).statusCode, 500)
  t.equal((await get(pool, '/reject')).statusCode, 500)
  await released(t, app, 2)
})

t.test('errors in other hooks, validation and serialization', async (t) => {
  const app = await build(t, { maxConcurrency: 2 })
  let handlerRan = 0
  app.get('/prehandler', { preHandler: async () => { throw new Error('no') } }, async () => { handlerRan++; return 'x' })
  app.get('/onsend', { onSend: async () => { throw new Error('no') } }, async () => 'x')
  // The route's own hooks of the admission stage (preParsing by default) run after it.
  app.get('/preparsing-after', { preParsing: (_req, _reply, _payload, done) => { done(new Error('no')) } }, async () => { handlerRan++; return 'x' })
  app.get('/validate', { schema: { querystring: { type: 'object', required: ['q'], properties: { q: { type: 'string' } } } } }, async () => { handlerRan++; return 'x' })
  const pool = client(t, await listen(app))
  t.equal((await get(pool, '/prehandler')).statusCode, 500)
  t.equal((await get(pool, '/onsend')).statusCode, 500)
  t.equal((await get(pool, '/preparsing-after')).statusCode, 500)
  t.equal((await get(pool, '/validate')).statusCode, 400)
  t.equal(handlerRan, 0)
  await released(t, app, 4)
})

t.test('404s take no slot and leave the pool as it was', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  const gauge = new Gauge()
  app.get('/hold', async () => { gauge.enter(); await gauge.wait(); return 'x' })
  const pool = client(t, await listen(app))
  const held = get(pool, '/hold')
  await waitFor(() => gauge.current === 1)
  const missing = await Promise.all([get(pool, '/nope'), get(pool, '/nope'), get(pool, '/nope')])
  t.same(missing.map((r) => r.statusCode), [404, 404, 404], 'a full pool does not refuse 404s')
  gauge.open()
  t.equal((await held).statusCode, 200)
  await released(t, app, 1)
})

t.test('client leaves while queued: it leaves the queue at once and its handler never runs', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 1, queueTimeout: 10_000 })
  const gauge = new Gauge()
  const ran: string[] = []
  app.get('/hold', async (request) => {
    ran.push((request.query as { id: string }).id)
    gauge.enter()
    await gauge.wait()
    return 'x'
  })
  const origin = await listen(app)
  const pool = client(t, origin)
  const held = get(pool, '/hold?id=first')
  await waitFor(() => gauge.current === 1)
  await abortAfter(`${origin}/hold?id=gone`, { until: waitFor(() => app.concurrencyLimit.stats().queued === 1) })
  await waitFor(() => app.concurrencyLimit.stats().queued === 0, 1000, 'the waiter to leave the queue')
  t.equal(app.concurrencyLimit.stats().abandoned, 1)
  // Its queue place is free again: a new waiter fits in a queue of one.
  const next = get(pool, '/hold?id=next')
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  gauge.open()
  t.equal((await held).statusCode, 200)
  t.equal((await next).statusCode, 200)
  t.same(ran, ['first', 'next'], 'the handler never ran for the client that left')
  await released(t, app, 2)
})

t.test('client leaves while a GET handler runs: the slot is held until the handler settles', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  const gauge = new Gauge()
  let sawAbort = false
  app.get('/slow', async (request) => {
    gauge.enter()
    request.signal.addEventListener('abort', () => { sawAbort = true })
    await gauge.wait()
    gauge.leave()
    return 'x'
  })
  const origin = await listen(app)
  await abortAfter(`${origin}/slow`, { until: waitFor(() => gauge.current === 1) })
  await waitFor(() => sawAbort, 1000, 'request.signal to abort')
  await sleep(30)
  t.equal(app.concurrencyLimit.stats().inFlight, 1, 'work still runs after its client left: the slot stays taken')
  const pool = client(t, origin)
  t.equal((await get(pool, '/slow')).statusCode, 503, 'so a new request is refused')
  gauge.open()
  await released(t, app, 1)
})

t.test('client leaves while a POST handler runs, after its body was parsed', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  const gauge = new Gauge()
  let body: unknown
  app.post('/slow', async (request) => {
    body = request.body
    gauge.enter()
    await gauge.wait()
    gauge.leave()
    return 'x'
  })
  const origin = await listen(app)
  await abortAfter(`${origin}/slow`, { method: 'POST', body: JSON.stringify({ a: 1 }), until: waitFor(() => gauge.current === 1) })
  t.same(body, { a: 1 })
  await sleep(30)
  t.equal(app.concurrencyLimit.stats().inFlight, 1, 'held while the handler runs')
  gauge.open()
  await released(t, app, 1)
})

t.test('client leaves during an async hook after admission: the handler is skipped', async (t) => {
  const app = await build(t, { maxConcurrency: 1 })
  let handlerRan = false
  let hookDone = false
  app.get('/guarded', {
    // Ends once the server has seen the client leave, however late.
    preHandler: async (request) => {
      const socket = request.raw.socket
      if (!socket.closed) await new Promise((resolve) => socket.once('close', resolve))
      hookDone = true
    }
  }, async () => { handlerRan = true; return 'x' })
  const origin = await listen(app)
  await abortAfter(`${origin}/guarded`, { ms: 30 })
  await waitFor(() => hookDone)
  await sleep(20)
  t.equal(handlerRan, false, 'no handler for a client that left')
  await released(t, app, 1)
})

t.test('client leaves before the admission hook runs: no slot is taken, no handler runs', async (t) => {
  const app = await build(t, { maxConcurrency: 1, hook: 'preHandler' })
  let handlerRan = false
  let hookDone = false
  app.get('/late', {
    preValidation: async () => { await sleep(100); hookDone = true }
  }, async () => { handlerRan = true; return 'x' })
  const origin = await listen(app)
  await abortAfter(`${origin}/late`, { ms: 30 })
  await waitFor(() => hookDone)
  await sleep(20)
  t.equal(handlerRan, false)
  await released(t, app, 0)
})

t.test('a waiter whose socket is destroyed just before its turn is skipped', async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 2, queueTimeout: 5000 })
  const sockets: Record<string, import('node:net').Socket> = {}
  const ran: string[] = []
  app.addHook('onRequest', async (request) => { sockets[(request.query as { id: string }).id] = request.raw.socket })
  const gauge = new Gauge()
  app.get('/hold', async (request, reply) => {
    const id = (request.query as { id: string }).id
    ran.push(id)
    // Runs after the limiter's own 'close' listener has released the slot
    // and before the next tick hands it to the next waiter.
    if (id === 'first') reply.raw.on('close', () => sockets.second.destroy())
    gauge.enter()
    await gauge.wait()
    return id
  })
  const pool = client(t, await listen(app))
  const first = get(pool, '/hold?id=first')
  await waitFor(() => gauge.current === 1)
  const second = get(pool, '/hold?id=second').catch((err: Error) => err)
  // The two waiters come on connections of their own: one at a time, so
  // that the second is first in the queue.
  await waitFor(() => app.concurrencyLimit.stats().queued === 1)
  const third = get(pool, '/hold?id=third')
  await waitFor(() => app.concurrencyLimit.stats().queued === 2)
  gauge.open()
  t.equal((await first).body, 'first')
  t.type(await second, Error, 'the second client lost its connection')
  t.equal((await third).body, 'third', 'the slot went to the next live waiter')
  t.same(ran, ['first', 'third'])
  t.equal(app.concurrencyLimit.stats().abandoned, 1)
  await released(t, app, 2)
})

t.test('streamed responses, finished and aborted', async (t) => {
  const app = await build(t, { maxConcurrency: 2 })
  app.get('/stream', (_request, reply) => {
    reply.send(Readable.from(['a', 'b', 'c']))
  })
  let destroyed = false
  app.get('/endless', (_request, reply) => {
    let n = 0
    const stream = new Readable({
      read () { setTimeout(() => this.push(`chunk ${n++}\n`), 5) },
      destroy (err, cb) { destroyed = true; cb(err) }
    })
    reply.send(stream)
  })
  const origin = await listen(app)
  const pool = client(t, origin)
  t.equal((await get(pool, '/stream')).body, 'abc')
  const ac = new AbortController()
  const res = await undiciRequest(`${origin}/endless`, { signal: ac.signal })
  let chunks = 0
  await new Promise<void>((resolve) => {
    res.body.on('data', () => { if (++chunks === 3) { ac.abort(); resolve() } })
    res.body.on('error', () => resolve())
  })
  await waitFor(() => destroyed, 1000, 'the stream to be destroyed')
  await released(t, app, 2)
})

t.test('reply.hijack(): held until the raw response ends, or its client leaves', async (t) => {
  const app = await build(t, { maxConcurrency: 2 })
  app.get('/hijack', (_request, reply) => {
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/plain' })
    reply.raw.write('part ')
    setTimeout(() => reply.raw.end('end'), 50)
  })
  app.get('/hijack-forever', (_request, reply) => {
    reply.hijack()
    reply.raw.writeHead(200)
    reply.raw.write('x')
  })
  const origin = await listen(app)
  const pool = client(t, origin)
  const pending = get(pool, '/hijack')
  await sleep(20)
  t.equal(app.concurrencyLimit.stats().inFlight, 1, 'held while the hijacked response is open')
  t.equal((await pending).body, 'part end')
  await released(t, app, 1)
  const ac = new AbortController()
  const res = await undiciRequest(`${origin}/hijack-forever`, { signal: ac.signal })
  await new Promise<void>((resolve) => { res.body.once('data', () => resolve()) })
  t.equal(app.concurrencyLimit.stats().inFlight, 1)
  ac.abort()
  await released(t, app, 2)
})

t.test('connectionTimeout destroys an idle socket whose handler never answers', async (t) => {
  const app = await build(t, { maxConcurrency: 1 }, { connectionTimeout: 100 })
  app.get('/silent', () => { /* never replies */ })
  const origin = await listen(app)
  const res = await undiciRequest(`${origin}/silent`).catch((err: Error) => err)
  t.type(res, Error, 'the client sees the socket close')
  await released(t, app, 1)
})

t.test('requestTimeout ends a request whose body never arrives (admitted before the body)', async (t) => {
  const app = await build(t, { maxConcurrency: 1 }, { requestTimeout: 200, http: { requestTimeout: 200, connectionsCheckingInterval: 50 } })
  let handlerRan = false
  app.post('/upload', async () => { handlerRan = true; return 'x' })
  const origin = await listen(app)
  const { port } = new URL(origin)
  const socket = connect(Number(port), '127.0.0.1')
  socket.write('POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"a":')
  let answer = ''
  socket.on('data', (chunk) => { answer += chunk })
  await waitFor(() => app.concurrencyLimit.stats().admitted === 1)
  await new Promise((resolve) => socket.on('close', resolve))
  t.match(answer, /^HTTP\/1.1 408/, 'Node answered 408')
  t.equal(handlerRan, false)
  await released(t, app, 1)
})

t.test("Fastify's handlerTimeout: the 503 goes out, the slot stays until the handler settles", async (t) => {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0 })
  const gauge = new Gauge()
  let aborted = false
  app.get('/slow', { handlerTimeout: 50 }, async (request) => {
    request.signal.addEventListener('abort', () => { aborted = true })
    gauge.enter()
    await gauge.wait()
    return 'late'
  })
  const pool = client(t, await listen(app))
  const answer = await get(pool, '/slow')
  t.equal(answer.statusCode, 503)
  t.equal(JSON.parse(answer.body).code, 'FST_ERR_HANDLER_TIMEOUT')
  t.ok(aborted, 'the handler was told through request.signal')
  t.equal(app.concurrencyLimit.stats().inFlight, 1, 'orphaned work still holds its slot')
  t.equal((await get(pool, '/slow')).statusCode, 503)
  t.equal(app.concurrencyLimit.stats().rejected.queueFull, 1, 'a new request was refused by the limit')
  gauge.open()
  await released(t, app, 1)
})
