import { performance } from 'node:perf_hooks'

/** The share of time (0 to 1) the event loop was busy since the previous call. */
export type Sampler = () => number

/** Calls `tick` every `ms` until the returned function is called. */
export type Every = (tick: () => void, ms: number) => () => void

/** How often the loop is sampled while refusals happen. */
export const SAMPLE_MS = 50
/** Utilization over one sample at or above which the loop is saturated. */
export const ENGAGE_AT = 0.9
/**
 * Consecutive saturated samples, each with refusals pouring in, that engage
 * the brake: a quarter of a second. A storm saturates the loop for as long
 * as it lasts; a client opening a pool of connections against a server
 * still warming up, for a sample or a few (up to 6 in a row, in the lab,
 * from a cold start at 25 times capacity).
 *
 * The last of them must also bring retries at `MIN_REFUSALS_PER_S` or more
 * (refusals on connections refused within the last second). A client that
 * opens connections in a burst (an open-loop client whose pool grows) can
 * saturate the loop with first refusals alone, and the brake answers a first
 * refusal at once anyway. A storm's connections retry: at the onset of one
 * of 5,000 connections, the loop stayed saturated with first refusals for
 * some 250 ms, then about 1,000 retries came in the next 50 ms.
 */
export const ENGAGE_SAMPLES = 3
/**
 * Fewest refusals a second for them to be what saturates the loop: at about
 * 12 µs of CPU each (the lab's reject-cost scenario), 1,000 refusals a second
 * take about 1% of a core. Fewer, during a long garbage collection or a
 * burst of compilation, are not theirs to relieve.
 */
export const MIN_REFUSALS_PER_S = 1000
/** The same, in one sample. */
export const MIN_REFUSALS = MIN_REFUSALS_PER_S * SAMPLE_MS / 1000
/**
 * A loop flooded with requests fires its timers late: libuv polls up to
 * some 48,000 events before it runs them again. So refusals also take the
 * sample once it is due, every this many of them. At the onset of a storm
 * of 1,000 connections, refusals came at about 4,000 a second while the
 * loop took in the connections: sampled every 1,024 of them, the brake
 * engaged some 450 ms after the first refusal; every 128, after some 150 ms.
 * A clock read per 128 refusals costs nothing measurable.
 */
export const SAMPLE_EVERY_REFUSALS = 128
/** Once engaged, utilization over one sample below which the brake may let go. */
export const RELEASE_BELOW = 0.7
/**
 * Refusal rate, as a share of the storm's rate while the loop saturated,
 * above which refusals are back within a hold of letting go: the same storm;
 * below which, engaged, the brake has slowed the storm (see `RELIEF_BELOW`).
 */
export const STORM_BACK = 0.5
/** Shortest engagement; doubled each time the storm is back soon after a release. */
export const FIRST_HOLD_MS = 2000
/** Longest engagement before the brake lets go to see whether it is still needed. */
export const MAX_HOLD_MS = 16_000
/**
 * Once engaged, over its first `VERIFY_MS` the loop must be busy less than
 * this on average, with the refusals slowed (see `SLOWED_MS`), or else the
 * refusals must fall below `STORM_BACK` of the storm's rate in a sample
 * while still coming at `SLOWED_STORM_PER_S` or more over the whole of it:
 * holding refusals back lightened the loop, or slowed the clients that fill
 * it. The rate matters where one refusal per connection per hold still keeps
 * the loop busy, as thousands of connections in a retry storm do. A loop
 * that stays this busy otherwise is kept busy by something else (CPU-bound
 * routes, a starved host), and the refusals kept coming as fast (clients
 * that send on their own schedule) or all but stopped (see
 * `SLOWED_STORM_PER_S`): holding them would only turn them into timeouts.
 */
