import type { ServerResponse } from 'node:http'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Limiter, RejectReason, Waiter } from './limiter.js'
import type { Rejecter } from './rejection.js'

export const kTicket = Symbol('fastify-concurrency-limit.ticket')

const QUEUED = 0
const ADMITTED = 1
const RELEASED = 2

type Done = (err?: Error | null, payload?: unknown) => void
type TrackedResponse = ServerResponse & { [kTicket]?: Ticket }

/**
 * One request's claim on a pool, from the hook that asks for a slot to the
 * release of that slot. The slot is held until both the response has closed
 * (sent, aborted, hijacked and ended: the raw response's 'close' is the one
 * signal Node gives in every case) and the route handler has settled: a
 * handler that outlives its client is still work in flight. The state moves
 * only forward, so the slot is given back exactly once.
 */
export class Ticket implements Waiter {
  prev: Waiter | null = null
  next: Waiter | null = null
  enqueuedAt = 0
  deadline = 0

  state = RELEASED
  responseClosed = false
  handlerPending = false

  readonly limiter: Limiter
  readonly rejecter: Rejecter
  readonly request: FastifyRequest
  readonly reply: FastifyReply
  readonly done: Done
  /** The body stream, when the slot is asked for in preParsing. */
  readonly payload: unknown

  constructor (limiter: Limiter, rejecter: Rejecter, request: FastifyRequest, reply: FastifyReply, done: Done, payload: unknown) {
    this.limiter = limiter
    this.rejecter = rejecter
    this.request = request
    this.reply = reply
    this.done = done
    this.payload = payload
  }

  /**
   * Takes a slot, or a place in the queue. The caller has checked with
   * `limiter.refuse()` that one of them is free.
   */
  start (): void {
    const res: TrackedResponse = this.reply.raw
    // The client left while an earlier hook ran: there is no one to serve.
    if (res.closed) return
    res[kTicket] = this
    res.on('close', onResponseClose)
    const limiter = this.limiter
    if (limiter.tryAcquire()) {
      this.state = ADMITTED
      this.continue()
      return
    }
    limiter.enqueue(this)
    this.state = QUEUED
  }

  admit (): boolean {
    // 'close' is emitted a tick after the socket is destroyed: a waiter can
    // reach the head of the queue in between.
    if (this.request.raw.socket.destroyed) {
      this.state = RELEASED
      return false
    }
    this.state = ADMITTED
    this.continue()
    return true
  }

  reject (reason: RejectReason): void {
    this.state = RELEASED
    this.rejecter.reject(this.limiter, this.request, this.reply, reason)
  }

  handlerStarted (result: PromiseLike<unknown>): void {
    this.handlerPending = true
    const settled = (): void => {
      this.handlerPending = false
      if (this.responseClosed) this.release()
    }
    result.then(settled, settled)
  }

  responseClose (): void {
    this.responseClosed = true
    if (this.state === QUEUED) {
      this.state = RELEASED
      this.limiter.abandon(this)
    } else if (!this.handlerPending) {
      this.release()
    }
  }

  release (): void {
    if (this.state !== ADMITTED) return
    this.state = RELEASED
    this.limiter.release()
  }

  continue (): void {
    if (this.payload === undefined) this.done()
    else this.done(null, this.payload)
  }
}

function onResponseClose (this: TrackedResponse): void {
  (this[kTicket] as Ticket).responseClose()
}

/** The ticket of a request, or undefined if its route is not limited or it never asked. */
export function ticketOf (reply: FastifyReply): Ticket | undefined {
  return (reply.raw as TrackedResponse)[kTicket]
}
