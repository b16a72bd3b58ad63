// The adaptive limit in virtual time, against a simulated server with a
// latency knee (as Vector's adaptive concurrency tests do): a downstream of
// N parallel calls of `serviceMs` with its own unbounded FIFO queue, behind a
// pool that admits against the limit and queues up to the limit for at most
// `queueTimeout`. Arrivals are Poisson from a seeded generator: every run is
// the same, and every figure below is a range, not a timing.
import t from 'tap'
import { GradientLimit, type GradientSettings } from '../lib/limits/gradient.js'
import { DEFAULT_ADAPTIVE } from '../lib/options.js'

interface Phase { untilMs: number, rate: number, n: number, serviceMs?: number }
interface SimOptions {
  phases: Phase[]
  adaptive?: Partial<GradientSettings>
  serviceMs?: number
  /** Service time varies uniformly by this fraction either side. */
  jitter?: number
  queueTimeout?: number
  clientTimeout?: number
  /** Each client waits a uniformly random time up to clientTimeout, and leaves the queue then too. */
  impatient?: boolean
  seed?: number
}
interface Point { t: number, limit: number, inFlight: number, n: number, baselineMs: number | null }
interface Done { arrivedAt: number, finishedAt: number, admittedAt: number, patience: number }

function mulberry32 (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let r = Math.imul(a ^ (a >>> 15), 1 | a)
    r = (r + Math.imul(r ^ (r >>> 7), 61 | r)) ^ r
    return ((r ^ (r >>> 14)) >>> 0) / 4294967296
  }
}

