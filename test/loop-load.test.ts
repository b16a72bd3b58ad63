import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import {
  ENGAGE_AT,
  ENGAGE_SAMPLES,
  every,
  FIRST_HOLD_MS,
  FIRST_SUPPRESS_MS,
  LoopLoad,
  loopUtilization,
  MAX_HOLD_MS,
  MAX_SUPPRESS_MS,
  MIN_REFUSALS,
  QUIET_SAMPLES,
  RELEASE_BELOW,
  RELIEF_BELOW,
  SAMPLE_EVERY_REFUSALS,
  SAMPLE_MS,
  SLOWED_BELOW,
  SLOWED_MS,
  SLOWED_STORM_PER_S,
  STORM_BACK,
  VERIFY_MS
} from '../lib/loop-load.js'

// A brake that holds slows clients that retry at once: a tenth of the refusals.
const SLOWED = MIN_REFUSALS / 10

// A LoopLoad on a virtual clock: `sample(u, refusals, retries)` counts the
// refusals (the first `retries` of them retries, all by default), lets
// SAMPLE_MS pass with the loop busy `u` of the time, and runs the tick.
function virtual () {
  let utilization = 0
  let clock = 0
  let tick: (() => void) | null = null
  const calls = { samples: 0, starts: 0, stops: 0, misjudged: 0 }
  const load = new LoopLoad({
    sample: () => { calls.samples++; return utilization },
    now: () => clock,
    every: (fn, ms) => {
      if (ms !== SAMPLE_MS) throw new Error(`sampled every ${ms} ms`)
      calls.starts++
      tick = fn
      return () => { calls.stops++; tick = null }
    }
  })
  load.onMisjudged = () => { calls.misjudged++ }
  // Refusals held back: a storm's, unless a test says otherwise.
  load.held = () => 10_000
  const sample = (u: number, refusals = MIN_REFUSALS, retries = refusals): boolean => {
    for (let i = 0; i < refusals; i++) load.refused(i < retries)
    utilization = u
    clock += SAMPLE_MS
    if (tick === null) throw new Error('not sampling')
    tick()
    return load.engaged
  }
  /** A storm: saturated samples with refusals pouring in, as many as engage the brake. */
  const engage = (): boolean => {
    for (let i = 0; i < ENGAGE_SAMPLES; i++) sample(1)
    return load.engaged
  }
  /** Samples at `u` for `ms`; whether the brake was engaged after each. */
  const hold = (u: number, ms: number, refusals = SLOWED): boolean[] => Array.from({ length: ms / SAMPLE_MS }, () => sample(u, refusals))
  /** Samples at `u` until the brake lets go; how long it held. */
  const untilReleased = (u: number, refusals = SLOWED): number => {
    const from = clock
    while (sample(u, refusals)) if (clock - from > 10 * MAX_HOLD_MS) throw new Error('never released')
    return clock - from
  }
  /** Time passes, the timer does not fire: a flooded loop. */
  const flood = (ms: number, refusals: number, u = 1): void => {
    utilization = u
    clock += ms
    for (let i = 0; i < refusals; i++) load.refused(true)
  }
  /** Lets `ms` pass and runs the timer's tick. */
  const tickAfter = (ms: number): void => {
    clock += ms
    if (tick === null) throw new Error('not sampling')
    tick()
  }
  return { load, calls, sample, engage, hold, untilReleased, flood, tickAfter }
}

t.test('nothing is sampled until a refusal; then one timer, however many refusals', async (t) => {
  const { load, calls, sample } = virtual()
  t.equal(load.sampling, false)
  t.equal(calls.starts, 0)
  for (let i = 0; i < 1000; i++) load.refused(true)
  t.equal(load.sampling, true)
  t.equal(calls.starts, 1)
  t.equal(calls.samples, 1, 'the utilization from before the refusals is discarded')
  sample(0.5, 1000)
  t.equal(calls.starts, 1)
  t.equal(load.engaged, false)
  t.equal(load.samples, 1, 'samples are counted')
})

