// The decisions of a sweep, free of I/O: when a step counts, when to stop,
// where the knee is, which levels to measure between two steps, and the
// settings that follow from the knee by Little's law.

/** Latency of the successful answers of one step, in milliseconds. */
export interface Latency {
  p50: number
  p99: number
  max: number
}

/** What one level of concurrency measured. */
export interface Step {
  /** Requests kept in flight during the step. */
  concurrency: number
  /** 'sweep' for the doubling levels, 'refine' for the levels measured between two of them. */
  phase: 'sweep' | 'refine'
  /** From the step's start to its last answer, in milliseconds. */
  durationMs: number
  /** Requests sent. */
  sent: number
  /** Answers with an expected status. */
  ok: number
  /** Answers with any other status. */
  otherStatus: number
  /** Requests that got no answer: refused or reset connections, timeouts. */
  errors: number
  /** Every status answered, by code. */
  statuses: Record<string, number>
  /** Every error, by code ('timeout' for the request timeout). */
  errorCodes: Record<string, number>
  /** Successful answers per second: N / the mean time of a request cycle, times the share of successes. */
  throughput: number
  /** Latency of successful answers; null with none. */
  latency: Latency | null
  /** Share of one CPU core the load generator used during the step. */
  toolCpu: number
  /** Request slots that saw no answer at all (the step was shorter than a request). */
  idleSlots: number
  /** The step ended before its time: interrupted, or the request budget ran out. */
  partial: boolean
}

export type UsableStep = Step & { latency: Latency }

/** Share of failed answers (errors and unexpected statuses) past which a step has failed. */
export const FAILURE_SHARE = 0.01
/** A step grows when its throughput is at least this many times the last growing step's. */
export const GROWTH = 1.05
/** Latency has climbed when p50 is at least this many times the last growing step's. */
export const CLIMB = 1.5
/** The knee is the fewest requests in flight reaching this share of the best throughput. */
export const KNEE_SHARE = 0.95
/** The load generator is busy past this share of a core: its own limit may show in the curve. */
export const TOOL_BUSY = 0.9

/** A step where more than FAILURE_SHARE of the requests answered failed. */
export function failed (step: Step): boolean {
  const bad = step.otherStatus + step.errors
  return bad > FAILURE_SHARE * (step.ok + bad)
}

/** A step whose throughput and latency can be compared with others. */
export function usable (step: Step): step is UsableStep {
  return !failed(step) && step.idleSlots === 0 && step.latency !== null
}

export interface Trend {
  /** Why the doubling should stop now, if it should. */
  stop?: 'knee' | 'errors'
  /** The last usable step still grew: the knee is at or above it. */
  growing: boolean
  /** The last usable step that grew by GROWTH over the one before. */
  reference?: UsableStep
}

/**
 * Reads the doubling steps so far. Throughput has stopped growing after two
 * usable steps in a row without GROWTH over the last step that grew; the
 * sweep stops then if latency has climbed (by Little's law it must, unless
 * the load generator itself is the bottleneck, which also ends the sweep).
 * A failed step ends it at once.
 */
export function trend (steps: readonly Step[]): Trend {
  let reference: UsableStep | undefined
  let flat = 0
  for (const step of steps) {
    if (failed(step)) return { stop: 'errors', growing: false, reference }
    if (!usable(step)) continue
    if (reference === undefined || step.throughput >= GROWTH * reference.throughput) {
      reference = step
      flat = 0
      continue
    }
    flat++
    const climbed = step.latency.p50 >= CLIMB * reference.latency.p50
    if (flat >= 2 && (climbed || step.toolCpu >= TOOL_BUSY)) return { stop: 'knee', growing: false, reference }
  }
  return { growing: reference !== undefined && flat === 0, reference }
}

export interface Knee {
  /** The fewest requests in flight that reach KNEE_SHARE of the best throughput. */
  knee: UsableStep
  /** The step of the best throughput. */
  best: UsableStep
  /** The usable step just below the knee, if any. */
  below?: UsableStep
  /** The usable steps above the knee, in order. */
  above: UsableStep[]
}