/** A binary heap of events by time, then by order of scheduling. */
class Events {
  readonly #heap: Array<{ at: number, seq: number, run: () => void }> = []
  #seq = 0
  push (at: number, run: () => void): void {
    const heap = this.#heap
    heap.push({ at, seq: this.#seq++, run })
    let i = heap.length - 1
    while (i > 0) {
      const p = (i - 1) >> 1
      if (!this.#less(heap[i], heap[p])) break
      ;[heap[i], heap[p]] = [heap[p], heap[i]]
      i = p
    }
  }

  pop (): { at: number, run: () => void } | undefined {
    const heap = this.#heap
    if (heap.length === 0) return undefined
    const top = heap[0]
    const last = heap.pop() as typeof top
    if (heap.length > 0) {
      heap[0] = last
      let i = 0
      for (;;) {
        const l = 2 * i + 1
        const r = l + 1
        let m = i
        if (l < heap.length && this.#less(heap[l], heap[m])) m = l
        if (r < heap.length && this.#less(heap[r], heap[m])) m = r
        if (m === i) break
        ;[heap[i], heap[m]] = [heap[m], heap[i]]
        i = m
      }
    }
    return top
  }

  #less (a: { at: number, seq: number }, b: { at: number, seq: number }): boolean {
    return a.at < b.at || (a.at === b.at && a.seq < b.seq)
  }
}

function simulate (options: SimOptions) {
  const random = mulberry32(options.seed ?? 1)
  const events = new Events()
  const limit = new GradientLimit({ ...DEFAULT_ADAPTIVE, maxConcurrency: 1000, ...options.adaptive })
  const queueTimeout = options.queueTimeout ?? 1000
  const clientTimeout = options.clientTimeout ?? 1000
  const jitter = options.jitter ?? 0
  const end = options.phases[options.phases.length - 1].untilMs
  const phaseAt = (at: number): Phase => options.phases.find((p) => at < p.untilMs) ?? options.phases[options.phases.length - 1]

  let now = 0
  let inFlight = 0
  const queue: Array<{ arrivedAt: number, patience: number, gone: boolean }> = []
  let queueHead = 0
  let queued = 0
  let active = 0
  const downstreamQueue: Array<() => void> = []
  let downstreamHead = 0
  const refused = { queueFull: 0, queueTimeout: 0 }
  let abandoned = 0
  const done: Done[] = []
  const points: Point[] = []

  const startDownstream = (finish: () => void): void => {
    const phase = phaseAt(now)
    const base = phase.serviceMs ?? options.serviceMs ?? 50
    const ms = base * (1 + jitter * (2 * random() - 1))
    events.push(now + ms, () => {
      finish()
      // The slot passes on, unless N went down meanwhile.
      if (downstreamHead < downstreamQueue.length && active <= phaseAt(now).n) {
        startDownstream(downstreamQueue[downstreamHead++])
      } else {
        active--
      }
    })
  }
  const callDownstream = (finish: () => void): void => {
    if (active < phaseAt(now).n) {
      active++
      startDownstream(finish)
    } else {
      downstreamQueue.push(finish)
    }
  }
  const admit = (arrivedAt: number, patience: number): void => {
    inFlight++
    const admittedAt = now
    callDownstream(() => {
      // A client that timed out left; the work, as a handler that does not
      // watch request.signal, ran on, and its slot came back only now.
      if (now - arrivedAt > patience) limit.onClientLeft(admittedAt, now - admittedAt, inFlight)
      else limit.onSample(admittedAt, now - admittedAt, inFlight, false)
      done.push({ arrivedAt, finishedAt: now, admittedAt, patience })
      inFlight--
      while (queueHead < queue.length && inFlight < limit.limit) {
        const waiter = queue[queueHead++]
        if (waiter.gone) continue
        queued--
        admit(waiter.arrivedAt, waiter.patience)
      }
    })
  }
  const arrive = (): void => {
    const arrivedAt = now
    const patience = options.impatient === true ? clientTimeout * random() : clientTimeout
    if (inFlight < limit.limit && queued === 0) {
      admit(arrivedAt, patience)
    } else if (queued < limit.limit) {
      const waiter = { arrivedAt, patience, gone: false }
      queue.push(waiter)
      queued++
      events.push(now + queueTimeout, () => {
        if (waiter.gone || queue.indexOf(waiter, queueHead) < 0) return
        waiter.gone = true
        queued--
        refused.queueTimeout++
      })
      // A client that gives up while queued leaves its place (`abandoned`).
      if (patience < queueTimeout) {
        events.push(now + patience, () => {
          if (waiter.gone || queue.indexOf(waiter, queueHead) < 0) return
          waiter.gone = true
          queued--
          abandoned++
        })
      }
    } else {
      refused.queueFull++
    }
  }
  const scheduleArrival = (): void => {
    const rate = phaseAt(now).rate
    const gap = -Math.log(1 - random()) * 1000 / rate
    if (now + gap < end) events.push(now + gap, () => { arrive(); scheduleArrival() })
  }
  // When N goes up, the downstream's waiting calls start at once.
  for (const phase of options.phases) {
    events.push(phase.untilMs - 1e-9, () => {})
  }
  const widen = (): void => {
    while (active < phaseAt(now).n && downstreamHead < downstreamQueue.length) {
      active++
      startDownstream(downstreamQueue[downstreamHead++])
    }
  }
  for (let at = 0; at <= end; at += 100) {
    events.push(at, () => {
      widen()
      points.push({ t: at, limit: limit.limit, inFlight, n: phaseAt(at).n, baselineMs: limit.state().baselineMs })
    })
  }
  scheduleArrival()
  for (let event = events.pop(); event !== undefined; event = events.pop()) {
    now = event.at
    event.run()
  }

  /** Figures over [from, to) ms. */
  const window = (from: number, to: number) => {
    const inside = points.filter((p) => p.t >= from && p.t < to)
    const limits = inside.map((p) => p.limit)
    const mean = limits.reduce((a, b) => a + b, 0) / limits.length
    const sd = Math.sqrt(limits.reduce((a, b) => a + (b - mean) ** 2, 0) / limits.length)
    const finished = done.filter((d) => d.finishedAt >= from && d.finishedAt < to)
    const good = finished.filter((d) => d.finishedAt - d.arrivedAt <= d.patience).length
    const latencies = finished.map((d) => d.finishedAt - d.arrivedAt).sort((a, b) => a - b)
    return {
      meanLimit: mean,
      minLimit: Math.min(...limits),
      maxLimit: Math.max(...limits),
      cv: sd / mean,
      goodputPerS: good * 1000 / (to - from),
      p99: latencies[Math.floor(latencies.length * 0.99)] ?? 0
    }
  }
  return { limit, points, refused, abandoned, done, window }
}

const capacity = (n: number, serviceMs = 50): number => n * 1000 / serviceMs

t.test('converges from below: a limit of 4 climbs to the knee within 2 s', async (t) => {
  const sim = simulate({ phases: [{ untilMs: 10_000, rate: 1200, n: 20 }], adaptive: { initialConcurrency: 4 } })
  const w = sim.window(2000, 10_000)
  t.ok(w.minLimit >= 20 && w.maxLimit <= 20 * 1.6, `limit ${w.minLimit}..${w.maxLimit} around the knee (20)`)
  t.ok(w.goodputPerS >= 0.9 * capacity(20), `goodput ${w.goodputPerS}/s of ${capacity(20)}`)
  t.ok(w.p99 <= 150, `p99 ${w.p99} ms`)
})

t.test('converges from above: a limit of 100 comes down to the knee within 2 s', async (t) => {
  const sim = simulate({ phases: [{ untilMs: 10_000, rate: 1200, n: 20 }], adaptive: { initialConcurrency: 100 } })
  const w = sim.window(2000, 10_000)
  t.ok(w.minLimit >= 20 && w.maxLimit <= 20 * 1.6, `limit ${w.minLimit}..${w.maxLimit} around the knee (20)`)
  t.ok(w.goodputPerS >= 0.9 * capacity(20), `goodput ${w.goodputPerS}/s`)
  t.ok(w.p99 <= 150, `p99 ${w.p99} ms`)
})

t.test('follows the capacity down and up: N = 20, 5, 40 at 1,200/s offered', async (t) => {
  const sim = simulate({
    phases: [{ untilMs: 10_000, rate: 1200, n: 20 }, { untilMs: 20_000, rate: 1200, n: 5 }, { untilMs: 30_000, rate: 1200, n: 40 }]
  })
  for (const [from, n] of [[0, 20], [10_000, 5], [20_000, 40]]) {
    const w = sim.window(from + 2000, from + 10_000)
    t.ok(w.minLimit >= n && w.maxLimit <= Math.ceil(n * 1.6), `N=${n}: limit ${w.minLimit}..${w.maxLimit}`)
    t.ok(w.goodputPerS >= 0.9 * capacity(n), `N=${n}: goodput ${w.goodputPerS}/s of ${capacity(n)}`)
    // Requests admitted during the fall finish up to one queue timeout later.
    const late = sim.window(from + 3000, from + 10_000)
    t.ok(late.p99 <= 150, `N=${n}: p99 ${late.p99} ms after 3 s (${w.p99} ms after 2 s)`)
  }
})

t.test('no growth while app-limited, and no refusal at 0.3x load', async (t) => {
  const sim = simulate({ phases: [{ untilMs: 30_000, rate: 120, n: 20 }], adaptive: { initialConcurrency: 20 } })
  const w = sim.window(0, 30_000)
  t.ok(w.maxLimit <= 20, `limit never above its start: ${w.maxLimit}`)
  t.ok(w.minLimit >= 15, `nor cut: ${w.minLimit}`)
  t.same(sim.refused, { queueFull: 0, queueTimeout: 0 })
})

t.test('low traffic (10/s): no refusal, no measure that lowers the limit', async (t) => {
  const sim = simulate({ phases: [{ untilMs: 60_000, rate: 10, n: 20 }] })
  const w = sim.window(0, 60_000)
  t.equal(w.minLimit, 20)
  t.same(sim.refused, { queueFull: 0, queueTimeout: 0 })
  t.ok((sim.limit.state().baselineMs as number) <= 51)
})

t.test('2x overload for 60 s: no upward drift, no baseline ratchet, bounded oscillation', async (t) => {
  const sim = simulate({ phases: [{ untilMs: 60_000, rate: 800, n: 20 }], jitter: 0.2 })
  const at10 = sim.window(9000, 11_000).meanLimit
  const at60 = sim.window(58_000, 60_000).meanLimit
  t.ok(Math.abs(at60 - at10) <= 0.2 * at10, `limit ${at10} at 10 s, ${at60} at 60 s`)
  const steady = sim.window(5000, 60_000)
  t.ok(steady.cv <= 0.2, `coefficient of variation ${steady.cv.toFixed(3)}`)
  t.ok(steady.maxLimit <= 20 * 1.8, `never far above the knee: ${steady.maxLimit}`)
  const baselines = sim.points.filter((p) => p.t >= 5000).map((p) => p.baselineMs as number)
  t.ok(Math.max(...baselines) <= 50 * 1.15, `baseline at most ${Math.max(...baselines).toFixed(1)} ms`)
  t.ok(steady.goodputPerS >= 0.9 * capacity(20), `goodput ${steady.goodputPerS}/s`)
})

t.test('bounded oscillation with a noisy service (±40%) at 3x', async (t) => {
  const sim = simulate({ phases: [{ untilMs: 30_000, rate: 1200, n: 20 }], jitter: 0.4, seed: 7 })
  const steady = sim.window(3000, 30_000)
  t.ok(steady.cv <= 0.2, `coefficient of variation ${steady.cv.toFixed(3)}`)
  t.ok(steady.goodputPerS >= 0.85 * capacity(20), `goodput ${steady.goodputPerS}/s`)
})

t.test('a service that gets slower for good: the baseline follows, the limit keeps the work busy', async (t) => {
  const sim = simulate({
    phases: [{ untilMs: 10_000, rate: 1200, n: 20 }, { untilMs: 40_000, rate: 1200, n: 20, serviceMs: 100 }]
  })
  const w = sim.window(30_000, 40_000)
  t.ok((sim.limit.state().baselineMs as number) >= 90, `baseline ${sim.limit.state().baselineMs}`)
  t.ok(w.goodputPerS >= 0.9 * capacity(20, 100), `goodput ${w.goodputPerS}/s of ${capacity(20, 100)}`)
})

t.test('a downstream that gets slower than the clients wait: the limit still comes down', async (t) => {
  // 20 calls of 50 ms (400/s), then 2 of 200 ms (10/s), at 60/s. With the
  // limit at ~25, each admitted request waits 2.5 s in the downstream, past
  // the clients' 1 s: none of them is a sample, and the limit learns of the
  // change only from the clients who gave up on it.
  const sim = simulate({
    phases: [{ untilMs: 4000, rate: 60, n: 20 }, { untilMs: 20_000, rate: 60, n: 2, serviceMs: 200 }],
    adaptive: { minConcurrency: 3, initialConcurrency: 25 }
  })
  const late = sim.window(10_000, 20_000)
  t.ok(late.maxLimit <= 6, `limit ${late.minLimit}..${late.maxLimit} near the knee (2)`)
  t.ok(late.goodputPerS >= 0.8 * capacity(2, 200), `goodput ${late.goodputPerS}/s of ${capacity(2, 200)}`)
})

t.test('a route whose latency varies (20-80 ms) at a fifth of its capacity: the noise in window means is not taken for queueing', async (t) => {
  // No downstream limit: the work is a wait of 20-80 ms, 7.5 requests in
  // flight on average at 150/s, so any limit above some 20 refuses nothing.
  // A baseline that followed every window mean below it sank to the lowest
  // of them, a third below the work's latency, and the limit was cut to 1 at
  // times. Clients that give up at random (0-100 ms) leave the fast requests
  // as samples and the slow ones as clients gone.
  for (const impatient of [false, true]) {
    const refusedPct: number[] = []
    const abandonedPct: number[] = []
    for (const seed of [1, 2, 3]) {
      const sim = simulate({ phases: [{ untilMs: 30_000, rate: 150, n: 1000 }], jitter: 0.6, impatient, clientTimeout: impatient ? 100 : 1000, seed })
      const arrived = sim.done.length + sim.refused.queueFull + sim.refused.queueTimeout + sim.abandoned
      refusedPct.push(100 * (sim.refused.queueFull + sim.refused.queueTimeout) / arrived)
      abandonedPct.push(100 * sim.abandoned / arrived)
    }
    const who = impatient ? 'clients giving up at random' : 'patient clients'
    t.ok(Math.max(...refusedPct) <= 5, `${who}: refused ${refusedPct.map((p) => p.toFixed(1)).join(', ')}%`)
    // A client that gave up while queued was kept waiting by the limit too.
    const keptOut = refusedPct.map((p, i) => p + abandonedPct[i])
    t.ok(Math.max(...keptOut) <= 8, `${who}: refused or gave up in the queue ${keptOut.map((p) => p.toFixed(1)).join(', ')}%`)
  }
})

t.test('a first window slowed by warm-up does not leave the baseline high', async (t) => {
  // The first second's calls take 250 ms (JIT, connections, caches), then
  // 50 ms, at 3x load. The first window's mean is the first baseline; the
  // faster windows after it replace it until one confirms it.
  const sim = simulate({ phases: [{ untilMs: 1000, rate: 1200, n: 20, serviceMs: 250 }, { untilMs: 12_000, rate: 1200, n: 20 }] })
  const w = sim.window(3000, 12_000)
  t.ok(w.maxLimit <= 40, `limit ${w.minLimit}..${w.maxLimit} (knee 20)`)
  t.ok(w.p99 <= 250, `p99 ${w.p99} ms`)
  t.ok(w.goodputPerS >= 0.9 * capacity(20), `goodput ${w.goodputPerS}/s`)
})
