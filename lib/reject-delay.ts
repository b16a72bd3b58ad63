import { performance } from 'node:perf_hooks'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Limiter, RejectReason } from './limiter.js'
import { LoopLoad } from './loop-load.js'

const kRefusals = Symbol('fastify-concurrency-limit.refusals')

/**
 * The first held refusal on a connection waits this long (at most
 * `rejectDelay`); each next one twice as long.
 */
export const FIRST_DELAY = 1000
/** A refusal this long after the previous answer on its connection starts afresh. */
export const STREAK_WINDOW = 1000

/**
 * A refusal on a connection refused this few samples of the loop before (a
 * second, or more when the loop fires its timer late) is a retry. The brake
 * engages only once retries pour in (see `LoopLoad.refused`), and engaged,
 * holds a retry at once: a storm's connections are all held on their next
 * refusal, however many they are.
 */
export const RECENT_SAMPLES = 20

interface Streak {
  /** When the last refusal on this connection was (or will be) answered. */
  answeredAt: number
  delay: number
}

/**
 * What a connection carries: while the brake is disengaged, the sample of
 * the loop in which it was last refused; engaged, its streak of refusals.
 */
type Refusals = number | Streak

type Answer = (limiter: Limiter, request: FastifyRequest, reply: FastifyReply, reason: RejectReason) => void

/**
 * Slows clients that retry at once on the HTTP/1 connection they were
 * refused on, while refusals saturate the event loop (`LoopLoad`).
 * Otherwise every refusal is answered at once: holding back the refusals of
 * a client that sends on its own schedule would not lighten the loop, only
 * turn its 503s into timeouts.
 *
 * Engaged, a refusal on a connection refused within the last second is held
 * back: a second (or `maxDelay` if shorter), then, once the brake has held
 * for a first hold of its own, twice as long each time, up to `maxDelay`,
 * each hold up to a quarter shorter at random. The first
 * refusal on a connection is answered at once, so a client that waits for
 * Retry-After never waits longer. A storm then costs the server one refusal
 * per connection per hold, instead of flooding the event loop that admitted
 * requests share. Bounded: past `max` held refusals, refusals are answered
 * at once.
 */
export class RejectDelay {
  readonly maxDelay: number
  readonly max: number
  size = 0
  readonly #answer: Answer
  readonly #held = new Map<NodeJS.Timeout, () => void>()
  readonly load: LoopLoad

  constructor (maxDelay: number, max: number, answer: Answer, load = new LoopLoad()) {
    this.maxDelay = maxDelay
    this.max = max
    this.#answer = answer
    this.load = load
    // Holding did not slow the refusals or lighten the loop: they belong
    // to clients that send on their own schedule, not to a storm. Answer
    // them now.
    load.onMisjudged = () => { this.#answerHeld() }
    load.held = () => this.size
  }

  /** Holds the refusal back, to answer it for `reason` later; false if it must be answered now. */
  hold (limiter: Limiter, request: FastifyRequest, reply: FastifyReply, reason: RejectReason): boolean {
    // An HTTP/2 request's socket stands for its whole session, whose streams
    // run side by side: a streak there would hold back first tries. A stream
    // carries one request, so there is no connection of a retry to slow.
    if (request.raw.httpVersionMajor === 2) return false
    const load = this.load
    const socket = request.raw.socket as unknown as { [kRefusals]?: Refusals }
    let streak = socket[kRefusals]
    const retry = streak !== undefined && (typeof streak === 'object'
      ? performance.now() - streak.answeredAt <= STREAK_WINDOW
      : load.samples - streak <= RECENT_SAMPLES)
    load.refused(retry)
    if (!load.engaged) {
      // Disengaged, a refusal costs a count and a small integer on its
      // connection: no allocation, and no clock but on a connection held
      // in an earlier engagement.
      socket[kRefusals] = load.samples
      return false
    }
    const now = performance.now()
    if (typeof streak !== 'object') {
      // Refused moments before the brake engaged: this is already a retry.
      streak = { answeredAt: now, delay: 0 }
      socket[kRefusals] = streak
      if (!retry) return false
    } else if (now - streak.answeredAt > STREAK_WINDOW) {
      streak.answeredAt = now
      streak.delay = 0
      return false
    }
    // Past the bound, or for a client that already left: answered now.
    if (this.size >= this.max || reply.raw.closed) {
      streak.answeredAt = now
      return false
    }
    // Past the first delay only once the storm is confirmed (see `LoopLoad.escalates`).
    const cap = load.escalates ? this.maxDelay : Math.min(this.maxDelay, FIRST_DELAY)
    const delay = Math.min(cap, streak.delay === 0 ? FIRST_DELAY : streak.delay * 2)
    streak.delay = delay
    // Up to a quarter shorter, at random: connections held at the same
    // moment must not all come back at the same moment, a burst that
    // admitted requests would wait behind.
    const hold = delay - Math.floor(Math.random() * delay / 4)
    streak.answeredAt = now + hold
    this.size++
    limiter.heldRejections++
    const raw = reply.raw
    // Node keeps timers of one duration in one list, and the lists in a
    // heap: a few hundred distinct holds, a timer per held refusal costs
    // O(1) to add to its list, O(log) to add a list.
    const free = (): void => {
      this.#held.delete(timer)
      this.size--
      limiter.heldRejections--
    }
    const release = (): void => {
      raw.removeListener('close', left)
      free()
      this.#answer(limiter, request, reply, reason)
    }
    // A client that leaves while held frees its place now. A response
    // pipelined behind another gets no 'close' from Node: it waits out its
    // hold, and its answer goes nowhere.
    const left = (): void => {
      clearTimeout(timer)
      free()
    }
    const timer = setTimeout(release, hold)
    this.#held.set(timer, release)
    raw.once('close', left)
    return true
  }

  /** Answers every held refusal now and stops sampling the loop (the server is closing). */
  drain (): void {
    this.load.stop()
    this.#answerHeld()
  }

  #answerHeld (): void {
    for (const [timer, release] of this.#held) {
      clearTimeout(timer)
      release()
    }
  }
}
