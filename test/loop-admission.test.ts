import t from 'tap'
import { CEILING, INTERVAL_MS, LoopAdmission, MIN_BUDGET, SLICE_MS, type TurnClock } from '../lib/loop-admission.js'

/** The turn clock of a simulated event loop, in virtual milliseconds. */
class VirtualTurn implements TurnClock {
  now = 0
  at = 0
  turns = 0
  lastLength = 0
  start = 0

  arrive (): number {
    this.at = this.now
    return this.now - this.start
  }

  /** The loop comes round: the check phase ends the turn. */
  end (): void {
    this.lastLength = this.now - this.start
    this.turns++
    this.start = this.now
  }

  /** No request was ready: the loop went quiet until `until`. */
  quiet (until: number): void {
    this.now = until
    this.start = until
    this.lastLength = 0
    this.turns++
  }
}

/** A seeded generator, so that every run sees the same arrivals. */
function random (seed: number): () => number {
  let x = seed
  return () => {
    x = (x * 1103515245 + 12345) % 2 ** 31
    return x / 2 ** 31
  }
}

interface Outcome {
  admittedPerS: number
  refused: number
  latencyP99: number
  longestTurn: number
  turnP99: number
}

const p99 = (xs: number[]): number => {
  const sorted = [...xs].sort((a, b) => a - b)
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))]
}

/**
 * A single-threaded server doing `cpuMs` of synchronous work per admitted
 * request, fed by Poisson arrivals at `rate` per second for `seconds`. Each
 * turn reads every request that arrived before it began (what one poll of
 * the loop returns), judges them in order, and comes round; a refusal costs
 * `refuseMs`, and `tailMs` of other work runs at the end of each turn
 * (writing the answers out, a garbage collection), after the last request.
 * Latency: arrival to the end of the request's work, as a client sees it
 * minus the network.
 */
function simulate (admission: LoopAdmission | null, turn: VirtualTurn, { rate, seconds = 20, cpuMs = 2, refuseMs = 0.02, tailMs = 0, seed = 1 }: { rate: number, seconds?: number, cpuMs?: number, refuseMs?: number, tailMs?: number, seed?: number }): Outcome {
  const next = random(seed)
  const end = seconds * 1000
  let arrival = 0
  const arrivals: number[] = []
  for (;;) {
    arrival += -Math.log(1 - next()) * 1000 / rate
    if (arrival >= end) break
    arrivals.push(arrival)
  }
  let i = 0
  let admitted = 0
  let refused = 0
  const latencies: number[] = []
  const turns: number[] = []
  while (i < arrivals.length) {
    if (arrivals[i] > turn.now) turn.quiet(arrivals[i])
    const pollAt = turn.now
    while (i < arrivals.length && arrivals[i] <= pollAt) {
      if (admission !== null && admission.refuse(1)) {
        refused++
        turn.now += refuseMs
      } else {
        turn.now += cpuMs
        admitted++
        // Only the second half counts: the first is the controller's start.
        if (arrivals[i] >= end / 2) latencies.push(turn.now - arrivals[i])
      }
      i++
    }
    turn.now += tailMs
    turn.end()
    if (pollAt >= end / 2) turns.push(turn.lastLength)
  }
  return { admittedPerS: admitted / seconds, refused, latencyP99: p99(latencies), longestTurn: Math.max(...turns), turnP99: p99(turns) }
}

const CAPACITY = 500 // per second, at 2 ms each
const BOUND = 50

t.test('at half of capacity nothing is refused, and turns stay short', async (t) => {
  const turn = new VirtualTurn()
  const out = simulate(new LoopAdmission(BOUND, turn), turn, { rate: CAPACITY / 2 })
  t.equal(out.refused, 0)
  t.ok(out.turnP99 < BOUND, `turn p99 ${out.turnP99.toFixed(1)} ms`)
})

t.test('at capacity, Poisson bursts pass: a few refusals at most', async (t) => {
  const turn = new VirtualTurn()
  const out = simulate(new LoopAdmission(BOUND, turn), turn, { rate: CAPACITY * 0.95, seconds: 20 })
  t.ok(out.refused < 0.02 * CAPACITY * 20, `${out.refused} refused of ${CAPACITY * 0.95 * 20}`)
  t.ok(out.admittedPerS > 0.9 * CAPACITY, `${out.admittedPerS.toFixed(0)}/s admitted`)
})

for (const multiple of [2, 5, 10]) {
  t.test(`at ${multiple}x capacity the loop keeps serving near capacity, its turns near the slice, well under the bound`, async (t) => {
    const turn = new VirtualTurn()
    const out = simulate(new LoopAdmission(BOUND, turn), turn, { rate: CAPACITY * multiple })
    t.ok(out.admittedPerS >= 0.85 * CAPACITY, `${out.admittedPerS.toFixed(0)}/s admitted of ${CAPACITY}/s`)
    // A turn admits work for the slice, then the request that crosses it
    // finishes (2 ms), then the refusals of that turn.
    t.ok(out.turnP99 <= SLICE_MS * 1.5, `turn p99 ${out.turnP99.toFixed(1)} ms, slice ${SLICE_MS} ms`)
    t.ok(out.latencyP99 <= 2 * SLICE_MS * 1.5, `p99 of admitted ${out.latencyP99.toFixed(1)} ms`)
    t.ok(out.refused > 0)
  })
}