t.test('engages after ENGAGE_SAMPLES saturated samples in a row, each with MIN_REFUSALS refusals', async (t) => {
  const { load, sample } = virtual()
  load.refused(true)
  const almost = (): boolean[] => Array.from({ length: ENGAGE_SAMPLES - 1 }, () => sample(1))
  t.same(almost(), Array(ENGAGE_SAMPLES - 1).fill(false))
  t.equal(sample(ENGAGE_AT - 0.01), false, 'busy, not saturated: the count starts again')
  almost()
  t.equal(sample(1, MIN_REFUSALS - 1), false, 'saturated, with too few refusals to be the cause')
  almost()
  t.equal(sample(1, 0), false, 'saturated, but no refusal in the sample')
  almost()
  t.equal(sample(ENGAGE_AT, MIN_REFUSALS), true, 'saturated, with refusals, long enough')
})

t.test('engages only once retries pour in: first refusals alone, however many, do not', async (t) => {
  const { sample } = virtual()
  sample(0, 1)
  // A client opening connections in a burst: each one's first refusal.
  t.same(Array.from({ length: ENGAGE_SAMPLES + 2 }, () => sample(1, MIN_REFUSALS, 0)), Array(ENGAGE_SAMPLES + 2).fill(false), 'saturated with first refusals')
  t.equal(sample(1, MIN_REFUSALS, MIN_REFUSALS - 1), false, 'too few retries among them')
  t.equal(sample(1, MIN_REFUSALS, MIN_REFUSALS), true, 'retries: a storm, saturated for long enough already')
  const other = virtual()
  other.sample(0, 1)
  other.sample(1, MIN_REFUSALS, MIN_REFUSALS)
  other.sample(1, MIN_REFUSALS, MIN_REFUSALS)
  t.equal(other.sample(1, MIN_REFUSALS, 0), false, 'retries in the run, none in its last sample')
  t.equal(other.sample(1, MIN_REFUSALS, MIN_REFUSALS), true)
})

t.test('a flooded loop fires its timer late: refusals take the sample once it is due', async (t) => {
  const { load, calls, flood } = virtual()
  load.refused(true)
  t.equal(calls.samples, 1)
  flood(SAMPLE_MS - 1, 2 * SAMPLE_EVERY_REFUSALS)
  t.equal(calls.samples, 1, 'not due yet')
  flood(1, SAMPLE_EVERY_REFUSALS - 2)
  t.equal(calls.samples, 1, `due, but only every ${SAMPLE_EVERY_REFUSALS} refusals`)
  flood(0, 1)
  t.equal(calls.samples, 2, 'taken by a refusal')
  for (let i = 1; i < ENGAGE_SAMPLES; i++) flood(SAMPLE_MS, SAMPLE_EVERY_REFUSALS)
  t.equal(load.engaged, true, 'engaged without the timer')
})

t.test('the timer skips a sample that a refusal took moments before it', async (t) => {
  const { load, calls, flood, tickAfter } = virtual()
  load.refused(true)
  for (let round = 0; round < ENGAGE_SAMPLES; round++) {
    // A refusal takes the sample once it is due, and the timer, on its own
    // phase, ticks a few milliseconds later, in a burst that fills them.
    flood(SAMPLE_MS, SAMPLE_EVERY_REFUSALS, 0.3)
    const taken = calls.samples
    flood(0, SAMPLE_EVERY_REFUSALS, 1)
    tickAfter(SAMPLE_MS / 2 - 1)
    t.equal(calls.samples, taken, `round ${round + 1}: the tick ${SAMPLE_MS / 2 - 1} ms after a sample takes none`)
  }
  t.equal(load.engaged, false, 'short bursts between samples do not engage the brake')
  tickAfter(SAMPLE_MS / 2)
  t.equal(calls.samples, ENGAGE_SAMPLES + 2, 'a tick half a sample after the last one takes it')
})

