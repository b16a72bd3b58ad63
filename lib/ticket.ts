import type { ServerResponse } from 'node:http'
import type { Http2Stream } from 'node:http2'
import type { Socket } from 'node:net'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { performance } from 'node:perf_hooks'
import type { Reporter, RequestConcurrencyLimit } from './diagnostics.js'
import { IGNORE, LEFT, SUCCESS, type Level, type Limiter, type Outcome, type RejectReason, type Waiter } from './limiter.js'
import type { Rejecter } from './rejection.js'

const QUEUED = 0
const ADMITTED = 1
const RELEASED = 2
// Pipelined behind another request of its connection: no slot asked for yet.
const WAITING_TURN = 3

export type Done = (err?: Error | null, payload?: unknown) => void

/**
 * What every request of one limited route shares: its pool, how it is
 * refused, and the key under which its tickets are kept on the raw response.
 * The key belongs to one registration of the plugin, so that a request that
 * passes through two registrations (one at the root, one in a child context)
 * holds a ticket of each, released apart.
 */
export interface Admission {
  readonly limiter: Limiter
  readonly rejecter: Rejecter
  readonly key: symbol
  readonly reporter: Reporter
  /** The 'close' listener of the registration's tickets (see `closeListener`). */
  readonly onClose: (this: object) => void
  /** The 'end' listener of its HTTP/2 streams (see `streamEndListener`). */
  readonly onStreamEnd: (this: Http2Stream) => void
  /** The 'finish' listener of its HTTP/2 streams (see `streamFinishListener`). */
  readonly onStreamFinish: (this: Http2Stream) => void
  /** `request.concurrencyLimit` of a request admitted at once: the same for all. */
  readonly atOnce: RequestConcurrencyLimit
}

/**
 * One 'close' listener for every ticket of a registration: the response (or
 * HTTP/2 stream) it listens on holds its ticket under the registration's
 * key, so no request allocates a closure of its own.
 */
export function closeListener (key: symbol): (this: object) => void {
  return function onClose (this: object): void {
    (this as Record<symbol, Ticket>)[key].responseClose()
  }
}

/**
 * How long a stream that the peer closed with its last write unfinished is
 * left to end on its own before its ticket is ended and the stream
 * destroyed: a margin, as Node has closed the stream and sends nothing more
 * on it (no such write was seen to finish in tests).
 */
export const UNFINISHED_STREAM_MS = 1000

/**
 * The registration's listener for an HTTP/2 stream's 'end': a stream that
 * the peer closed is over even when Node never emits its 'close' (see the
 * class comment of `Ticket`). Its ticket is ended after
 * `UNFINISHED_STREAM_MS` (a second time is a no-op), and the stream, if
 * still not destroyed, is destroyed: otherwise a handler that
 * waits for its response to end (one that returns a streamed `reply`, whose
 * `then` waits for the response's 'close') would hold its slot forever, and
 * the stream and its session would never be freed.
 */
export function streamEndListener (key: symbol): (this: Http2Stream) => void {
  return function onStreamEnd (this: Http2Stream): void {
    if (!this.closed || this.writableFinished) return
    const ticket = (this as unknown as Record<symbol, Ticket>)[key]
    setTimeout(() => {
      ticket.responseClose()
      if (!this.destroyed) this.destroy()
    }, UNFINISHED_STREAM_MS).unref()
  }
}

/**
 * The registration's listener for an HTTP/2 stream's 'finish': its response
 * has been sent in full. Node destroys the stream, and its 'close' ends the
 * request, once the client's side has ended and been read; but a body that
 * the handler read only in part is never drained (HTTP/1 dumps it), and
 * then neither 'close' nor 'end' comes while the client keeps its session.
 * So a stream still not destroyed `UNFINISHED_STREAM_MS` after its response
 * was sent ends its ticket, and is destroyed if Node has closed it (it
 * sends and receives nothing more on it): a handler that returned a
 * streamed reply waits for the response's 'close', which Node emits only
 * then.
 */
