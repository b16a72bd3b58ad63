import type { AdaptiveState, Limit } from './limit.js'

export interface GradientSettings {
  /** The limit never goes below this. */
  minConcurrency: number
  /** The limit before the first measure. */
  initialConcurrency: number
  /** The limit never goes above this (the pool's maxConcurrency). */
  maxConcurrency: number
  /** How much slower than the baseline the work may get before the limit comes down: 0.25 = 25%. */
  tolerance: number
  /** Milliseconds a baseline may go unconfirmed under load before it is measured again. */
  baselineInterval: number
}

// A window closes after this many samples at least...
const WINDOW_SAMPLES = 10
// ...and after at least this long, or two baselines if longer: long enough for
// a change of the limit to show in the latency of the requests it let in.
const WINDOW_MIN_MS = 50
// One window moves the limit by at most these factors. Samples come from
// requests admitted under the limit in force, so a window's gradient is a
// fair estimate of the knee; the floor only bounds the harm of one noisy
// window (a GC pause), which growth undoes in a few windows.
const MAX_DECREASE = 0.2
const MAX_INCREASE = 2
// This many cuts in a row: the latency does not follow the limit down, so it
// is not queueing that the limit causes. The baseline is measured again.
const CUTS_BEFORE_REMEASURE = 4
// Latency differences below this are event-loop noise, not queueing.
const SLACK_MS = 1
// A window whose mean is within this factor of the baseline confirms it.
const CONFIRM = 1.1
// While the baseline is measured again, the limit is first this fraction of
// the concurrency the work sustains without queueing, so that nothing queues,
// then halved for as long as the latency still falls by this factor.
const REMEASURE_FRACTION = 0.9
const STILL_FALLING = 0.9
// A window faster than a confirmed baseline moves it down by this fraction
// of the difference. The mean of a window of ten samples is noisy, and the
// lowest of many such means sits well below the work's latency (a third
// below on a route of 20-80 ms): taken as the baseline, it makes every later
// window look queued. A baseline no window has confirmed yet (the first one,
// often slow while the process warms up, or a fresh measure) is replaced by
// a faster window outright.
const BASELINE_DOWN = 0.1
// A drop (the work said it is overloaded) cuts the limit by this factor.
const DROP_DECREASE = 0.9
// Requests left by their clients on work slower than the target cut the
// limit only in a window where they are this many times the samples, and
// by this factor at most. Only the slow ones count, so their mean is far
// above the target: on a route where some requests are slow and their
// clients give up on them (a report, an export), a window of ten events
// holds more of them than samples now and then by chance, and a window
// where they are merely the majority cut a pool at a sixth of its
// capacity to its minimum in a simulation. Nearly all, they are what a
// downstream slower than the clients wait leaves, and halving per window
// still brings the limit down within seconds.
const LEFT_OUTNUMBER = 4
const LEFT_MAX_DECREASE = 0.5

/**
 * A gradient limit: the limit is scaled, once per window, by the ratio of the
 * latency the work may have (the baseline, its latency without queueing,
 * plus `tolerance`) to the mean latency measured in the window. Above the
 * knee, where the work queues, latency grows in proportion to the requests
 * let in, so one window's ratio brings the limit to the knee plus
 * `tolerance` (Little's law); below it, latency stays at the baseline and
 * the limit grows by up to 1 + tolerance per window.
 *
 * The baseline follows the lowest window means (see BASELINE_DOWN). It can
 * only be trusted while
 * windows keep confirming it; under sustained load none does (the limit holds
 * the work at the baseline plus `tolerance`), and a baseline taken from such
 * windows would ratchet the limit up with every measure. Instead, when it has
 * gone unconfirmed for `baselineInterval` ms while the pool is busy, the
 * limit is lowered for one window to 90% of the concurrency the work sustains
 * without queueing, and the mean latency of the requests admitted in that
 * window is the new baseline, up or down. The requests above that
 * concurrency wait in the queue for about one window, but none of the work is
 * refused that the work could have done at once, and a pool that is not busy
 * is never measured this way: its windows confirm the baseline.
 *
 * No growth while app-limited: a window in which in-flight never reached the
 * limit says nothing about a higher one; one in which it stayed below half the
 * limit does not lower it either, as the limit did not cause its latency.
 *
 * Per sample: a few additions and comparisons, no allocation.
 */
export class GradientLimit implements Limit {
  readonly adaptive = true
  limit: number

  readonly #min: number
  readonly #max: number
  readonly #tolerance: number
  readonly #interval: number

  #estimate: number
  #baseline = -1
  /** Whether a window has confirmed the baseline since it was last set outright. */
  #confirmed = false
  #baselineAt = 0
  #recent = -1

  #windowStart = -1
  /** Requests admitted before this moment were admitted under another limit: not samples of this one. */
  #epoch = -1
  #cuts = 0
  /** The mean of the previous window of a measure of the baseline. */
  #measured = -1
  #count = 0
  #sum = 0
  #peak = 0
  #dropped = false
  /** Requests whose client left, slower than the target (see `onClientLeft`), and their time. */
  #left = 0
  #leftSum = 0
  /** The limit to return to after a measure of the baseline; -1 when none is under way. */
  #resume = -1

