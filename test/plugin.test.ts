import t from 'tap'
import { build, listen, client, get, Gauge, waitFor } from './helpers/server.js'

t.test('at most maxConcurrency handlers run at once; the queue is FIFO; the rest get 503 at once', async (t) => {
  const app = await build(t, { maxConcurrency: 3, maxQueue: 4, queueTimeout: 5000, rejectDelay: 0 })
  const gauge = new Gauge()
  const order: number[] = []
  app.get('/work', async (request) => {
    gauge.enter()
    order.push(Number((request.query as { n: string }).n))
    await gauge.wait()
    gauge.leave()
    return { ok: true }
  })
  const pool = client(t, await listen(app))

  const answers: Array<Promise<{ statusCode: number, headers: Record<string, unknown>, body: string }>> = []
  for (let n = 0; n < 10; n++) {
    answers.push(get(pool, `/work?n=${n}`))
    // Arrival order is what FIFO is about: let each request reach the
    // server (admitted, queued or refused) before the next is sent.
    await waitFor(() => {
      const s = app.concurrencyLimit.stats()
      return s.inFlight + s.queued + s.rejected.queueFull === n + 1
    }, 5000, `request ${n} to arrive`)
  }
  t.equal(gauge.current, 3, 'three handlers are running')
  t.equal(app.concurrencyLimit.stats().queued, 4, 'four requests wait')
  gauge.open()
  const results = await Promise.all(answers)
  const statuses = results.map((r) => r.statusCode)
  t.same(statuses.filter((s) => s === 200).length, 7, 'seven were served')
  t.same(statuses.filter((s) => s === 503).length, 3, 'three were refused at once')
  t.same(statuses.slice(7), [503, 503, 503], 'the refused ones are the last to arrive')
  t.equal(gauge.peak, 3, 'never more than maxConcurrency handlers at once')
  t.same(order, [0, 1, 2, 3, 4, 5, 6], 'queued requests started in arrival order')
  const refused = results[9]
  // Nothing had completed yet, so no drain rate: the hint is queueTimeout.
  t.equal(refused.headers['retry-after'], '5')
  t.equal(refused.headers['content-type'], 'application/json; charset=utf-8')
  t.equal(refused.body, '{"statusCode":503,"code":"FST_CONCURRENCY_LIMIT_QUEUE_FULL","error":"Service Unavailable","message":"Too many requests in flight and the queue is full, retry later"}', "Fastify's error body, in its order")
  t.same(JSON.parse(refused.body), {
    statusCode: 503,
    code: 'FST_CONCURRENCY_LIMIT_QUEUE_FULL',
    error: 'Service Unavailable',
    message: 'Too many requests in flight and the queue is full, retry later'
  })
  const stats = app.concurrencyLimit.stats()
  t.match(stats, { inFlight: 0, queued: 0, admitted: 7, completed: 7, peakInFlight: 3, peakQueued: 4, rejected: { queueFull: 3, queueTimeout: 0, closing: 0 }, abandoned: 0 })
  t.equal(stats.queueWait.count, 4)
})