export function streamFinishListener (key: symbol): (this: Http2Stream) => void {
  return function onStreamFinish (this: Http2Stream): void {
    setTimeout(() => {
      if (this.destroyed) return
      ;(this as unknown as Record<symbol, Ticket>)[key].responseClose()
      if (this.closed) this.destroy()
    }, UNFINISHED_STREAM_MS).unref()
  }
}

const kOpenTickets = Symbol('fastify-concurrency-limit.open-tickets')
type TrackedSocket = Socket & { [kOpenTickets]?: Set<Ticket> }

/**
 * One request's claim on a pool, from the hook that asks for a slot to the
 * release of that slot. The slot is held until both the request has ended
 * and the route handler has settled: a handler that outlives its client is
 * still work in flight. The state moves only forward and `responseClose` is
 * idempotent, so the slot is given back exactly once however many of the
 * ending signals below arrive.
 *
 * The ending signal, read from Node's http server and http2 compat layer:
 * - HTTP/1.1: the raw response's 'close' covers a response that is attached
 *   to its socket (sent, failed, hijacked and ended, or the client gone:
 *   `onServerResponseClose` emits it from the socket's 'close'). With
 *   pipelining, the responses queued behind the attached one are not
 *   attached: when the client leaves, Node 20 and 22 destroy their requests
 *   (`abortIncoming`) but never emit their response's 'close' (Node 24
 *   does). A request takes its slot only once its response is attached (see
 *   `start`), but one waiting for its turn has its ticket too. The socket's
 *   own 'close' is emitted once for every connection, so the tickets of the
 *   requests waiting for their turn on a socket are kept in one set, with
 *   one listener per socket, and ended together when it closes; a ticket
 *   leaves the set as its response is attached.
 * - HTTP/2: `request.raw.socket` stands for the whole session. Each request
 *   is a stream, and a stream is destroyed, and emits 'close' once, however
 *   it ends: a response sent, RST_STREAM from the client, the session
 *   destroyed, or a GOAWAY whose last stream id is below it. But not
 *   always: a stream that the peer closed (a session the client destroyed,
 *   which Node closes gracefully on its GOAWAY) while the response's last
 *   write was on its way never finishes that write, so Node 20 to 24 never
 *   destroy it, and its 'close' never comes (the stream and its session
 *   leak). Node marks such a stream `closed` and ends its readable side:
 *   its 'end' with `closed` set and its write unfinished ends the ticket
 *   too, a second later (`UNFINISHED_STREAM_MS`), and destroys the stream.
 *   Nor does Node destroy a stream until its readable side has been read
 *   to its end, and a body the handler read only in part is never drained
 *   (HTTP/1 dumps it): a stream still open a second after its response was
 *   sent in full ends the ticket too (`streamFinishListener`).
 *   A stream that ended while an earlier hook ran is seen by `destroyed` or
 *   `closed` (`Http2ServerResponse` has no `closed`).
 */
export class Ticket implements Waiter {
  prev: Waiter | null = null
  next: Waiter | null = null
  enqueuedAt = 0
  deadline = 0
  /** When the slot was taken, for an adaptive limit only. */
  admittedAt = 0

  state = RELEASED
  responseClosed = false
  /**
   * When the request ended, its body had arrived in full, no header of its
   * answer had gone out, and the route had not hijacked the reply: if its
   * client left then, it left the work, not an upload or a download.
   */
  leftWork = false
  handlerPending = false

  readonly admission: Admission
  readonly request: FastifyRequest
  readonly reply: FastifyReply
  readonly done: Done
  /** The body stream, when the slot is asked for in preParsing. */
  readonly payload: unknown
  readonly level: Level
  #socketTickets: Set<Ticket> | null = null

  constructor (admission: Admission, request: FastifyRequest, reply: FastifyReply, done: Done, payload: unknown, level: Level) {
    this.admission = admission
    this.request = request
    this.reply = reply
    this.done = done
    this.payload = payload
    this.level = level
  }