t.test('holds at least FIRST_HOLD_MS, then lets go once utilization falls below RELEASE_BELOW', async (t) => {
  const { sample, hold } = virtual()
  // A storm of twice the fewest refusals that count.
  for (let i = 0; i < ENGAGE_SAMPLES; i++) sample(1, 2 * MIN_REFUSALS)
  // The brake removes the refusals' load at once: the loop looks idle.
  t.same(new Set(hold(0.1, FIRST_HOLD_MS - SAMPLE_MS)), new Set([true]), 'engaged for the whole hold')
  t.equal(sample(RELEASE_BELOW, SLOWED), true, 'between the marks: still engaged')
  t.equal(sample(RELEASE_BELOW - 0.01, SLOWED), false, 'released below the lower mark')
  t.equal(sample(ENGAGE_AT - 0.01, SLOWED), false, 'and stays released below the upper one')
  t.equal(sample(0.5, 2 * MIN_REFUSALS * STORM_BACK), false, 'with refusals at half the storm\'s rate')
  t.equal(sample(0.5, 2 * MIN_REFUSALS * STORM_BACK + 1), false, 'at more than that on a loop half idle: a client on its own schedule, not the storm')
  t.equal(sample(RELEASE_BELOW, 2 * MIN_REFUSALS * STORM_BACK + 1), true, 'at more than that on a loop they fill again: the same storm')
})

t.test('a loop that stays busy keeps the brake on past the hold', async (t) => {
  const { sample, hold, engage } = virtual()
  engage()
  t.same(new Set(hold(0.8, 10 * FIRST_HOLD_MS)), new Set([true]))
  t.equal(sample(0.5, SLOWED), false)
})

t.test('a loop that stays saturated while refusals are held was not filled by them: off, and not again for a while', async (t) => {
  const { calls, sample, hold, engage } = virtual()
  t.equal(engage(), true)
  // A CPU-bound route, or a starved host: holding refusals changes nothing.
  const held = hold(RELIEF_BELOW, VERIFY_MS, MIN_REFUSALS)
  t.equal(held.at(-1), false, 'let go after VERIFY_MS')
  t.equal(held.filter((engaged) => engaged).length, VERIFY_MS / SAMPLE_MS - 1, 'engaged until then')
  t.equal(calls.misjudged, 1, 'what it held is answered')
  t.same(new Set(hold(1, FIRST_SUPPRESS_MS - SAMPLE_MS, 4 * MIN_REFUSALS)), new Set([false]), 'off for FIRST_SUPPRESS_MS, however saturated')
  t.equal(engage(), true, 'then it may engage again')
  t.equal(hold(1, VERIFY_MS, MIN_REFUSALS).at(-1), false, 'misjudged again')
  t.same(new Set(hold(1, 2 * FIRST_SUPPRESS_MS - SAMPLE_MS, 4 * MIN_REFUSALS)), new Set([false]), 'off twice as long')
  t.equal(engage(), true)
  // This time holding lightens the loop: a storm. It holds, then lets go,
  // and the suppression starts again from the shortest.
  t.same(new Set(hold(0.5, VERIFY_MS, SLOWED)), new Set([true]), 'half busy over VERIFY_MS: relieved')
  t.same(new Set(hold(0.9, 2 * VERIFY_MS, SLOWED)), new Set([true]), 'relieved once: kept on while the loop is busy')
  t.equal(sample(0.1, SLOWED), false, 'released below RELEASE_BELOW after the hold')
  t.equal(MAX_SUPPRESS_MS, 8 * FIRST_SUPPRESS_MS)
})

t.test('relief is judged over VERIFY_MS: a sample\'s dip does not count, the average does', async (t) => {
  const { calls, sample, hold, engage } = virtual()
  t.equal(engage(), true)
  // A CPU-bound route keeps the loop busy; one sample dips.
  t.equal(sample(0.5, MIN_REFUSALS), true)
  t.equal(hold(1, VERIFY_MS - SAMPLE_MS, MIN_REFUSALS).at(-1), false, 'let go at VERIFY_MS')
  t.equal(calls.misjudged, 1)
  const other = virtual()
  t.equal(other.engage(), true)
  const busy = VERIFY_MS / SAMPLE_MS / 2
  // Half the second saturated, half a quarter busy with the refusals slowed:
  // below RELIEF_BELOW on average.
  const held = [...other.hold(1, busy * SAMPLE_MS, MIN_REFUSALS), ...other.hold(0.25, busy * SAMPLE_MS, SLOWED)]
  t.same(new Set(held), new Set([true]), 'kept on')
  t.equal(other.calls.misjudged, 0)
})

