import diagnostics from 'node:diagnostics_channel'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { RejectReason } from './limiter.js'
import type { LogLevel } from './options.js'

/** What `request.concurrencyLimit` holds once a pool admitted the request. */
export interface RequestConcurrencyLimit {
  /** The pool that admitted it. */
  readonly pool: string
  /** Milliseconds it waited in the pool's queue: 0 if admitted at once. */
  readonly queuedMs: number
}

/** The message of each channel (see `channels`). */
export interface QueueMessage { request: FastifyRequest, pool: string }
export interface AdmitMessage { request: FastifyRequest, pool: string, queuedMs: number }
export interface RefuseMessage { request: FastifyRequest, pool: string, reason: RejectReason }
export interface AbandonMessage { request: FastifyRequest, pool: string, queuedMs: number }
export interface ReleaseMessage { request: FastifyRequest, pool: string }

/**
 * The plugin's diagnostics channels. A request that asks a pool for a slot
 * is either admitted at once (`admit`), queued (`queue`, then `admit`,
 * `refuse` or `abandon`), or refused at once (`refuse`); an admitted one is
 * released once (`release`). In a pool with `maxEventLoopDelay`, the first
 * request of a new connection whose client left before it was decided on
 * is `abandon` alone (see first-request.ts). Messages are published only
 * while a channel has subscribers.
 */
export const channels = {
  queue: diagnostics.channel('fastify-concurrency-limit:queue'),
  admit: diagnostics.channel('fastify-concurrency-limit:admit'),
  refuse: diagnostics.channel('fastify-concurrency-limit:refuse'),
  abandon: diagnostics.channel('fastify-concurrency-limit:abandon'),
  release: diagnostics.channel('fastify-concurrency-limit:release')
}

function rounded (ms: number): number {
  return Math.round(ms * 1000) / 1000
}

/**
 * Tells the world what became of each request: the request's own
 * `concurrencyLimit` facts, Server-Timing, refusal logs and the diagnostics
 * channels. Each costs nothing unless it is asked for. The facts on the
 * request are one frozen object per route for requests admitted at once,
 * and one small object per request that waited.
 */
export class Reporter {
  readonly #serverTiming: boolean
  readonly #logRefusals: LogLevel | null

  constructor (options: { serverTiming: boolean, logRefusals: LogLevel | null }) {
    this.#serverTiming = options.serverTiming
    this.#logRefusals = options.logRefusals
  }

  /** The facts of a request admitted after `queuedMs` in the queue. */
  facts (pool: string, queuedMs: number): RequestConcurrencyLimit {
    return { pool, queuedMs: rounded(queuedMs) }
  }

  admitted (request: FastifyRequest, reply: FastifyReply, facts: RequestConcurrencyLimit): void {
    request.concurrencyLimit = facts
    if (this.#serverTiming) reply.header('server-timing', `queue;dur=${Math.round(facts.queuedMs * 10) / 10}`)
    if (channels.admit.hasSubscribers) channels.admit.publish({ request, pool: facts.pool, queuedMs: facts.queuedMs } satisfies AdmitMessage)
  }

  queued (request: FastifyRequest, pool: string): void {
    if (channels.queue.hasSubscribers) channels.queue.publish({ request, pool } satisfies QueueMessage)
  }

  refused (request: FastifyRequest, pool: string, reason: RejectReason): void {
    if (this.#logRefusals !== null) request.log[this.#logRefusals]({ pool, reason }, 'request refused by fastify-concurrency-limit')
    if (channels.refuse.hasSubscribers) channels.refuse.publish({ request, pool, reason } satisfies RefuseMessage)
  }

  abandoned (request: FastifyRequest, pool: string, queuedMs: number): void {
    if (channels.abandon.hasSubscribers) channels.abandon.publish({ request, pool, queuedMs: rounded(queuedMs) } satisfies AbandonMessage)
  }

  released (request: FastifyRequest, pool: string): void {
    if (channels.release.hasSubscribers) channels.release.publish({ request, pool } satisfies ReleaseMessage)
  }
}