  /**
   * Takes a slot, or a place in the queue. The caller has checked with
   * `limiter.refuse()` that one of them is free.
   */
  start (): void {
    // The client left while an earlier hook ran: there is no one to serve,
    // and no ending signal will come for it.
    if (this.gone()) return
    const { key, onClose } = this.admission
    const res = this.reply.raw as ServerResponse & Record<symbol, unknown>
    res[key] = this
    const stream = streamOf(this.request)
    if (stream !== undefined) {
      (stream as unknown as Record<symbol, unknown>)[key] = this
      // 'close' comes once: `on` spares the wrapper that `once` allocates.
      stream.on('close', onClose)
      stream.on('finish', this.admission.onStreamFinish)
      stream.on('end', this.admission.onStreamEnd)
    } else {
      res.on('close', onClose)
      // HTTP/1.1 answers a connection's requests in order. A pipelined request
      // whose response waits behind another's (it has no socket yet) asks for
      // its slot when its turn comes: a slot held by a finished response that
      // cannot be written would block the pool, and the request ahead of it
      // on the same connection could even queue behind it until it timed out.
      // So one connection holds at most one slot of a pool at a time.
      if (res.socket === null) {
        this.state = WAITING_TURN
        // Until its response is attached, the request's end is seen only by
        // the socket's 'close' (see the class comment).
        const socket = this.request.raw.socket as TrackedSocket
        let open = socket[kOpenTickets]
        if (open === undefined) {
          open = socket[kOpenTickets] = new Set()
          socket.once('close', onSocketClose)
        }
        open.add(this)
        this.#socketTickets = open
        // Node assigns the socket as the response ahead finishes, and emits
        // that response's 'close' (which releases its slot) on the next
        // tick: ask after it. From then on the response's own 'close' comes.
        res.once('socket', () => {
          this.#untrack()
          process.nextTick(() => { this.#askInTurn() })
        })
        return
      }
    }
    this.#ask()
  }

  #askInTurn (): void {
    // The client may have left as the response ahead finished: the socket
    // is destroyed, its 'close' not emitted yet.
    if (this.gone()) {
      this.state = RELEASED
      return
    }
    const { limiter, rejecter } = this.admission
    const reason = limiter.refuse(this.level)
    if (reason === null) this.#ask()
    else {
      this.state = RELEASED
      this.admission.reporter.refused(this.request, limiter.name, reason)
      rejecter.reject(limiter, this.request, this.reply, reason)
    }
  }

  #ask (): void {
    const limiter = this.admission.limiter
    if (limiter.tryAcquire(this.level)) {
      if (limiter.adaptive) this.admittedAt = performance.now()
      this.state = ADMITTED
      this.admission.reporter.admitted(this.request, this.reply, this.admission.atOnce)
      this.continue()
      return
    }
    limiter.enqueue(this)
    this.state = QUEUED
    this.admission.reporter.queued(this.request, limiter.name)
  }

  /**
   * True once the client can no longer be answered. The 'close' events come
   * a tick after the socket or stream is destroyed: this sees it in between.
   */
  gone (): boolean {
    return clientGone(this.request, this.reply)
  }

  admit (): boolean {
    const { limiter, reporter } = this.admission
    if (this.gone()) {
      this.state = RELEASED
      reporter.abandoned(this.request, limiter.name, performance.now() - this.enqueuedAt)
      return false
    }
    const now = performance.now()
    if (limiter.adaptive) this.admittedAt = now
    this.state = ADMITTED
    reporter.admitted(this.request, this.reply, reporter.facts(limiter.name, now - this.enqueuedAt))
    this.continue()
    return true
  }

  reject (reason: RejectReason): void {
    this.state = RELEASED
    this.admission.reporter.refused(this.request, this.admission.limiter.name, reason)
    this.admission.rejecter.reject(this.admission.limiter, this.request, this.reply, reason)
  }

  handlerStarted (result: PromiseLike<unknown>): void {
    this.handlerPending = true
    const settled = (): void => {
      this.handlerPending = false
      if (this.responseClosed) this.release()
    }
    result.then(settled, settled)
  }

