import t from 'tap'
import { build, listen, client, get, sleep, waitFor, type Answer } from './helpers/server.js'

// Two slots, 50 ms of work each: the pool drains about 40 requests a second.
const SERVICE_MS = 50
const SLOTS = 2
const QUEUE = 100

t.test('the first refusals of an overload already know the drain rate seen before it', async (t) => {
  const app = await build(t, { maxConcurrency: SLOTS, maxQueue: QUEUE, queueTimeout: 60_000, rejectDelay: 0 })
  let hurry = false
  app.get('/work', async () => { if (!hurry) await sleep(SERVICE_MS); return 'ok' })
  const pool = client(t, await listen(app), 160)

  // A steady load within capacity: nothing is queued, nothing refused.
  const started = Date.now()
  await Promise.all(Array.from({ length: SLOTS }, async () => {
    while (Date.now() - started < 700) await get(pool, '/work')
  }))
  const steady = app.concurrencyLimit.stats()
  const rate = steady.completed * 1000 / (Date.now() - started)
  t.equal(steady.rejected.queueFull, 0, 'the steady phase saw no refusal')
  t.equal(steady.peakQueued, 0)

  // Then an overload: the slots and the queue fill at once, the rest is refused.
  const refused: Answer[] = []
  const burst = Array.from({ length: 130 }, () => get(pool, '/work').then((answer) => {
    if (answer.statusCode === 503) refused.push(answer)
    return answer
  }))
  await waitFor(() => {
    // The queue drains as the burst arrives: judge its peak, not its size now.
    const { peakQueued, rejected } = app.concurrencyLimit.stats()
    return peakQueued === QUEUE && rejected.queueFull > 0 && refused.length === rejected.queueFull
  }, 10_000, 'a full queue and its refusals')
  hurry = true
  await Promise.all(burst)

  // QUEUE + 1 requests ahead at the steady rate: about 3 s. Before, with no
  // refusal measured yet, the first 250 ms of refusals said queueTimeout: 60 s.
  // The last window's rate may stray from the mean on a busy machine: a band.
  const expected = (QUEUE + 1) / rate
  const seconds = refused.map((answer) => Number(answer.headers['retry-after']))
  t.comment(`steady drain rate ${rate.toFixed(1)}/s, queue drained in ~${expected.toFixed(1)} s; Retry-After of ${seconds.length} refusals: ${seconds.join(', ')}`)
  for (const value of seconds) {
    t.ok(value >= Math.floor(expected / 2) && value <= Math.ceil(expected * 3), `from the drain rate: ${value} s, not queueTimeout's 60 s`)
  }
})
