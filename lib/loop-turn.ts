import { performance } from 'node:perf_hooks'

/**
 * How long the event loop has been busy without finishing a turn: the delay
 * that every timer, every socket and every request waiting to be read
 * suffers now. It is what CPU-bound handlers make grow, and what the number
 * of requests in flight never shows (a synchronous handler is one request in
 * flight, however many wait behind it in socket buffers).
 *
 * The end of a turn is marked by an immediate, which Node runs in its check
 * phase, once it has run the timers and the I/O callbacks (request arrivals
 * among them) that were ready. The immediate is armed by a request that
 * arrives, and arms itself again as long as requests keep arriving, so that
 * an idle server wakes for nothing: the first request after a quiet spell
 * starts the clock, the next ones read how long ago the loop last came
 * round. While the loop turns freely that is well under a millisecond; when
 * handlers burn CPU it is the time they have taken since.
 */
export class LoopTurn {
  /** When the loop last finished a turn (or the first arrival after a quiet spell). */
  #turnStart = 0
  /** Arrivals since the last turn ended. */
  #arrivals = 0
  #immediate: NodeJS.Immediate | null = null
  readonly #now: () => number
  /** Turns that ended with arrivals, plus quiet spells: a new value means a new turn to judge. */
  turns = 0
  /** How long the last counted turn ran (0 after a quiet spell). */
  lastLength = 0
  /** The clock's reading at the last arrival. */
  at = 0

  constructor (now: () => number = () => performance.now()) {
    this.#now = now
  }

  /** Milliseconds the current turn has run, counting a request that arrives now. */
  arrive (): number {
    const now = this.#now()
    this.at = now
    this.#arrivals++
    if (this.#immediate === null) {
      // After a quiet spell: the loop was free, a turn of no delay.
      this.turns++
      this.lastLength = 0
      this.#turnStart = now
      this.#immediate = setImmediate(this.#turnEnded)
      // An armed immediate must not keep a closing server's process alive.
      this.#immediate.unref()
      return 0
    }
    return now - this.#turnStart
  }

  #turnEnded = (): void => {
    if (this.#arrivals === 0) {
      // A turn without arrivals: the server went quiet; stop marking turns.
      this.#immediate = null
      return
    }
    this.#arrivals = 0
    const now = this.#now()
    this.lastLength = now - this.#turnStart
    this.turns++
    this.#turnStart = now
    this.#immediate = setImmediate(this.#turnEnded)
    this.#immediate.unref()
  }

  /** Stops marking turns (the server is closing). */
  stop (): void {
    if (this.#immediate !== null) clearImmediate(this.#immediate)
    this.#immediate = null
    this.#arrivals = 0
  }
}