t.test('a loop that lightens while refusals come as fast as before was not lightened by holding them: off', async (t) => {
  // A client opening its pool in a burst saturates the loop a moment, then
  // goes on at its own rate, on a loop that idles.
  const open = virtual()
  open.engage()
  const held = open.hold(0.3, VERIFY_MS, MIN_REFUSALS)
  t.equal(held.at(-2), true)
  t.equal(held.at(-1), false, 'let go at VERIFY_MS')
  t.equal(open.calls.misjudged, 1)
  // A storm leaves a gap once its connections are held.
  const below = Math.ceil(MIN_REFUSALS * SLOWED_BELOW) - 1
  const cases: Array<[string, number, number, number, boolean]> = [
    ['a gap of SLOWED_MS', SLOWED_MS, below, 10_000, true],
    ['a gap shorter than SLOWED_MS', SLOWED_MS - SAMPLE_MS, below, 10_000, false],
    ['refusals at SLOWED_BELOW of the storm\'s rate', SLOWED_MS, below + 1, 10_000, false],
    ['a gap with nothing held: the clients\' own pause', SLOWED_MS, 0, 0, false],
    ['a gap with fewer held than the storm sends in SLOWED_MS', SLOWED_MS, 0, MIN_REFUSALS * SLOWED_MS / SAMPLE_MS - 1, false],
    ['a gap with as many held', SLOWED_MS, 0, MIN_REFUSALS * SLOWED_MS / SAMPLE_MS, true]
  ]
  for (const [what, ms, refusals, holding, kept] of cases) {
    const storm = virtual()
    storm.load.held = () => holding
    storm.engage()
    storm.hold(0.3, ms, refusals)
    const after = storm.hold(0.3, VERIFY_MS - ms, MIN_REFUSALS)
    t.equal(after.at(-1), kept, `${what}: ${kept ? 'kept on' : 'let go'}`)
  }
})

t.test('a storm engaged again soon after a release need not leave its gap again', async (t) => {
  const { calls, sample, hold, untilReleased, engage } = virtual()
  engage()
  hold(0.3, SLOWED_MS, 0)
  t.equal(SLOWED_MS + untilReleased(0.3, MIN_REFUSALS), FIRST_HOLD_MS, 'a storm: held, then let go')
  t.equal(sample(1), true, 'back at once: engaged again')
  // Its connections come back in waves as their holds end.
  t.same(new Set(hold(0.3, VERIFY_MS + SAMPLE_MS, MIN_REFUSALS)), new Set([true]), 'kept on past VERIFY_MS')
  t.equal(calls.misjudged, 0)
})

t.test('the loop\'s average over VERIFY_MS weighs each sample by its length', async (t) => {
  const { calls, engage, flood, tickAfter, hold } = virtual()
  t.equal(engage(), true)
  // A late tick: 400 ms half busy, with the refusals slowed to none, then
  // a saturated loop with a trickle of refusals (not a wide storm).
  const late = 8 * SAMPLE_MS
  flood(0, 0, 0.5)
  tickAfter(late)
  const rest = hold(1, VERIFY_MS - late, 1)
  t.same(new Set(rest), new Set([true]), 'kept on: 80% busy over the second, though all samples but one were saturated')
  t.equal(calls.misjudged, 0)
})

