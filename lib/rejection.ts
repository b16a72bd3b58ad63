import { STATUS_CODES } from 'node:http'
import type { Http2ServerRequest, Http2Stream } from 'node:http2'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { ClosingError, InvalidOptionError, OverloadedError, QueueFullError, QueueTimeoutError, StoreUnavailableError } from './errors.js'
import type { Limiter, RejectReason } from './limiter.js'
import { MAX_RETRY_AFTER, type Rejection, type ResolvedOptions } from './options.js'
import { RejectDelay } from './reject-delay.js'
import { UNFINISHED_STREAM_MS } from './ticket.js'

function codeAndMessage (ErrorClass: new () => { code: string, message: string }): { code: string, message: string } {
  const { code, message } = new ErrorClass()
  return { code, message }
}

const REASONS: Record<RejectReason, { code: string, message: string }> = {
  queueFull: codeAndMessage(QueueFullError),
  queueTimeout: codeAndMessage(QueueTimeoutError),
  closing: codeAndMessage(ClosingError),
  overloaded: codeAndMessage(OverloadedError),
  storeUnavailable: codeAndMessage(StoreUnavailableError)
}

// A shared pool whose store failed asks it again within a second (see
// store/redis.ts): the time the pool's own queue needs to drain says nothing
// of when it will admit again.
const STORE_RETRY_AFTER = 1

const JSON_TYPE = 'application/json; charset=utf-8'

/**
 * Answers the requests the pools turn away. The default bodies are
 * serialized once, at registration, so a refusal costs no serialization and
 * no allocation beyond Fastify's own reply.
 */
export class Rejecter {
  readonly #options: ResolvedOptions
  readonly #bodies: Record<RejectReason, string>
  readonly #delay: RejectDelay | null