  #untrack (): void {
    this.#socketTickets?.delete(this)
    this.#socketTickets = null
  }

  /** The request has ended (see the class comment). Safe to call more than once. */
  responseClose (): void {
    if (this.responseClosed) return
    this.responseClosed = true
    // Only an adaptive limit reads it: a fixed pool's requests pay nothing.
    if (this.admission.limiter.adaptive) this.leftWork = bodyIn(this.request) && !(this.reply.raw as ServerResponse).headersSent && !this.reply.sent
    this.#untrack()
    if (this.state === WAITING_TURN) {
      this.state = RELEASED
    } else if (this.state === QUEUED) {
      this.state = RELEASED
      this.admission.limiter.abandon(this)
      this.admission.reporter.abandoned(this.request, this.admission.limiter.name, performance.now() - this.enqueuedAt)
    } else if (!this.handlerPending) {
      this.release()
    } else {
      settleReply(this.reply)
    }
  }

  release (): void {
    if (this.state !== ADMITTED) return
    this.state = RELEASED
    const limiter = this.admission.limiter
    this.admission.reporter.released(this.request, limiter.name)
    if (limiter.adaptive) limiter.release(this.admittedAt, outcomeOf(this.reply, this.leftWork))
    else limiter.release()
  }

  continue (): void {
    if (this.payload === undefined) this.done()
    else this.done(null, this.payload)
  }
}

/**
 * What a released request tells an adaptive limit. Only a response sent in
 * full with a status below 400 is a latency sample. An error is not: an
 * error answered at once is fast for reasons that say nothing of the work's
 * capacity (a bug, a validation failure), and taking every 5xx as overload
 * would let one failing route cut the limit of its pool to the minimum.
 * Nor is a request whose client left before its answer: it holds its slot
 * until its handler settles, but its time would make an overload that
 * drives clients away look fast (a handler that stops when its client
 * leaves ends early); the limit hears of it apart (`Limit.onClientLeft`).
 * An upload or a response still on its way when its client left timed
 * the client's bandwidth, and a reply the route hijacked and never ended
 * says nothing of the work: neither is anything.
 */
function outcomeOf (reply: FastifyReply, leftWork: boolean): Outcome {
  const res = reply.raw as ServerResponse
  // An HTTP/2 stream reset by its client reads as finished (its writable
  // side is destroyed) but never ended.
  if (res.writableEnded && res.writableFinished) return res.statusCode < 400 ? SUCCESS : IGNORE
  return leftWork ? LEFT : IGNORE
}

/**
 * Whether a request's body had all arrived. HTTP/2 calls a stream its
 * client reset `complete`, body or not: a request without a body is one
 * whose headers ended the stream, and one with a body has it all once read
 * to its end.
 */
function bodyIn (request: FastifyRequest): boolean {
  const stream = streamOf(request)
  if (stream === undefined) return request.raw.complete
  return stream.endAfterHeaders || request.raw.readableEnded
}

function onSocketClose (this: TrackedSocket): void {
  const open = this[kOpenTickets] as Set<Ticket>
  // Each ticket takes itself out of the set as it ends.
  for (const ticket of open) ticket.responseClose()
}

function fulfilledThen (this: FastifyReply, fulfilled?: () => void): void {
  fulfilled?.()
}

/**
 * An async handler that returns `reply` settles when Fastify's `reply.then`
 * does, and that waits for the raw response to finish or close. After the
 * client has left, an HTTP/2 response whose stream closed before the handler
 * replied never emits either again, so the handler, and its slot, would
 * wait forever. The response is over: let `reply.then` say so at once.
 */
function settleReply (reply: FastifyReply): void {
  Object.defineProperty(reply, 'then', { value: fulfilledThen, configurable: true, writable: true })
}

/** True once a request's client can no longer be answered (see `Ticket.gone`). */
export function clientGone (request: FastifyRequest, reply: FastifyReply): boolean {
  const stream = streamOf(request)
  if (stream !== undefined) return stream.destroyed || stream.closed
  return request.raw.socket.destroyed || (reply.raw as ServerResponse).closed
}

function streamOf (request: FastifyRequest): Http2Stream | undefined {
  return (request.raw as { stream?: Http2Stream }).stream
}

/** The ticket of a request for one registration, or undefined if it never asked. */
export function ticketOf (reply: FastifyReply, key: symbol): Ticket | undefined {
  return (reply.raw as unknown as Record<symbol, Ticket | undefined>)[key]
}