t.test('each engagement is judged on its own first second', async (t) => {
  const { calls, hold, engage, untilReleased, sample } = virtual()
  // A storm, slowed, with plenty of refusals still coming: kept on, then released.
  t.equal(engage(), true)
  t.same(new Set(hold(1, VERIFY_MS, MIN_REFUSALS * STORM_BACK - 1)), new Set([true]))
  untilReleased(0.1, 0)
  // Quiet long enough for a new episode, then a saturated loop with a trickle of refusals.
  hold(0.1, 4 * MAX_HOLD_MS, 1)
  t.same(Array.from({ length: ENGAGE_SAMPLES }, () => sample(1)), [...Array(ENGAGE_SAMPLES - 1).fill(false), true], 'engaged again')
  const trickle = Math.floor(SLOWED_STORM_PER_S * SAMPLE_MS / 1000)
  t.equal(hold(1, VERIFY_MS, trickle).at(-1), false, 'the first engagement\'s refusals do not count for the second')
  t.equal(calls.misjudged, 1)
})

t.test('a loop that stays saturated while holding slows the refusals below half the storm\'s rate: the storm, kept on', async (t) => {
  const { calls, sample, hold, engage } = virtual()
  // Thousands of connections: one refusal each per hold still fills the loop.
  t.equal(engage(), true)
  t.same(new Set(hold(1, 3 * VERIFY_MS, MIN_REFUSALS * STORM_BACK - 1)), new Set([true]), 'engaged past VERIFY_MS')
  t.equal(calls.misjudged, 0)
  t.equal(sample(RELEASE_BELOW - 0.01, SLOWED), false, 'let go once the loop is idle enough, after the hold')
  // At half the storm's rate, the clients were not slowed: their own schedule.
  t.equal(engage(), true, 'engaged again')
  const held = hold(1, VERIFY_MS, MIN_REFUSALS * STORM_BACK)
  t.equal(held.at(-1), false, 'misjudged at VERIFY_MS')
  t.equal(calls.misjudged, 1)
})

t.test('holding slows the refusals to a trickle while the loop stays saturated: not a storm, off', async (t) => {
  const { calls, hold, engage } = virtual()
  // Per sample, the fewest refusals of a slowed storm, and one less.
  const storm = Math.ceil(SLOWED_STORM_PER_S * SAMPLE_MS / 1000)
  const trickle = Math.floor(SLOWED_STORM_PER_S * SAMPLE_MS / 1000)
  t.ok(trickle < SLOWED_STORM_PER_S * SAMPLE_MS / 1000 && trickle * 1000 / SAMPLE_MS < MIN_REFUSALS * STORM_BACK * 1000 / SAMPLE_MS)
  // A client over a fixed pool of connections slows down with them, while a
  // CPU-bound route keeps the loop saturated.
  t.equal(engage(), true)
  const held = hold(1, VERIFY_MS, trickle)
  t.equal(held.at(-2), true, 'engaged until VERIFY_MS')
  t.equal(held.at(-1), false, 'then let go: its refusals were not what filled the loop')
  t.equal(calls.misjudged, 1, 'what it held is answered')
  // The same, from a storm of SLOWED_STORM_PER_S connections or more.
  const { calls: otherCalls, hold: holdOther, engage: engageOther } = virtual()
  t.equal(engageOther(), true)
  t.same(new Set(holdOther(1, 3 * VERIFY_MS, storm)), new Set([true]), 'a slowed storm: kept on')
  t.equal(otherCalls.misjudged, 0)
})

t.test('the same storm within a hold of letting go: engaged on one sample, for twice as long, up to MAX_HOLD_MS', async (t) => {
  const { load, sample, untilReleased, engage } = virtual()
  t.equal(engage(), true)
  t.equal(load.escalates, false, 'a new engagement: holds do not grow yet')
  const holds = [untilReleased(0)]
  for (let round = 0; round < 6; round++) {
    t.equal(sample(1), true, 'one saturated sample: the same storm')
    t.equal(load.escalates, true, 'engaged again: holds grow at once')
    holds.push(untilReleased(0))
  }
  t.same(holds, [FIRST_HOLD_MS, 2 * FIRST_HOLD_MS, 4 * FIRST_HOLD_MS, MAX_HOLD_MS, MAX_HOLD_MS, MAX_HOLD_MS, MAX_HOLD_MS])
  t.equal(MAX_HOLD_MS, 8 * FIRST_HOLD_MS)
})

