import { performance } from 'node:perf_hooks'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Limiter } from './limiter.js'

const kRefusals = Symbol('fastify-concurrency-limit.refusals')

/** The first held refusal on a connection waits this long; each next one twice as long. */
export const FIRST_DELAY = 250
/** A refusal this long after the previous answer on its connection starts afresh. */
export const STREAK_WINDOW = 1000

interface Streak {
  /** When the last refusal on this connection was (or will be) answered. */
  answeredAt: number
  delay: number
}

type Answer = (limiter: Limiter, request: FastifyRequest, reply: FastifyReply) => void

/**
 * Slows clients that retry at once on the HTTP/1 connection they were refused on.
 * The first refusal on a connection is answered at once (a client that waits
 * for Retry-After never sees a delay); each further one within a second of
 * the last is held back, 250 ms, then twice as long each time, up to
 * `maxDelay`. A retry storm then costs the server one refusal per connection
 * per `maxDelay`, instead of flooding the event loop that admitted requests
 * share. Bounded: past `max` held refusals, refusals are answered at once.
 */
export class RejectDelay {
  readonly maxDelay: number
  readonly max: number
  size = 0
  readonly #answer: Answer
  readonly #held = new Map<NodeJS.Timeout, () => void>()

  constructor (maxDelay: number, max: number, answer: Answer) {
    this.maxDelay = maxDelay
    this.max = max
    this.#answer = answer
  }

  /** Holds the refusal back; false if it must be answered now. */
  hold (limiter: Limiter, request: FastifyRequest, reply: FastifyReply): boolean {
    // An HTTP/2 request's socket stands for its whole session, whose streams
    // run side by side: a streak there would hold back first tries. A stream
    // carries one request, so there is no connection of a retry to slow.
    if (request.raw.httpVersionMajor === 2) return false
    const socket = request.raw.socket as unknown as { [kRefusals]?: Streak }
    const now = performance.now()
    const streak = socket[kRefusals]
    if (streak === undefined || now - streak.answeredAt > STREAK_WINDOW) {
      if (streak === undefined) socket[kRefusals] = { answeredAt: now, delay: 0 }
      else {
        streak.answeredAt = now
        streak.delay = 0
      }
      return false
    }
    if (this.size >= this.max) {
      streak.answeredAt = now
      return false
    }
    const delay = Math.min(this.maxDelay, streak.delay === 0 ? FIRST_DELAY : streak.delay * 2)
    streak.delay = delay
    streak.answeredAt = now + delay
    this.size++
    limiter.heldRejections++
    // Node keeps timers of one duration in one list: with a handful of
    // distinct delays, a timer per held refusal costs O(1).
    const release = (): void => {
      this.#held.delete(timer)
      this.size--
      limiter.heldRejections--
      // A client that left while held needs no answer.
      if (!reply.raw.closed) this.#answer(limiter, request, reply)
    }
    const timer = setTimeout(release, delay)
    this.#held.set(timer, release)
    return true
  }

  /** Answers every held refusal now. */
  drain (): void {
    for (const [timer, release] of this.#held) {
      clearTimeout(timer)
      release()
    }
  }
}