export const RELIEF_BELOW = 0.85
export const VERIFY_MS = 1000
/**
 * A loop that holding lightened must also show the refusals slowed: below
 * `SLOWED_BELOW` of the storm's rate for `SLOWED_MS` running, while at
 * least as many were held as the storm sent in `SLOWED_MS` (a client
 * generating load at 25 times capacity on the same two cores stalled for
 * 200-400 ms at a time with some 100 held, a tenth of that). A storm leaves that gap once its connections are all held
 * (none comes back before its hold ends): in traced storms of 1,000 and
 * 5,000 connections, 150 to 990 ms of it in the first second. A client that
 * sends on its own schedule keeps sending, on other connections, and the
 * loop it left idle after a burst proves nothing: over a pool that grows,
 * such a client's refusals stayed above that mark for all but 50 ms at
 * most, in ten engagements at its onset. Not asked of a storm engaged again
 * soon after a release: its connections come back as their holds end, in
 * waves, and a storm of 5,000 left its gap 0.9 s after such an engagement.
 */
export const SLOWED_BELOW = 0.25
export const SLOWED_MS = 100
/**
 * Fewest refusals a second, over the first `VERIFY_MS` of an engagement,
 * for a slowed storm on a loop that stays saturated. A storm comes back
 * about one refusal per connection per hold, and a new engagement's holds
 * last 0.75 to 1 s: this is a storm of some 250 connections (of more when
 * the brake engages again soon after letting go: connections it held before
 * come back only as their longer holds end). A client that sends on its
 * own schedule over a fixed pool of connections (an undici Pool of 32 to
 * 128, say) slows down with its held connections as well, to one or two
 * refusals per connection in that second: if a CPU-bound route keeps the
 * loop saturated meanwhile, its refusals were not what filled it, and
 * holding them for the whole engagement turned 95-98% of its requests into
 * timeouts in a probe.
 */
export const SLOWED_STORM_PER_S = 250
/** After a misjudged engagement, the brake stays off this long; doubled each time in a row, up to MAX_SUPPRESS_MS. */
export const FIRST_SUPPRESS_MS = 10_000
export const MAX_SUPPRESS_MS = 80_000
/** Sampling stops after this many samples without a refusal: a second. */
export const QUIET_SAMPLES = 1000 / SAMPLE_MS

/** Event-loop utilization since the previous call, from libuv's idle-time counters. */
export function loopUtilization (): Sampler {
  let last = performance.eventLoopUtilization()
  return () => {
    const now = performance.eventLoopUtilization()
    const { utilization } = performance.eventLoopUtilization(now, last)
    last = now
    return utilization
  }
}

/** An unref'd interval: sampling never keeps a process alive. */
export const every: Every = (tick, ms) => {
  const timer = setInterval(tick, ms)
  timer.unref()
  return () => { clearInterval(timer) }
}

export interface LoopLoadOptions {
  sample?: Sampler
  now?: () => number
  every?: Every
}

/**
 * Tells the retry-storm brake when refusals threaten admitted work.
 *
 * A refusal costs about as much loop time as a small 200. A client that
 * retries the moment it is refused turns each refusal into another, as fast
 * as the loop answers, until refusals fill the loop and admitted requests
 * wait behind them. A client that sends on its own schedule leaves the loop
 * idle part of the time, however fast it sends (in the lab, an open-loop
 * client at 25 times capacity kept it a third busy): holding its refusals
 * back would not lighten the loop, only turn them into timeouts. So the
 * loop's utilization is sampled, on one timer that runs only while refusals
 * happen, and the brake engages when the loop stays saturated while
 * refusals pour in (`ENGAGE_SAMPLES` in a row), retries among them. It lets
 * go, and stays off for a while, when holding did not help (`VERIFY_MS`).
 *
 * The brake removes the load that engaged it, so the loop looks idle again:
 * it lets go only after a hold, and only once utilization has fallen well
 * below the mark. If the storm is back within a hold of letting go (the
 * loop saturates, or refusals come back at half the storm's rate on a loop
 * at least `RELEASE_BELOW` busy), one
 * sample engages the brake again, for twice as long (up to `MAX_HOLD_MS`),
 * so that a long storm is tested for its end seldom and briefly.
 */
