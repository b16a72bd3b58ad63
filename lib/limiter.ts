import { performance } from 'node:perf_hooks'
import type { AdaptiveState, Limit } from './limits/limit.js'
import { FixedLimit } from './limits/fixed.js'
import { GradientLimit } from './limits/gradient.js'
import { LoopAdmission } from './loop-admission.js'
import type { LoopTurn } from './loop-turn.js'
import type { StoreSettings } from './store/options.js'
import type { StoreStats } from './store/redis.js'

export type RejectReason = 'queueFull' | 'queueTimeout' | 'closing' | 'overloaded' | 'storeUnavailable'

/** Priority classes, most important first: an index into per-class state. */
export const CRITICAL = 0
export const NORMAL = 1
export const SHEDDABLE = 2
export type Level = typeof CRITICAL | typeof NORMAL | typeof SHEDDABLE
export const LEVELS = ['critical', 'normal', 'sheddable'] as const
export type PriorityName = typeof LEVELS[number]
/**
 * The event-loop bound of each class, as a multiple of the pool's: under a
 * growing turn, sheddable requests are refused first, critical ones last.
 */
const LOOP_DELAY_FACTOR = [2, 1, 0.5]

/**
 * One request waiting for a slot. The limiter links waiters into its queue
 * through `prev`/`next` so that a waiter whose client left is unlinked in O(1)
 * at once, instead of lingering until it reaches the head.
 */
export interface Waiter {
  prev: Waiter | null
  next: Waiter | null
  enqueuedAt: number
  deadline: number
  /** Its priority class. */
  readonly level: Level
  /** The slot is now this waiter's. Returns false if the waiter is already gone. */
  admit (): boolean
  /** The waiter leaves the queue without a slot. */
  reject (reason: RejectReason): void
}

/**
 * Where a pool whose limit is shared beyond this process gets its permits
 * (lib/store/). Such a pool admits nobody by itself: every request waits in
 * the local queue, and the source hands the permits it obtains to the queue's
 * head through `grant()`.
 */
export interface PermitSource {
  /** A waiter joined the queue, or the last one left it without a permit. */
  wake (): void
  /** A permit of the pool came back (`inFlight` is already one lower). */
  released (): void
  /** Queued waiters that the source may admit at once, beyond which `maxQueue` counts. */
  headroom (): number
  /**
   * The pool is closing: its waiters are gone, its permits out stay valid.
   * Settles when what the source owes others (a turn given up) is done.
   */
  close (): Promise<void> | void
  stats (): StoreStats
}

/** The settings of an adaptive limit, filled in (see options.ts). */
export interface AdaptiveSettings {
  minConcurrency: number
  initialConcurrency: number
  tolerance: number
  baselineInterval: number
}

export interface LimiterSettings {
  /** The limit; with `adaptive`, the ceiling of the limit. */
  maxConcurrency: number
  /** null: as many as the limit in force (adaptive pools without a maxQueue of their own). */
  maxQueue: number | null
  queueTimeout: number
  /** Most milliseconds of a busy event-loop turn a request may arrive in; 0 or unset: no bound. */
  maxEventLoopDelay?: number
  /** null or unset: the limit is maxConcurrency. */
  adaptive?: AdaptiveSettings | null
  /** null or unset: the limit is this process's own. */
  store?: StoreSettings | null
}

/** How a permit ended, as the caller of `release` saw it. */
export const SUCCESS = 0
/** Says nothing of the work's latency (an error, an answer its client abandoned, a hijacked reply): not a sample. */
export const IGNORE = 1
/** The work behind the pool is overloaded (Netflix's `onDropped`; no caller reports it yet). */
export const DROP = 2
/** The client left before its answer: the limit judges (see `Limit.onClientLeft`). */
export const LEFT = 3
export type Outcome = typeof SUCCESS | typeof IGNORE | typeof DROP | typeof LEFT