  constructor (settings: GradientSettings) {
    this.#min = settings.minConcurrency
    this.#max = settings.maxConcurrency
    this.#tolerance = settings.tolerance
    this.#interval = settings.baselineInterval
    this.#estimate = Math.min(this.#max, Math.max(this.#min, settings.initialConcurrency))
    this.limit = Math.max(1, Math.floor(this.#estimate))
  }

  onSample (startMs: number, rttMs: number, inFlight: number, didDrop: boolean): void {
    if (didDrop) {
      this.#dropped = true
    } else if (startMs >= this.#epoch) {
      this.#count++
      this.#sum += rttMs
    }
    this.#closeIfOver(startMs, rttMs, inFlight)
  }

  /**
   * A request whose client left before its answer. Its time to release is
   * no sample: a handler that stops when its client leaves ends early. But
   * it is a lower bound of the work's latency, and one above the target
   * says the work is that slow at least. When the work gets slower than the
   * clients wait, every admitted request outlives its client and no sample
   * comes at all: a limit that heard only samples would stay where it was,
   * letting in work no one waits for. A window in which such requests are
   * more than LEFT_OUTNUMBER times the samples cuts the limit as a window
   * of samples that slow would (see `#close`). Below the target, or before
   * there is one, the
   * client left for reasons of its own.
   */
  onClientLeft (startMs: number, rttMs: number, inFlight: number): void {
    if (this.#baseline >= 0 && startMs >= this.#epoch && rttMs > this.#target()) {
      this.#left++
      this.#leftSum += rttMs
    }
    this.#closeIfOver(startMs, rttMs, inFlight)
  }

  #target (): number {
    return this.#baseline * (1 + this.#tolerance) + SLACK_MS
  }

  #closeIfOver (startMs: number, rttMs: number, inFlight: number): void {
    const now = startMs + rttMs
    if (this.#windowStart < 0) this.#windowStart = startMs
    if (inFlight > this.#peak) this.#peak = inFlight
    if (this.#count + this.#left < WINDOW_SAMPLES && !this.#dropped) return
    const windowMs = Math.max(WINDOW_MIN_MS, 2 * this.#baseline, 2 * this.#recent)
    if (now - this.#windowStart < windowMs) return
    this.#close(now)
  }

  #close (now: number): void {
    const count = this.#count
    const mean = count === 0 ? -1 : this.#sum / count
    const left = this.#left
    const leftMean = left === 0 ? -1 : this.#leftSum / left
    const peak = this.#peak
    const dropped = this.#dropped
    this.#windowStart = now
    this.#count = 0
    this.#sum = 0
    this.#left = 0
    this.#leftSum = 0
    this.#peak = 0
    this.#dropped = false
    if (mean >= 0) this.#recent = mean

    if (left > LEFT_OUTNUMBER * count) {
      // Nearly all clients gone on work slower than the target: by Little's
      // law, as for samples, the knee is at most limit x target / latency,
      // and their latency is at least leftMean. A measure of the baseline
      // under way is given up: its windows would have no sample to end it,
      // and the limit it would return to is too high.
      this.#resume = -1
      if (peak * 2 < this.limit) return
      this.#cuts++
      this.#set(this.#estimate * Math.max(LEFT_MAX_DECREASE, this.#target() / leftMean), now)
      return
    }

    if (this.#resume >= 0) {
      if (mean < 0) return
      // A window of a baseline measure. While halving the limit still lowers
      // the latency, the work still queued: halve again. When it no longer
      // does, the latency is what the work takes unqueued now.
      if (mean < this.#measured * STILL_FALLING && this.limit > this.#min) {
        this.#measured = mean
        this.#set(this.#estimate / 2, now)
        return
      }
      this.#baseline = mean
      this.#baselineAt = now
      this.#cuts = 0
      this.#set(this.#resume, now)
      this.#resume = -1
      return
    }

    if (dropped) {
      this.#set(this.#estimate * DROP_DECREASE, now)
      return
    }
    // Not dropped, and at least as many samples as clients gone: at least
    // half of WINDOW_SAMPLES samples, so mean >= 0.
    if (this.#baseline < 0 || (!this.#confirmed && mean <= this.#baseline)) {
      this.#baseline = mean
      this.#baselineAt = now
    } else if (mean <= this.#baseline) {
      this.#baseline += (mean - this.#baseline) * BASELINE_DOWN
      this.#baselineAt = now
    } else if (mean <= this.#baseline * CONFIRM + SLACK_MS) {
      this.#confirmed = true
      this.#baselineAt = now
    }

    const estimate = this.#estimate
    const target = this.#target()
    const gradient = Math.min(MAX_INCREASE, Math.max(MAX_DECREASE, target / mean))
    if (peak * 2 < this.limit) return
    if (gradient < 1) {
      this.#cuts++
      this.#set(estimate * gradient, now)
    } else {
      this.#cuts = 0
      // Far below the knee (no queueing seen), at full speed; near it, with
      // the latency already rising, by half as much (in log terms).
      const growth = mean <= this.#baseline * CONFIRM ? gradient : Math.sqrt(gradient)
      if (peak >= this.limit) this.#set(estimate * growth, now)
    }

    // Due, the measure waits for a window that did not cut the limit: while
    // the limit follows a fall in capacity, the knee is not where it was.
    if (this.#cuts >= CUTS_BEFORE_REMEASURE || (this.#cuts === 0 && now - this.#baselineAt >= this.#interval)) {
      // Lower the limit below the knee: the requests admitted then do not
      // queue in the work, and their latency is the baseline. At or above
      // the knee, limit * baseline / mean is the knee.
      this.#resume = this.#estimate
      this.#measured = Infinity
      this.#set(Math.min(this.#estimate, REMEASURE_FRACTION * estimate * this.#baseline / mean), now)
    }
  }

  #set (estimate: number, now: number): void {
    this.#estimate = Math.min(this.#max, Math.max(this.#min, estimate))
    const limit = Math.max(1, Math.floor(this.#estimate))
    if (limit !== this.limit) {
      this.limit = limit
      this.#epoch = now
    }
  }

  state (): AdaptiveState {
    return {
      baselineMs: this.#baseline < 0 ? null : this.#baseline,
      recentMs: this.#recent < 0 ? null : this.#recent
    }
  }
}