export function findKnee (steps: readonly Step[]): Knee | undefined {
  const measured = steps.filter(usable).sort((a, b) => a.concurrency - b.concurrency)
  if (measured.length === 0) return undefined
  let best = measured[0]
  for (const step of measured) if (step.throughput > best.throughput) best = step
  const index = measured.findIndex((step) => step.throughput >= KNEE_SHARE * best.throughput)
  return {
    knee: measured[index],
    best,
    below: index > 0 ? measured[index - 1] : undefined,
    above: measured.slice(index + 1)
  }
}

/**
 * The next level to measure between the knee and the usable step below it,
 * by bisection, until they are within an eighth of the lower one (or
 * adjacent). None while throughput is still growing (the knee is not
 * bracketed), nor for a level already measured.
 */
export function nextRefinement (steps: readonly Step[], growing: boolean): number | undefined {
  const found = findKnee(steps)
  if (growing || found?.below === undefined) return undefined
  const lo = found.below.concurrency
  const hi = found.knee.concurrency
  if (hi - lo <= Math.max(1, Math.floor(lo / 8))) return undefined
  const mid = Math.floor((lo + hi) / 2)
  return steps.some((step) => step.concurrency === mid) ? undefined : mid
}

export interface Recommendation {
  maxConcurrency: number
  maxQueue: number
  queueTimeout: number
  /** The knee is the largest level measured and throughput was still growing: the real one is higher. */
  atLeast: boolean
  /** Throughput at the knee, per second: the pool's capacity with maxConcurrency in flight. */
  capacity: number
  /** Little's law at the knee: maxConcurrency / capacity, in milliseconds. */
  serviceTimeMs: number
  p50Ms: number
  p99Ms: number
  /** Wait at the back of a full queue: maxQueue x serviceTime / maxConcurrency, in milliseconds. */
  queueWaitMs: number
  /** p99 at the knee + queueWaitMs, before rounding. */
  queueTimeoutExactMs: number
}

/** The plugin warns about a queueTimeout of 1 to 99 ms (likely seconds meant); never recommend one. */
export const MIN_QUEUE_TIMEOUT = 100
const MAX_TIMER = 2 ** 31 - 1

/** Rounds up to two significant digits, and to at least MIN_QUEUE_TIMEOUT: 137 -> 140, 1234 -> 1300. */
export function roundUpMs (ms: number): number {
  if (ms <= MIN_QUEUE_TIMEOUT) return MIN_QUEUE_TIMEOUT
  const unit = 10 ** (Math.floor(Math.log10(ms)) - 1)
  return Math.min(MAX_TIMER, Math.ceil(ms / unit - 1e-9) * unit)
}

/**
 * Settings from the knee, by Little's law (in flight = throughput x time in
 * the system): maxConcurrency is the knee; its service time S is
 * knee / throughput; a queue of q waits q x S / maxConcurrency, so
 * maxQueue = maxConcurrency waits one service time, or a `maxWaitMs` budget
 * gives maxQueue = maxWaitMs x throughput; queueTimeout is p99 at the knee
 * plus that wait, rounded up.
 */
export function recommend (steps: readonly Step[], options: { growing: boolean, maxWaitMs?: number }): Recommendation | undefined {
  const found = findKnee(steps)
  if (found === undefined) return undefined
  const { knee } = found
  const maxConcurrency = knee.concurrency
  const capacity = knee.throughput
  const serviceTimeMs = (maxConcurrency / capacity) * 1000
  const maxQueue = options.maxWaitMs === undefined
    ? maxConcurrency
    : Math.floor((options.maxWaitMs * capacity) / 1000)
  const queueWaitMs = (maxQueue * serviceTimeMs) / maxConcurrency
  const queueTimeoutExactMs = knee.latency.p99 + queueWaitMs
  return {
    maxConcurrency,
    maxQueue,
    queueTimeout: roundUpMs(queueTimeoutExactMs),
    atLeast: options.growing && found.above.length === 0,
    capacity,
    serviceTimeMs,
    p50Ms: knee.latency.p50,
    p99Ms: knee.latency.p99,
    queueWaitMs,
    queueTimeoutExactMs
  }
}