export interface LimiterStats {
  name: string
  maxConcurrency: number
  /** The queue's bound now (with an adaptive limit and no maxQueue set, the limit). */
  maxQueue: number
  queueTimeout: number
  /** Requests admitted at once now: maxConcurrency, or the adaptive limit in force. */
  limit: number
  /** The adaptive limit's measures; null for a fixed limit. */
  adaptive: AdaptiveState | null
  inFlight: number
  queued: number
  peakInFlight: number
  peakQueued: number
  admitted: number
  completed: number
  /** Refusals by reason; `storeUnavailable`: a shared pool's store failed (onStoreError 'refuse'). */
  rejected: { queueFull: number, queueTimeout: number, closing: number, overloaded: number, storeUnavailable: number }
  /** Admitted and refused requests (every reason) of each priority class. */
  priority: Record<PriorityName, { admitted: number, rejected: number }>
  abandoned: number
  /** Refused requests now waiting out `rejectDelay` before they are answered. */
  heldRejections: number
  queueWait: { count: number, meanMs: number, maxMs: number }
  /** The shared store's state, for a pool with a `store`; else null. */
  store: StoreStats | null
}

// Completions are counted in windows of at least this long: long enough to
// hold several completions of a busy pool, short enough to follow a change.
const RATE_WINDOW_MS = 250
// Completions spread over longer than this describe another load, not today's.
const RATE_MAX_AGE_MS = 10_000
const RETRY_AFTER_MAX_S = 60

/**
 * Admission control for one pool: at most `limit` permits out at once, then
 * a FIFO queue of at most `maxQueue` waiters, each of which waits at most
 * `queueTimeout` ms. The limit is `maxConcurrency`, or what an adaptive
 * limit (lib/limits/) makes of the latency of the permits it let out: those
 * are timed from admission to release only then. Framework-free: the Fastify
 * adapter owns what a permit means for a request, and tells its outcome.
 *
 * Invariant: a waiter is queued only while every slot is taken, and a freed
 * slot goes to the queue's head before any new arrival, so `queued > 0`
 * implies `inFlight >= limit` (above it only after the limit came down).
 */
export class Limiter {
  readonly name: string
  readonly maxConcurrency: number
  /** The queue's bound: fixed, or the limit in force when it follows the limit. */
  maxQueue: number
  readonly queueTimeout: number
  /** Permits out at once now. */
  limit: number
  /** True if permits are timed: the caller passes admission times to `release`. */
  readonly adaptive: boolean
  /** The settings the pool was made with. */
  readonly settings: LimiterSettings
  readonly #limit: Limit
  readonly #queueFollowsLimit: boolean
  /** Event-loop-aware admission; null: no bound. */
  readonly #loop: LoopAdmission | null
  /** The pool has a `maxEventLoopDelay`: its work is taken to hold the event loop. */
  readonly watchesLoop: boolean
  readonly #source: PermitSource | null

  inFlight = 0
  queued = 0
  closing = false
  /** Refusals held back by a reject delay (kept here to show in stats). */
  heldRejections = 0
  /** Told the milliseconds each waiter admitted from the queue waited (metrics). */
  onWait: ((ms: number) => void) | null = null

  // One FIFO queue per priority class; a freed slot goes to the head of the
  // most important class that has one.
  readonly #heads: Array<Waiter | null> = [null, null, null]
  readonly #tails: Array<Waiter | null> = [null, null, null]
  readonly #queuedBy = [0, 0, 0]
  readonly #admittedBy = [0, 0, 0]
  readonly #rejectedBy = [0, 0, 0]
  #timer: NodeJS.Timeout | null = null

  #peakInFlight = 0
  #peakQueued = 0
  #admitted = 0
  #completed = 0
  #rejectedQueueFull = 0
  #rejectedQueueTimeout = 0
  #rejectedClosing = 0
  #rejectedOverloaded = 0
  #rejectedStoreUnavailable = 0
  #abandoned = 0
  #waitCount = 0
  #waitTotal = 0
  #waitMax = 0

  // Drain rate: completions per second over the last full window, measured
  // as completions happen, so that the first refusal of an overload already
  // knows how fast the pool was draining just before it.
  #windowStart: number
  #windowCompleted = 0
  #windowRate = 0

  /** Pools of one server share `turn`: there is one event loop. */
  constructor (name: string, settings: LimiterSettings, turn?: LoopTurn, source: ((limiter: Limiter) => PermitSource) | null = null) {
    this.name = name
    const maxLoopDelay = settings.maxEventLoopDelay ?? 0
    this.#loop = maxLoopDelay > 0 ? new LoopAdmission(maxLoopDelay, turn) : null
    this.watchesLoop = this.#loop !== null
    this.settings = settings
    this.maxConcurrency = settings.maxConcurrency
    this.queueTimeout = settings.queueTimeout
    this.#limit = settings.adaptive == null
      ? new FixedLimit(settings.maxConcurrency)
      : new GradientLimit({ ...settings.adaptive, maxConcurrency: settings.maxConcurrency })
    this.adaptive = this.#limit.adaptive
    this.limit = this.#limit.limit
    this.#queueFollowsLimit = settings.maxQueue === null
    this.maxQueue = settings.maxQueue ?? this.limit
    this.#windowStart = performance.now()
    this.#source = source === null ? null : source(this)
  }

