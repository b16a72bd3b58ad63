import t, { type Test } from 'tap'
import { build, listen, client, get, waitFor, Gauge } from './helpers/server.js'
import { QueueTimeoutError, type ConcurrencyLimitOptions } from '../lib/index.js'

// One slot, held by a request in /hold until the gauge opens.
async function saturated (t: Test, options: ConcurrencyLimitOptions) {
  const app = await build(t, { maxConcurrency: 1, maxQueue: 0, ...options })
  const gauge = new Gauge()
  app.get('/hold', async () => { gauge.enter(); await gauge.wait(); return 'x' })
  const pool = client(t, await listen(app))
  const held = get(pool, '/hold')
  await waitFor(() => gauge.current === 1)
  t.teardown(async () => { gauge.open(); await held })
  return { app, pool, gauge }
}

t.test('a waiter still waiting after queueTimeout gets 503 QUEUE_TIMEOUT', async (t) => {
  const { app, pool } = await saturated(t, { maxQueue: 5, queueTimeout: 80 })
  const started = Date.now()
  const answer = await get(pool, '/hold')
  const waited = Date.now() - started
  t.ok(waited >= 70 && waited < 1000, `answered after about queueTimeout (${waited} ms)`)
  t.equal(answer.statusCode, 503)
  t.ok(Number(answer.headers['retry-after']) >= 1)
  t.same(JSON.parse(answer.body), {
    statusCode: 503,
    code: 'FST_CONCURRENCY_LIMIT_QUEUE_TIMEOUT',
    error: 'Service Unavailable',
    message: new QueueTimeoutError().message
  })
  t.equal(app.concurrencyLimit.stats().rejected.queueTimeout, 1)
})

t.test('statusCode 429 and a fixed retryAfter', async (t) => {
  const { pool } = await saturated(t, { statusCode: 429, retryAfter: 2.2 })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 429)
  t.equal(answer.headers['retry-after'], '3', 'whole seconds, rounded up')
  t.match(JSON.parse(answer.body), { statusCode: 429, error: 'Too Many Requests', code: 'FST_CONCURRENCY_LIMIT_QUEUE_FULL' })
})