  constructor (options: ResolvedOptions) {
    this.#options = options
    this.#delay = options.rejectDelay > 0
      ? new RejectDelay(options.rejectDelay, options.maxHeldRejections, (limiter, request, reply, reason) => { this.answer(limiter, request, reply, reason) })
      : null
    const statusCode = options.statusCode
    const error = STATUS_CODES[statusCode] as string
    // Fastify's own error body, in its order.
    const body = (reason: RejectReason): string =>
      JSON.stringify({ statusCode, code: REASONS[reason].code, error, message: REASONS[reason].message })
    this.#bodies = {
      queueFull: body('queueFull'),
      queueTimeout: body('queueTimeout'),
      closing: body('closing'),
      overloaded: body('overloaded'),
      storeUnavailable: body('storeUnavailable')
    }
  }

  /**
   * Refuses a request: at once, or, for a full queue or a failed store while
   * refusals saturate the event loop, after up to `rejectDelay` (a request
   * refused for its queue timeout or for shutdown has waited enough).
   */
  reject (limiter: Limiter, request: FastifyRequest, reply: FastifyReply, reason: RejectReason): void {
    if ((reason === 'queueFull' || reason === 'storeUnavailable') && this.#delay !== null && this.#delay.hold(limiter, request, reply, reason)) return
    this.answer(limiter, request, reply, reason)
  }

  /** Answers every held refusal now (the server is closing). */
  drain (): void {
    this.#delay?.drain()
  }

  answer (limiter: Limiter, request: FastifyRequest, reply: FastifyReply, reason: RejectReason): void {
    const { statusCode, retryAfter, errorResponseBuilder } = this.#options
    let rejection: Rejection | undefined
    let seconds: number
    if (typeof retryAfter === 'number') {
      seconds = retryAfter
    } else if (retryAfter === undefined) {
      seconds = reason === 'storeUnavailable' ? STORE_RETRY_AFTER : limiter.retryAfter()
    } else {
      rejection = describe(limiter, reason, statusCode)
      try {
        seconds = retryAfter(request, rejection)
      } catch (err) {
        reply.send(err)
        return
      }
      if (!(typeof seconds === 'number' && Number.isFinite(seconds) && seconds >= 0)) {
        reply.send(new InvalidOptionError(unusableRetryAfter(seconds)))
        return
      }
    }
    // Retry-After takes whole delay-seconds (RFC 9110 §10.2.3), which a
    // recipient need not read past 2^31 (RFC 9111 §1.2.2); from 1e21 on, a
    // number would even print in exponent form.
    if (seconds > MAX_RETRY_AFTER) seconds = MAX_RETRY_AFTER
    seconds = Math.ceil(seconds)
    reply.code(statusCode).header('retry-after', seconds)
    if (request.raw.httpVersionMajor === 2) (request.raw as unknown as Http2ServerRequest).stream.once('end', onRefusedStreamEnd)
    // A closing server should not see this connection again; with
    // closeOnReject, neither should a refused client, until it reconnects.
    if (reason === 'closing' || this.#options.closeOnReject) {
      // HTTP/2 forbids Connection (Node drops it with a warning). Its own way
      // is a GOAWAY, which lets the session's open streams, this refusal
      // among them, finish; a closing Fastify sends that itself.
      if (request.raw.httpVersionMajor !== 2) reply.header('connection', 'close')
      else if (reason !== 'closing') (request.raw as unknown as Http2ServerRequest).stream.session?.close()
    }

    if (errorResponseBuilder === undefined) {
      reply.type(JSON_TYPE).send(this.#bodies[reason])
      return
    }
    let payload: unknown
    try {
      payload = errorResponseBuilder(request, { ...(rejection ?? describe(limiter, reason, statusCode)), retryAfter: seconds })
    } catch (err) {
      builderFailed(reply, err)
      return
    }
    // Fastify would serialize a promise itself (as {}): send what it settles to.
    if (isThenable(payload)) payload.then((body) => { reply.send(body) }, (err: unknown) => { builderFailed(reply, err) })
    else reply.send(payload)
  }
}

/**
 * A refused HTTP/2 stream that the client closed while its refusal was on
 * its way never finishes that write, and Node never destroys it (see
 * `Ticket`): under a storm of clients that destroy their sessions, refused
 * streams and their sessions would pile up, and keep the server from
 * closing. Destroyed as an admitted one is, a margin later.
 */
function onRefusedStreamEnd (this: Http2Stream): void {
  if (!this.closed || this.writableFinished) return
  setTimeout(() => { if (!this.destroyed) this.destroy() }, UNFINISHED_STREAM_MS).unref()
}

// Fastify's error handler keeps a status already set (the refusal's) for an
// error that carries none: a broken builder is the server's fault, a 500,
// and the refusal's Retry-After is no promise of that answer.
function builderFailed (reply: FastifyReply, err: unknown): void {
  reply.removeHeader('retry-after')
  reply.code(500).send(err)
}

function isThenable (value: unknown): value is PromiseLike<unknown> {
  return value !== null && typeof value === 'object' && typeof (value as PromiseLike<unknown>).then === 'function'
}

function unusableRetryAfter (value: unknown): string {
  if (!isThenable(value)) return `retryAfter() must return a number of seconds >= 0, returned ${String(value)}`
  // Kept synchronous so that a refusal waits on no promise unless its body
  // builder asks for one. The promise's rejection would go unhandled (and
  // end the process) if no one listened.
  value.then(undefined, () => {})
  return 'retryAfter() must return a number of seconds synchronously, returned a promise (an async function cannot set Retry-After)'
}

function describe (limiter: Limiter, reason: RejectReason, statusCode: number): Rejection {
  const { code, message } = REASONS[reason]
  return {
    reason,
    code,
    statusCode,
    message,
    pool: limiter.name,
    inFlight: limiter.inFlight,
    queued: limiter.queued,
    maxConcurrency: limiter.maxConcurrency,
    maxQueue: limiter.maxQueue,
    queueTimeout: limiter.queueTimeout
  }
}