  /** Takes a slot if one is free. The caller must `release()` it exactly once. */
  tryAcquire (level: Level = NORMAL): boolean {
    if (this.inFlight >= this.limit || this.queued > 0 || this.#source !== null) return false
    const inFlight = ++this.inFlight
    this.#admitted++
    this.#admittedBy[level]++
    if (inFlight > this.#peakInFlight) this.#peakInFlight = inFlight
    return true
  }

  /**
   * Why a request arriving now would be refused (and counts it), or null if
   * it would get a slot or a place in the queue. Lets a caller refuse before
   * it allocates anything for the request. Call it once per arrival.
   */
  refuse (level: Level = NORMAL): RejectReason | null {
    // Work arriving in a turn that has already run past what the event loop
    // can take would only lengthen it: every request, admitted or waiting in
    // a socket buffer, waits for the turn to end. Refusing costs a small
    // fraction of serving (lib/loop-admission.ts).
    if (this.#loop !== null && !this.closing && this.#loop.refuse(LOOP_DELAY_FACTOR[level])) {
      this.#rejectedOverloaded++
      this.#rejectedBy[level]++
      return 'overloaded'
    }
    return this.#full(level)
  }

  /**
   * Why a request would find neither a slot nor a place in the queue now
   * (counted), or null. A full queue still has a place for a request while it
   * holds one of a less important class: that one gives it up.
   */
  #full (level: Level): RejectReason | null {
    if (this.inFlight < this.limit && this.queued === 0) return null
    if (this.closing) {
      this.#rejectedClosing++
      this.#rejectedBy[level]++
      return 'closing'
    }
    if (this.#queueFull() && this.#lowestBelow(level) === -1) {
      this.#rejectedQueueFull++
      this.#rejectedBy[level]++
      return 'queueFull'
    }
    return null
  }

  /** No place left in the queue (beyond the waiters a shared store may admit at once). */
  #queueFull (): boolean {
    return this.queued - (this.#source === null ? 0 : this.#source.headroom()) >= this.maxQueue
  }

  /** The least important class below `level` that has waiters, or -1. */
  #lowestBelow (level: Level): number {
    for (let c = SHEDDABLE; c > level; c--) if (this.#queuedBy[c] > 0) return c
    return -1
  }

  /**
   * Queues a waiter that `tryAcquire()` turned away. Returns null when queued,
   * else the reason it was refused (it is counted as rejected).
   */
  enqueue (waiter: Waiter): RejectReason | null {
    const level = waiter.level
    const reason = this.#full(level)
    if (reason !== null) return reason
    const lowest = this.#queueFull() ? this.#lowestBelow(level) : -1
    if (lowest !== -1) {
      // The newest waiter of the least important class gives up its place:
      // it has waited least, and its class is refused first.
      const evicted = this.#tails[lowest] as Waiter
      this.#unlink(evicted)
      this.#rejectedQueueFull++
      this.#rejectedBy[lowest]++
      evicted.reject('queueFull')
    }
    const now = performance.now()
    waiter.enqueuedAt = now
    waiter.deadline = now + this.queueTimeout
    waiter.next = null
    const tail = this.#tails[level]
    waiter.prev = tail
    if (tail === null) this.#heads[level] = waiter
    else tail.next = waiter
    this.#tails[level] = waiter
    this.#queuedBy[level]++
    const queued = ++this.queued
    if (queued > this.#peakQueued) this.#peakQueued = queued
    // One timeout for all: the newest waiter has the latest deadline, so one
    // timer per pool, armed for the nearest one, serves every waiter.
    if (this.#timer === null) this.#arm(waiter.deadline, now)
    this.#source?.wake()
    return null
  }

  /** The waiter a freed slot goes to: the oldest of the most important class waiting. */
  #first (): Waiter | null {
    return this.#heads[CRITICAL] ?? this.#heads[NORMAL] ?? this.#heads[SHEDDABLE]
  }

  /** Counts a client that left before its request was decided on (see first-request.ts). */
  countAbandoned (): void {
    this.#abandoned++
  }

  /** Takes a waiter whose client left out of the queue. */
  abandon (waiter: Waiter): void {
    if (!this.#unlink(waiter)) return
    this.#abandoned++
    if (this.queued === 0) this.#source?.wake()
  }

  /**
   * Gives back a permit. With waiters, the slot passes to the oldest live one
   * on the next tick: a release runs inside the response's 'close' event, and
   * the other listeners of that event (the application's clean-up, Fastify's
   * stream teardown) must run before new work starts in its place.
   *
   * With an adaptive limit, `admittedAt` (performance.now() when the permit
   * was taken) and the outcome make a sample of the work's latency.
   */
  release (admittedAt = 0, outcome: Outcome = SUCCESS): void {
    this.#completed++
    this.#countCompletion()
    if (this.adaptive && outcome !== IGNORE) this.#sample(admittedAt, outcome)
    if (this.#source !== null) {
      this.inFlight--
      this.#source.released()
      return
    }
    if (this.queued === 0) {
      this.inFlight--
      return
    }
    process.nextTick(this.#handOff)
  }

  #sample (admittedAt: number, outcome: Outcome): void {
    const now = performance.now()
    const limit = this.#limit
    if (outcome === LEFT) limit.onClientLeft(admittedAt, now - admittedAt, this.inFlight)
    else limit.onSample(admittedAt, now - admittedAt, this.inFlight, outcome === DROP)
    this.limit = limit.limit
    if (this.#queueFollowsLimit) this.maxQueue = this.limit
  }

  #handOff = (): void => {
    this.inFlight--
    let waiter = this.#first()
    // One slot came back; more if the limit went up, none if it came down.
    while (waiter !== null && this.inFlight < this.limit) {
      this.#admitFromQueue(waiter)
      waiter = this.#first()
    }
  }

  /** Gives a slot to a waiter taken off the queue; false if its client had left. */
  #admitFromQueue (waiter: Waiter): boolean {
    this.#unlink(waiter)
    this.inFlight++
    if (!waiter.admit()) {
      this.inFlight--
      this.#abandoned++
      return false
    }
    this.#admitted++
    this.#admittedBy[waiter.level]++
    const waited = performance.now() - waiter.enqueuedAt
    this.#waitCount++
    this.#waitTotal += waited
    if (waited > this.#waitMax) this.#waitMax = waited
    if (this.onWait !== null) this.onWait(waited)
    if (this.inFlight > this.#peakInFlight) this.#peakInFlight = this.inFlight
    return true
  }

  /**
   * With a shared limit: gives a permit that the source obtained to the
   * oldest live waiter. False if no waiter is left to take it.
   */
  grant (): boolean {
    let waiter = this.#first()
    while (waiter !== null) {
      if (this.#admitFromQueue(waiter)) return true
      waiter = this.#first()
    }
    return false
  }

  /**
   * With a shared limit: refuses the newest waiters beyond `maxQueue` once
   * the source found no permit for them.
   */
  trimQueue (): void {
    while (this.queued > this.maxQueue) {
      // The newest of the least important class waiting goes first.
      const waiter = (this.#tails[SHEDDABLE] ?? this.#tails[NORMAL] ?? this.#tails[CRITICAL]) as Waiter
      this.#unlink(waiter)
      this.#rejectedQueueFull++
      this.#rejectedBy[waiter.level]++
      waiter.reject('queueFull')
    }
  }

  /** With a shared limit whose store failed: refuses every waiter. */
  refuseWaiters (): void {
    let waiter = this.#first()
    while (waiter !== null) {
      this.#unlink(waiter)
      this.#rejectedStoreUnavailable++
      this.#rejectedBy[waiter.level]++
      waiter.reject('storeUnavailable')
      waiter = this.#first()
    }
  }

  /**
   * Refuses every waiter and every future one; permits already out stay
   * valid. Settles when the permit source has told the others it is gone.
   */
  close (): Promise<void> | void {
    this.closing = true
    const closed = this.#source?.close()
    this.#disarm()
    let waiter = this.#first()
    while (waiter !== null) {
      this.#unlink(waiter)
      this.#rejectedClosing++
      this.#rejectedBy[waiter.level]++
      waiter.reject('closing')
      waiter = this.#first()
    }
    return closed
  }

  /**
   * Seconds a client should wait before retrying: the time the pool needs to
   * drain its queue at the completion rate seen lately, at least 1. At most
   * `queueTimeout`: by then every waiter now queued has been answered, served
   * or not, so the queue has turned over whatever the rate.
   */
  retryAfter (): number {
    const rate = this.#drainRate()
    // No completions measured: the pool may be stalled; a waiter would be
    // answered within queueTimeout, so that is the soonest retry worth making.
    const ms = rate > 0
      ? Math.min(this.queueTimeout, (this.queued + 1) * 1000 / rate)
      : this.queueTimeout
    return Math.min(RETRY_AFTER_MAX_S, Math.max(1, Math.ceil(ms / 1000)))
  }

  /**
   * Completions per second in the last full window. A window that no
   * completion has closed although it is full is the latest measure: its rate
   * falls for as long as the pool stays idle or stalled, to 0 (unknown).
   */
  #drainRate (): number {
    const elapsed = performance.now() - this.#windowStart
    if (elapsed < RATE_WINDOW_MS) return this.#windowRate
    return elapsed > RATE_MAX_AGE_MS ? 0 : this.#windowCompleted * 1000 / elapsed
  }

  #countCompletion (): void {
    const now = performance.now()
    const completed = ++this.#windowCompleted
    const elapsed = now - this.#windowStart
    if (elapsed < RATE_WINDOW_MS) return
    this.#windowRate = elapsed > RATE_MAX_AGE_MS ? 0 : completed * 1000 / elapsed
    this.#windowStart = now
    this.#windowCompleted = 0
  }

  stats (): LimiterStats {
    return {
      name: this.name,
      maxConcurrency: this.maxConcurrency,
      maxQueue: this.maxQueue,
      queueTimeout: this.queueTimeout,
      limit: this.limit,
      adaptive: this.#limit.state(),
      inFlight: this.inFlight,
      queued: this.queued,
      peakInFlight: this.#peakInFlight,
      peakQueued: this.#peakQueued,
      admitted: this.#admitted,
      completed: this.#completed,
      rejected: {
        queueFull: this.#rejectedQueueFull,
        queueTimeout: this.#rejectedQueueTimeout,
        closing: this.#rejectedClosing,
        overloaded: this.#rejectedOverloaded,
        storeUnavailable: this.#rejectedStoreUnavailable
      },
      priority: {
        critical: { admitted: this.#admittedBy[CRITICAL], rejected: this.#rejectedBy[CRITICAL] },
        normal: { admitted: this.#admittedBy[NORMAL], rejected: this.#rejectedBy[NORMAL] },
        sheddable: { admitted: this.#admittedBy[SHEDDABLE], rejected: this.#rejectedBy[SHEDDABLE] }
      },
      abandoned: this.#abandoned,
      heldRejections: this.heldRejections,
      queueWait: {
        count: this.#waitCount,
        meanMs: this.#waitCount === 0 ? 0 : this.#waitTotal / this.#waitCount,
        maxMs: this.#waitMax
      },
      store: this.#source === null ? null : this.#source.stats()
    }
  }

  #unlink (waiter: Waiter): boolean {
    const { prev, next, level } = waiter
    if (prev === null && this.#heads[level] !== waiter) return false
    if (prev === null) this.#heads[level] = next
    else prev.next = next
    if (next === null) this.#tails[level] = prev
    else next.prev = prev
    waiter.prev = null
    waiter.next = null
    this.#queuedBy[level]--
    this.queued--
    return true
  }

  #arm (deadline: number, now: number): void {
    this.#timer = setTimeout(this.#expire, Math.max(0, Math.ceil(deadline - now)))
    this.#timer.unref()
  }

  #disarm (): void {
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = null
  }

  #expire = (): void => {
    this.#timer = null
    const now = performance.now()
    let next = Infinity
    for (const level of [CRITICAL, NORMAL, SHEDDABLE] as const) {
      let waiter = this.#heads[level]
      while (waiter !== null && waiter.deadline <= now) {
        this.#unlink(waiter)
        this.#rejectedQueueTimeout++
        this.#rejectedBy[level]++
        waiter.reject('queueTimeout')
        waiter = this.#heads[level]
      }
      if (waiter !== null && waiter.deadline < next) next = waiter.deadline
    }
    if (next !== Infinity) this.#arm(next, now)
    else this.#source?.wake()
  }
}