t.test('retryAfter as a function of the request and the rejection', async (t) => {
  let seen: unknown
  const { pool } = await saturated(t, {
    retryAfter: (request, rejection) => {
      seen = { url: request.url, ...rejection }
      return 7
    }
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.headers['retry-after'], '7')
  t.match(seen, { url: '/hold', reason: 'queueFull', code: 'FST_CONCURRENCY_LIMIT_QUEUE_FULL', statusCode: 503, pool: 'default', inFlight: 1, queued: 0, maxConcurrency: 1, maxQueue: 0, queueTimeout: 1000 })
})

t.test('a retryAfter function that throws or returns a non-number answers 500, not a crash', async (t) => {
  let value: unknown = 'soon'
  const { app, pool } = await saturated(t, {
    retryAfter: () => {
      if (value === 'throw') throw new Error('broken')
      return value as number
    }
  })
  const bad = await get(pool, '/hold')
  t.equal(bad.statusCode, 500)
  t.equal(JSON.parse(bad.body).code, 'FST_CONCURRENCY_LIMIT_INVALID_OPTION')
  t.match(JSON.parse(bad.body).message, /retryAfter\(\) must return a number of seconds >= 0, returned soon/)
  value = 'throw'
  t.equal((await get(pool, '/hold')).statusCode, 500)
  t.equal(app.concurrencyLimit.stats().inFlight, 1, 'the refused requests took no slot')
})

t.test('errorResponseBuilder shapes the body; status and Retry-After stay', async (t) => {
  const { pool } = await saturated(t, {
    retryAfter: 4,
    errorResponseBuilder: (request, rejection) => ({ busy: true, reason: rejection.reason, retryIn: rejection.retryAfter, path: request.url })
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 503)
  t.equal(answer.headers['retry-after'], '4')
  t.same(JSON.parse(answer.body), { busy: true, reason: 'queueFull', retryIn: 4, path: '/hold' })
})

t.test('errorResponseBuilder with a retryAfter function sees the same rejection', async (t) => {
  const { pool } = await saturated(t, {
    retryAfter: () => 3,
    errorResponseBuilder: (_request, rejection) => `${rejection.pool}:${rejection.reason}:${rejection.retryAfter}`
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.body, 'default:queueFull:3')
})

t.test('an errorResponseBuilder that throws answers 500', async (t) => {
  const { pool } = await saturated(t, {
    errorResponseBuilder: () => { throw Object.assign(new Error('builder failed'), { statusCode: 500 }) }
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 500)
  t.equal(answer.headers['retry-after'], undefined, 'no Retry-After on a 500')
})

t.test('an async errorResponseBuilder: its value is sent, with status and Retry-After', async (t) => {
  const { pool } = await saturated(t, {
    retryAfter: 4,
    errorResponseBuilder: async (request, rejection) => {
      await new Promise((resolve) => setTimeout(resolve, 10))
      return { busy: true, reason: rejection.reason, retryIn: rejection.retryAfter, path: request.url }
    }
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 503)
  t.equal(answer.headers['retry-after'], '4')
  t.match(answer.headers['content-type'], /^application\/json/)
  t.same(JSON.parse(answer.body), { busy: true, reason: 'queueFull', retryIn: 4, path: '/hold' })
})

t.test('an async errorResponseBuilder that rejects answers 500 through the error handler', async (t) => {
  const { app, pool } = await saturated(t, {
    errorResponseBuilder: async () => { throw new Error('builder failed') }
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 500)
  t.match(JSON.parse(answer.body), { statusCode: 500, message: 'builder failed' })
  t.equal(answer.headers['retry-after'], undefined, 'no Retry-After on a 500')
  t.equal(app.concurrencyLimit.stats().inFlight, 1, 'the refused request took no slot')
})

t.test('a retryAfter function that returns a promise answers 500 and says why', async (t) => {
  let fail = false
  const { app, pool } = await saturated(t, {
    // An async function, as a JavaScript caller could pass.
    retryAfter: (async () => {
      if (fail) throw new Error('rejected')
      return 5
    }) as never
  })
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 500)
  t.match(JSON.parse(answer.body), {
    code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION',
    message: /retryAfter\(\) must return a number of seconds synchronously, returned a promise/
  })
  fail = true
  t.equal((await get(pool, '/hold')).statusCode, 500)
  await new Promise((resolve) => setTimeout(resolve, 20))
  t.same(unhandled, [], 'a rejected promise does not go unhandled')
  t.equal(app.concurrencyLimit.stats().inFlight, 1)
})

t.test('a retryAfter function past 2^31-1 seconds is clamped to it, in digits', async (t) => {
  let value = 1e21
  const { pool } = await saturated(t, { retryAfter: () => value })
  t.equal((await get(pool, '/hold')).headers['retry-after'], '2147483647')
  value = 2 ** 31 - 1.5
  t.equal((await get(pool, '/hold')).headers['retry-after'], '2147483647', 'rounded up within the bound')
  value = 0
  t.equal((await get(pool, '/hold')).headers['retry-after'], '0')
})

t.test('a fixed retryAfter at the bound is sent as is', async (t) => {
  const { pool } = await saturated(t, { retryAfter: 2 ** 31 - 1 })
  t.equal((await get(pool, '/hold')).headers['retry-after'], '2147483647')
})

t.test('an errorResponseBuilder that throws an error with no status answers 500, not the refusal status', async (t) => {
  const { pool } = await saturated(t, {
    errorResponseBuilder: () => { throw new Error('builder failed') }
  })
  const answer = await get(pool, '/hold')
  t.equal(answer.statusCode, 500)
  t.match(JSON.parse(answer.body), { statusCode: 500, message: 'builder failed' })
})