t.test('saturated again long after letting go: a new episode, engaged as slowly, with the shortest hold', async (t) => {
  const { sample, hold, untilReleased, engage } = virtual()
  engage()
  t.equal(untilReleased(0), FIRST_HOLD_MS)
  sample(1)
  t.equal(untilReleased(0), 2 * FIRST_HOLD_MS, 'saturated again at once: a doubled hold')
  t.same(new Set(hold(0.5, 2 * FIRST_HOLD_MS)), new Set([false]), 'refusals on a loop with room to spare')
  t.same(Array.from({ length: ENGAGE_SAMPLES }, () => sample(1)), [...Array(ENGAGE_SAMPLES - 1).fill(false), true])
  t.equal(untilReleased(0), FIRST_HOLD_MS, 'the shortest hold')
})

t.test('sampling stops after QUIET_SAMPLES without a refusal, letting go; the next refusal starts it again', async (t) => {
  const { load, calls, sample, engage } = virtual()
  engage()
  t.equal(load.engaged, true)
  for (let i = 1; i < QUIET_SAMPLES; i++) sample(1, 0)
  t.equal(load.sampling, true, `still sampling after ${QUIET_SAMPLES - 1} quiet samples`)
  t.equal(load.engaged, true, 'and still engaged: the loop is saturated')
  sample(1, 0)
  t.equal(load.sampling, false)
  t.equal(load.engaged, false, 'refusals stopped: nothing to brake')
  t.equal(calls.stops, 1)
  const samples = calls.samples
  load.refused(true)
  t.equal(load.sampling, true)
  t.equal(calls.starts, 2)
  t.equal(calls.samples, samples + 1, 'restarting discards the quiet interval')
  t.equal(sample(1), true, 'saturated again soon after: the same storm, engaged at once')
})

t.test('a refusal in between resets the quiet count', async (t) => {
  const { load, sample } = virtual()
  sample(0)
  for (let round = 0; round < 3; round++) {
    for (let i = 1; i < QUIET_SAMPLES; i++) sample(0, 0)
    sample(0)
  }
  t.equal(load.sampling, true)
})

t.test('stop() lets go and stops sampling; twice is harmless', async (t) => {
  const { load, calls, engage } = virtual()
  load.stop()
  t.equal(calls.stops, 0, 'not sampling: nothing to stop')
  engage()
  load.stop()
  load.stop()
  t.equal(load.engaged, false)
  t.equal(load.sampling, false)
  t.equal(calls.stops, 1)
})

t.test('loopUtilization measures the loop: busy near 1, idle near 0', async (t) => {
  const utilization = loopUtilization()
  const end = performance.now() + 50
  while (performance.now() < end);
  // Node 24 accounts a callback's busy time once the loop has come round.
  await new Promise((resolve) => setImmediate(resolve))
  const busy = utilization()
  t.ok(busy > 0.9 && busy <= 1, `busy: ${busy}`)
  // The test runner's own work (compiling the next module, a collection)
  // can fill a short sleep on a loaded machine: the quietest of a few.
  let idle = 1
  for (let i = 0; i < 5 && idle >= 0.5; i++) {
    await sleep(100)
    idle = Math.min(idle, utilization())
  }
  t.ok(idle >= 0 && idle < 0.5, `idle: ${idle}`)
})

t.test('every() ticks until stopped', async (t) => {
  let ticks = 0
  const stop = every(() => { ticks++ }, 5)
  await sleep(50)
  stop()
  const seen = ticks
  t.ok(seen >= 2, `ticked ${seen} times`)
  await sleep(30)
  t.equal(ticks, seen, 'no tick after stop')
})

t.test('the real clock and sampler by default, and nothing held', async (t) => {
  const load = new LoopLoad()
  t.equal(load.held(), 0, 'on its own, before a RejectDelay tells it')
  load.refused(true)
  t.equal(load.sampling, true)
  load.stop()
  t.equal(load.sampling, false)
})