export class LoopLoad {
  /** Repeated refusals are to be held back. */
  engaged = false
  /** Samples taken so far: a clock of the loop's own, for marks that cost no clock read. */
  samples = 0
  /** Refusals counted since the last sample. */
  #refusals = 0
  /** Retries among them. */
  #retries = 0
  #quiet = 0
  #stop: (() => void) | null = null
  #sampledAt = 0
  #engagedAt = 0
  /** Saturated samples in a row, and their refusals and milliseconds. */
  #saturated = 0
  #stormRefusals = 0
  #stormMs = 0
  /** The storm's refusal rate while the loop saturated, per millisecond. */
  #stormRate = 0
  #hold = FIRST_HOLD_MS
  #releasedAt = -Infinity
  /** Holding was seen to lighten the loop or to slow a storm: the engagement is not in question. */
  #relieved = false
  /** Refusals fell below STORM_BACK of the storm's rate in a sample since the brake engaged. */
  #slowed = false
  /** Milliseconds running, to the last sample, with refusals below SLOWED_BELOW of the storm's rate and some held. */
  #gapMs = 0
  /** #gapMs reached SLOWED_MS since the brake engaged. */
  #gap = false
  /** Engaged again within a hold of letting go: the storm was judged before. */
  #again = false
  /** Refusals, busy milliseconds and milliseconds since the brake engaged, up to VERIFY_MS. */
  #engagedRefusals = 0
  #engagedBusyMs = 0
  #engagedMs = 0
  #suppressedUntil = -Infinity
  #suppress = FIRST_SUPPRESS_MS
  /** Called when the brake lets go because holding did not help: what it holds is to be answered now. */
  onMisjudged: (() => void) | null = null
  /** Refusals held back at the moment (set by `RejectDelay`). */
  held: () => number = () => 0
  readonly #sample: Sampler
  readonly #now: () => number
  readonly #every: Every

  constructor (options: LoopLoadOptions = {}) {
    this.#sample = options.sample ?? loopUtilization()
    this.#now = options.now ?? (() => performance.now())
    this.#every = options.every ?? every
  }

  /**
   * Read while engaged: engaged for long enough that the storm is not a
   * moment's saturation. The brake has held for a first hold, or was
   * engaged again after one. Holds grow past their first length only then,
   * so that an engagement that a burst caused (a client opening its pool of
   * connections against a busy server) costs a client at most the first hold.
   */
  get escalates (): boolean {
    return this.#hold > FIRST_HOLD_MS || this.#now() - this.#engagedAt >= FIRST_HOLD_MS
  }

  /** Whether the loop is being sampled. */
  get sampling (): boolean {
    return this.#stop !== null
  }