t.test('without it the same loop runs turns of seconds', async (t) => {
  const turn = new VirtualTurn()
  const out = simulate(null, turn, { rate: CAPACITY * 2, seconds: 4 })
  t.ok(out.latencyP99 > 1000, `p99 ${out.latencyP99.toFixed(0)} ms`)
})

t.test('work after the last admitted request shrinks the budget, so turns stay as short as they can', async (t) => {
  const turn = new VirtualTurn()
  const admission = new LoopAdmission(BOUND, turn)
  // 20 ms of other work in every turn: more than the slice itself.
  const out = simulate(admission, turn, { rate: CAPACITY * 5, tailMs: 20 })
  t.ok(admission.shedding)
  t.equal(admission.budget, SLICE_MS * MIN_BUDGET, 'the least budget: a request or two a turn')
  t.ok(out.turnP99 <= 20 + SLICE_MS, `turn p99 ${out.turnP99.toFixed(1)} ms`)
  // Work of a fixed length in every turn is the case where short turns cost
  // throughput: still, every turn serves a request at least.
  t.ok(out.admittedPerS >= 1000 / (20 + SLICE_MS), `${out.admittedPerS.toFixed(0)}/s admitted: a request a turn or more`)
})

t.test('a bound under the slice is the slice', async (t) => {
  const turn = new VirtualTurn()
  const admission = new LoopAdmission(4, turn)
  t.equal(admission.slice, 4)
  t.equal(new LoopAdmission(BOUND, turn).slice, SLICE_MS)
  const out = simulate(admission, turn, { rate: CAPACITY * 5 })
  t.ok(out.turnP99 <= 4 * 1.5 + 2, `turn p99 ${out.turnP99.toFixed(1)} ms`)
  t.ok(out.admittedPerS >= 0.85 * CAPACITY, `${out.admittedPerS.toFixed(0)}/s admitted`)
})

t.test('one long burst is served up to the ceiling; only a standing backlog starts shedding', async (t) => {
  const turn = new VirtualTurn()
  const admission = new LoopAdmission(BOUND, turn)
  // One turn reads 60 requests of 2 ms: up to twice the bound is served.
  let served = 0
  for (let i = 0; i < 60; i++) {
    if (!admission.refuse(1)) {
      served++
      turn.now += 2
    }
  }
  t.equal(served, BOUND * CEILING / 2 + 1, 'admitted while the turn had run at most the ceiling')
  turn.end()
  t.notOk(admission.shedding, 'a single long turn is a burst')
  // Long turns for a whole interval: a backlog.
  let turns = 0
  for (;;) {
    admission.refuse(1)
    if (admission.shedding) break
    turn.now += 2 * BOUND
    turn.end()
    turns++
  }
  // The burst's turn, then an interval of turns past the target.
  t.equal(turns, INTERVAL_MS / (2 * BOUND), 'shedding once turns ran past the target for an interval')
  // It aims at turns of the slice: a turn of twice the bound takes the
  // budget to its least.
  t.equal(admission.budget, SLICE_MS * MIN_BUDGET, 'the budget follows the last turn')
  // In the same turn, past the budget: refused; the class factor scales it.
  turn.now += admission.budget + 1
  t.ok(admission.refuse(1))
  t.notOk(admission.refuse(2), 'a critical request has twice the budget')
  turn.end()
  // The load goes: short turns, no refusals.
  const lastRefusal = turn.now
  while (turn.now - lastRefusal < INTERVAL_MS) {
    t.notOk(admission.refuse(1))
    t.ok(admission.shedding, 'still shedding within an interval of the last refusal')
    turn.now += 5
    turn.end()
  }
  t.equal(admission.budget, SLICE_MS, 'short turns gave the budget back')
  t.notOk(admission.refuse(1))
  t.notOk(admission.shedding, 'a short turn an interval after the last refusal ends it')
  t.equal(admission.budget, SLICE_MS)
})

t.test('a quiet spell resets the backlog test', async (t) => {
  const turn = new VirtualTurn()
  const admission = new LoopAdmission(BOUND, turn)
  admission.refuse(1)
  turn.now += 2 * BOUND
  turn.end()
  admission.refuse(1)
  turn.quiet(turn.now + 10 * INTERVAL_MS)
  admission.refuse(1)
  turn.now += 2 * BOUND
  turn.end()
  admission.refuse(1)
  t.notOk(admission.shedding, 'the long turns were not in a row')
})
