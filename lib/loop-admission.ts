import { LoopTurn } from './loop-turn.js'

/** What the controller reads of the loop's turns (LoopTurn; a virtual one in tests). */
export interface TurnClock {
  /** Milliseconds the current turn has run, counting an arrival now. */
  arrive (): number
  /** The clock's reading at the last arrival. */
  readonly at: number
  /** Changes when a turn ends. */
  readonly turns: number
  /** How long the last turn ran. */
  readonly lastLength: number
}

/**
 * How long the loop's turns must all have run at least the target before the
 * pool starts shedding: CoDel's interval. Long enough for a burst of arrivals
 * (a few long turns) to pass unrefused, short enough that a standing backlog
 * is met within two or three turns of it.
 */
export const INTERVAL_MS = 100
/**
 * While not shedding, a turn may run this many times the target before the
 * requests arriving later in it are refused: one poll of the loop reads every
 * request ready, and a turn that serves them all could run for seconds.
 */
export const CEILING = 2
/**
 * While the pool sheds, turns are held near this many milliseconds (or the
 * target, if lower), not near the target. Node accepts one connection per
 * turn of the loop: at turns of 50 ms a server takes in 20 new connections a
 * second, their requests wait in the kernel's accept queue until their
 * clients give up, each client that gives up opens another connection, and
 * the server ends up serving requests whose clients are gone (measured: 5x
 * the capacity of a 2 ms route, 43% goodput with turns held at 50 ms,
 * 81-91% at 10 ms). Shorter turns serve as much work, read requests sooner and
 * take in connections as fast as clients open them.
 */
export const SLICE_MS = 10
/** The share of a turn given to admitted work never falls below this part of the turns aimed at. */
export const MIN_BUDGET = 0.25
/** How much of the gap between the slice and the last turn's length the budget closes each turn. */
export const GAIN = 0.5

/**
 * Event-loop-aware admission for one pool: CoDel on the event loop's turns.
 *
 * The queue that CPU-bound work builds is out of the server's sight (socket
 * buffers, the kernel, clients' connection pools), but its sojourn shows in
 * the length of the loop's turns: a request that becomes readable during a
 * turn waits for that turn to end, and then for the work read before it in
 * the next one. A turn longer than the target is a burst or a backlog; turns
 * that stay longer than the target for a whole interval are a backlog, and
 * only then does the pool shed.
 *
 * Shedding gives each turn a budget: requests arriving once the turn has run
 * that long are refused (a refusal costs a small fraction of serving one), so
 * every turn serves about a budget's worth of work and then comes round. The
 * budget follows the measured turns: a turn that ran past the slice (the
 * refusals themselves, accepting connections, other pools, a garbage
 * collection) shrinks it, a shorter one gives it back, up to the slice. So
 * the admission rate is whatever keeps the loop's turns near the slice, under
 * the target (see SLICE_MS for why not at it). The
 * pool stops shedding once a turn ends below the target an interval after its
 * last refusal: the arrivals fit again.
 *
 * Per arrival: one clock read and a few comparisons, no allocation, no timer.
 */
export class LoopAdmission {
  readonly target: number
  /** The length of turn aimed at while shedding: min(target, SLICE_MS). */
  readonly slice: number
  readonly #turn: TurnClock
  /** The last turn judged (LoopTurn.turns). */
  #seen = -1
  /** When turns above the target become a backlog (CoDel's first_above_time); 0: the last turn was below it. */
  #aboveUntil = 0
  /** True while shedding. */
  shedding = false
  /** Milliseconds of a turn that admit work while shedding. */
  budget: number
  #lastRefusal = -Infinity

  constructor (target: number, turn: TurnClock = new LoopTurn()) {
    this.target = target
    this.slice = Math.min(target, SLICE_MS)
    this.budget = this.slice
    this.#turn = turn
  }

  /**
   * Whether a request arriving now is refused; `factor` scales the target
   * for its priority class (sheddable requests are refused first).
   */
  refuse (factor: number): boolean {
    const turn = this.#turn
    const ran = turn.arrive()
    const now = turn.at
    if (turn.turns !== this.#seen) this.#judge(turn.lastLength, now)
    if (ran <= (this.shedding ? this.budget : this.target * CEILING) * factor) return false
    this.#lastRefusal = now
    return true
  }

  /** Takes the length of the turn that just ended into account. */
  #judge (length: number, now: number): void {
    this.#seen = this.#turn.turns
    const target = this.target
    if (length < target) {
      this.#aboveUntil = 0
      if (this.shedding && now - this.#lastRefusal >= INTERVAL_MS) {
        this.shedding = false
        this.budget = this.slice
        return
      }
    } else if (this.#aboveUntil === 0) {
      this.#aboveUntil = now + INTERVAL_MS
    } else if (now >= this.#aboveUntil && !this.shedding) {
      this.shedding = true
      this.budget = this.slice
    }
    if (this.shedding) {
      const slice = this.slice
      const budget = this.budget + GAIN * (slice - length)
      this.budget = Math.min(slice, Math.max(slice * MIN_BUDGET, budget))
    }
  }
}