  /**
   * Counts a refusal, a retry if its connection was refused within the last
   * second; starts sampling if it had stopped.
   */
  refused (retry: boolean): void {
    if (this.#stop === null) this.#start()
    if (retry) this.#retries++
    if ((++this.#refusals & (SAMPLE_EVERY_REFUSALS - 1)) === 0 && this.#now() - this.#sampledAt >= SAMPLE_MS) this.#tick()
  }

  #start (): void {
    // Discards the utilization since the last sample, from before these refusals.
    this.#sample()
    this.#sampledAt = this.#now()
    this.#refusals = 0
    this.#retries = 0
    this.#quiet = 0
    this.#stop = this.#every(this.#tick, SAMPLE_MS)
  }

  #tick = (): void => {
    // A refusal took the sample moments ago, and the timer keeps its own
    // phase: a sample of a few milliseconds (a trace of a storm's onset
    // showed samples of 2 and 14 ms) reads any burst as a saturated loop.
    // The next tick takes it.
    if (this.#now() - this.#sampledAt < SAMPLE_MS / 2) return
    this.samples++
    const utilization = this.#sample()
    const refusals = this.#refusals
    this.#refusals = 0
    const retries = this.#retries
    this.#retries = 0
    if (refusals === 0 && ++this.#quiet >= QUIET_SAMPLES) {
      this.stop()
      return
    }
    if (refusals > 0) this.#quiet = 0
    this.update(utilization, refusals, this.#now(), retries)
  }

  /**
   * Moves the brake on one sample: the loop's utilization, and the refusals
   * counted since the last and the retries among them.
   */
  update (utilization: number, refusals: number, now: number, retries = refusals): void {
    // A saturated loop fires the timer late: refusals per millisecond.
    const elapsed = Math.max(1, now - this.#sampledAt)
    const rate = refusals / elapsed
    this.#sampledAt = now
    if (this.engaged) {
      if (!this.#relieved) {
        this.#engagedRefusals += refusals
        this.#engagedBusyMs += utilization * elapsed
        this.#engagedMs += elapsed
        if (rate < this.#stormRate * STORM_BACK) this.#slowed = true
        // A gap that the refusals held account for: at least as many as the
        // storm sent in SLOWED_MS. A client's own stall leaves one too.
        this.#gapMs = rate < this.#stormRate * SLOWED_BELOW && this.held() >= this.#stormRate * SLOWED_MS ? this.#gapMs + elapsed : 0
        if (this.#gapMs >= SLOWED_MS) this.#gap = true
        // Judged over the whole of VERIFY_MS: one sample's dip says nothing
        // of a loop that a CPU-bound route keeps busy.
        if (now - this.#engagedAt >= VERIFY_MS) {
          // Holding refusals back slowed them and lightened the loop, or
          // slowed a storm that still fills it, one refusal per connection
          // per hold.
          this.#relieved = this.#engagedBusyMs < RELIEF_BELOW * this.#engagedMs
            ? this.#gap || this.#again
            : this.#slowed && this.#engagedRefusals * 1000 >= SLOWED_STORM_PER_S * this.#engagedMs
          if (!this.#relieved) {
            // It did neither: the refusals were not what filled the loop.
            // Off, and not again for a while.
            this.engaged = false
            this.#releasedAt = -Infinity
            this.#suppressedUntil = now + this.#suppress
            this.#suppress = Math.min(MAX_SUPPRESS_MS, this.#suppress * 2)
            this.#saturated = 0
            this.onMisjudged?.()
            return
          }
        }
      }
      if (now - this.#engagedAt >= this.#hold && utilization < RELEASE_BELOW) {
        // Refusals already held belong to clients that retry at once: they
        // wait out their hold, and come back over it rather than all at once.
        this.engaged = false
        this.#releasedAt = now
        this.#suppress = FIRST_SUPPRESS_MS
      }
      return
    }
    if (now < this.#suppressedUntil) return
    const again = now - this.#releasedAt <= this.#hold
    // The same storm back: its refusals at more than half its rate, on a
    // loop they are filling again. The rate alone is not enough: a client
    // that sends on its own schedule keeps its rate whatever the brake does,
    // and would hold the brake on, hold after hold, on an idle loop.
    const storm = utilization >= ENGAGE_AT || (again && rate > this.#stormRate * STORM_BACK && utilization >= RELEASE_BELOW)
    if (!storm || rate * 1000 < MIN_REFUSALS_PER_S) {
      this.#saturated = 0
      return
    }
    if (this.#saturated++ === 0) {
      this.#stormRefusals = 0
      this.#stormMs = 0
    }
    this.#stormRefusals += refusals
    this.#stormMs += elapsed
    if (this.#saturated < (again ? 1 : ENGAGE_SAMPLES)) return
    // Not before retries pour in too: see ENGAGE_SAMPLES.
    if (retries * 1000 < MIN_REFUSALS_PER_S * elapsed) return
    this.#saturated = 0
    const stormRate = this.#stormRefusals / this.#stormMs
    this.#stormRate = again ? Math.max(this.#stormRate, stormRate) : stormRate
    this.engaged = true
    this.#relieved = false
    this.#slowed = false
    this.#gapMs = 0
    this.#gap = false
    this.#again = again
    this.#engagedRefusals = 0
    this.#engagedBusyMs = 0
    this.#engagedMs = 0
    this.#engagedAt = now
    this.#hold = again ? Math.min(MAX_HOLD_MS, this.#hold * 2) : FIRST_HOLD_MS
  }

  /**
   * Stops sampling and lets go of the brake: refusals stopped (what it holds
   * waits out its hold), or the server is closing (the caller answers it).
   */
  stop (): void {
    if (this.#stop === null) return
    this.#stop()
    this.#stop = null
    this.#refusals = 0
    this.#saturated = 0
    if (this.engaged) {
      this.engaged = false
      this.#releasedAt = this.#now()
    }
  }
}
