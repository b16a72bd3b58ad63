import t, { type Test } from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'

const tick = () => new Promise<void>((resolve) => process.nextTick(resolve))
import { Limiter, NORMAL, type Level, type RejectReason, type Waiter } from '../lib/limiter.js'

class TestWaiter implements Waiter {
  prev: Waiter | null = null
  next: Waiter | null = null
  enqueuedAt = 0
  deadline = 0
  admitted = false
  rejected: RejectReason | null = null
  alive = true
  readonly id: number
  readonly log: string[]
  readonly level: Level

  constructor (id: number, log: string[], level: Level = NORMAL) {
    this.id = id
    this.log = log
    this.level = level
  }

  admit (): boolean {
    if (!this.alive) return false
    this.admitted = true
    this.log.push(`admit ${this.id}`)
    return true
  }

  reject (reason: RejectReason): void {
    this.rejected = reason
    this.log.push(`reject ${this.id} ${reason}`)
  }
}

function setup (maxConcurrency: number, maxQueue: number, queueTimeout = 60_000) {
  const limiter = new Limiter('test', { maxConcurrency, maxQueue, queueTimeout })
  const log: string[] = []
  const waiter = (id: number) => new TestWaiter(id, log)
  return { limiter, log, waiter }
}

t.test('tryAcquire grants up to maxConcurrency permits', async (t) => {
  const { limiter } = setup(2, 0)
  t.equal(limiter.tryAcquire(), true)
  t.equal(limiter.tryAcquire(), true)
  t.equal(limiter.tryAcquire(), false)
  t.equal(limiter.inFlight, 2)
  limiter.release()
  t.equal(limiter.inFlight, 1)
  t.equal(limiter.tryAcquire(), true)
  t.match(limiter.stats(), { admitted: 3, completed: 1, peakInFlight: 2, inFlight: 2 })
})

t.test('waiters are admitted in FIFO order as permits come back; a full queue refuses', async (t) => {
  const { limiter, log, waiter } = setup(1, 2)
  t.equal(limiter.tryAcquire(), true)
  const [a, b, c] = [waiter(1), waiter(2), waiter(3)]
  t.equal(limiter.enqueue(a), null)
  t.equal(limiter.enqueue(b), null)
  t.equal(limiter.enqueue(c), 'queueFull')
  t.equal(limiter.queued, 2)
  limiter.release()
  t.same(log, [], 'the hand-off waits for the next tick')
  t.equal(limiter.inFlight, 1, 'and keeps the slot for the waiter meanwhile')
  t.equal(limiter.tryAcquire(), false, 'so no new arrival can take it')
  await tick()
  t.same(log, ['admit 1'])
  t.equal(limiter.inFlight, 1, 'the permit passed straight to the waiter')
  limiter.release()
  await tick()
  t.same(log, ['admit 1', 'admit 2'])
  limiter.release()
  t.equal(limiter.inFlight, 0)
  const stats = limiter.stats()
  t.match(stats, { admitted: 3, completed: 3, queued: 0, peakQueued: 2, rejected: { queueFull: 1 } })
  t.equal(stats.queueWait.count, 2)
  t.ok(stats.queueWait.maxMs >= stats.queueWait.meanMs)
})

t.test('maxQueue 0 refuses at once', async (t) => {
  const { limiter, waiter } = setup(1, 0)
  limiter.tryAcquire()
  t.equal(limiter.enqueue(waiter(1)), 'queueFull')
})

t.test('an abandoned waiter leaves the queue at once, wherever it stands', async (t) => {
  const { limiter, log, waiter } = setup(1, 3)
  limiter.tryAcquire()
  const [a, b, c] = [waiter(1), waiter(2), waiter(3)]
  limiter.enqueue(a)
  limiter.enqueue(b)
  limiter.enqueue(c)
  limiter.abandon(b) // middle
  t.equal(limiter.queued, 2)
  limiter.abandon(c) // tail
  limiter.abandon(c) // twice: no effect
  t.equal(limiter.queued, 1)
  t.equal(limiter.enqueue(waiter(4)), null, 'its slot in the queue is free again')
  limiter.abandon(a) // head
  limiter.release()
  await tick()
  t.same(log, ['admit 4'])
  t.equal(limiter.stats().abandoned, 3)
})

t.test('a waiter that is gone when its turn comes is skipped', async (t) => {
  const { limiter, log, waiter } = setup(1, 3)
  limiter.tryAcquire()
  const [a, b] = [waiter(1), waiter(2)]
  limiter.enqueue(a)
  limiter.enqueue(b)
  a.alive = false
  limiter.release()
  await tick()
  t.same(log, ['admit 2'])
  t.equal(limiter.inFlight, 1)
  const c = waiter(3)
  limiter.enqueue(c)
  c.alive = false
  limiter.release()
  await tick()
  t.equal(limiter.inFlight, 0, 'no one left: the permit is free')
  t.equal(limiter.queued, 0)
  t.equal(limiter.stats().abandoned, 2)
  t.match(limiter.stats(), { admitted: 2, completed: 2 })
})

t.test('waiters past queueTimeout are refused, each close to its own deadline', async (t) => {
  const { limiter, log, waiter } = setup(1, 10, 40)
  limiter.tryAcquire()
  const a = waiter(1)
  limiter.enqueue(a)
  await sleep(20)
  const b = waiter(2)
  limiter.enqueue(b)
  await sleep(30) // a: 50 ms, b: 30 ms
  t.same(log, ['reject 1 queueTimeout'])
  t.equal(limiter.queued, 1)
  await sleep(30)
  t.same(log, ['reject 1 queueTimeout', 'reject 2 queueTimeout'])
  t.equal(limiter.queued, 0)
  t.equal(limiter.stats().rejected.queueTimeout, 2)
  limiter.release()
  t.equal(limiter.inFlight, 0)
})

t.test('the timer follows the head after it is admitted', async (t) => {
  const { limiter, log, waiter } = setup(1, 10, 60)
  limiter.tryAcquire()
  limiter.enqueue(waiter(1))
  await sleep(30)
  limiter.enqueue(waiter(2))
  limiter.release() // admits 1; the timer still aims at 1's deadline
  await tick()
  await sleep(45) // 1's deadline passed, 2's not
  t.same(log, ['admit 1'])
  await sleep(40)
  t.same(log, ['admit 1', 'reject 2 queueTimeout'])
})

t.test('close refuses every waiter and every later one', async (t) => {
  const { limiter, log, waiter } = setup(1, 10, 30)
  limiter.tryAcquire()
  limiter.enqueue(waiter(1))
  limiter.enqueue(waiter(2))
  limiter.close()
  t.same(log, ['reject 1 closing', 'reject 2 closing'])
  t.equal(limiter.enqueue(waiter(3)), 'closing')
  t.equal(limiter.stats().rejected.closing, 3)
  await sleep(50)
  t.equal(log.length, 2, 'the queue timer was cleared')
  limiter.release()
  t.equal(limiter.inFlight, 0)
  limiter.close() // twice: harmless
})

// The limiter reads performance.now(): a test clock makes its windows exact.
function fakeClock (t: Test): { advance (ms: number): void } {
  let now = 1_000_000
  performance.now = () => now
  t.teardown(() => { delete (performance as { now?: unknown }).now })
  return { advance (ms) { now += ms } }
}

const parked = (): Waiter => ({ prev: null, next: null, enqueuedAt: 0, deadline: 0, level: NORMAL, admit: () => true, reject: () => {} })

// `count` completions spread evenly over `ms`.
function complete (limiter: Limiter, clock: { advance (ms: number): void }, count: number, ms: number): void {
  for (let i = 0; i < count; i++) {
    clock.advance(ms / count)
    limiter.tryAcquire()
    limiter.release()
  }
}

t.test('retryAfter: at least 1 s, from the drain rate, from queueTimeout when nothing drains', async (t) => {
  const clock = fakeClock(t)
  const slow = new Limiter('slow', { maxConcurrency: 1, maxQueue: 100, queueTimeout: 4500 })
  t.equal(slow.retryAfter(), 5, 'nothing measured: the queue timeout, rounded up')
  const busy = new Limiter('busy', { maxConcurrency: 1, maxQueue: 0, queueTimeout: 10_000 })
  complete(busy, clock, 1000, 300)
  t.equal(busy.retryAfter(), 1, 'a fast drain still says at least 1')
  const stalled = new Limiter('stalled', { maxConcurrency: 1, maxQueue: 0, queueTimeout: 600_000 })
  t.equal(stalled.retryAfter(), 60, 'capped at 60 s')
})

t.test('retryAfter: the rate is measured from completions, before any refusal', async (t) => {
  const clock = fakeClock(t)
  const limiter = new Limiter('steady', { maxConcurrency: 1, maxQueue: 100, queueTimeout: 10_000 })
  complete(limiter, clock, 10, 250) // 40/s, a full window
  complete(limiter, clock, 5, 125) // half of the next one
  limiter.tryAcquire()
  for (let i = 0; i < 99; i++) limiter.enqueue(parked())
  t.equal(limiter.retryAfter(), 3, '100 ahead at 40/s: 2.5 s, rounded up; not queueTimeout (10 s)')
  complete(limiter, clock, 25, 125) // 30 in 250 ms: 120/s
  t.equal(limiter.retryAfter(), 1, 'the next full window follows a faster drain')
  clock.advance(200)
  t.equal(limiter.retryAfter(), 1, 'the last full window stands while the current one fills')
})

t.test('retryAfter: a window no completion closes decays, then is forgotten', async (t) => {
  const clock = fakeClock(t)
  const limiter = new Limiter('stall', { maxConcurrency: 1, maxQueue: 1000, queueTimeout: 60_000 })
  complete(limiter, clock, 100, 250) // 400/s
  complete(limiter, clock, 50, 100) // then the pool stalls
  limiter.tryAcquire()
  for (let i = 0; i < 399; i++) limiter.enqueue(parked())
  t.equal(limiter.retryAfter(), 1, '400 ahead at 400/s')
  clock.advance(400) // 50 completions in 500 ms: 100/s
  t.equal(limiter.retryAfter(), 4)
  clock.advance(4500) // 50 in 5 s: 10/s
  t.equal(limiter.retryAfter(), 40)
  clock.advance(5001) // 10 s with no window closed: that rate described another load
  t.equal(limiter.retryAfter(), 60, 'nothing known: queueTimeout, within the 60 s cap')
  complete(limiter, clock, 1, 1) // the completion that ends the stall closes an old window
  t.equal(limiter.retryAfter(), 60, 'which measures nothing')
  complete(limiter, clock, 100, 250)
  t.equal(limiter.retryAfter(), 1, 'a new full window: 400/s again')
})

t.test('retryAfter: never past queueTimeout, by when the queue has turned over', async (t) => {
  const clock = fakeClock(t)
  const limiter = new Limiter('slow', { maxConcurrency: 1, maxQueue: 100, queueTimeout: 3000 })
  complete(limiter, clock, 3, 300) // 10/s
  limiter.tryAcquire()
  for (let i = 0; i < 100; i++) limiter.enqueue(parked())
  t.equal(limiter.retryAfter(), 3, '101 ahead at 10/s would be 11 s; every waiter is answered within 3 s')
})
