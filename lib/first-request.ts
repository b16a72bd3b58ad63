import { performance } from 'node:perf_hooks'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { clientGone, type Admission, type Done } from './ticket.js'

/** Decides on a request: a slot, a place in the queue, or a refusal. */
export type Decide = (request: FastifyRequest, reply: FastifyReply, done: Done, payload: unknown) => void

/** An HTTP/1 request on a connection that has not been answered yet. */
export function isFirstOfConnection (request: FastifyRequest): boolean {
  const raw = request.raw as { stream?: unknown, socket: { bytesWritten: number } }
  return raw.stream === undefined && raw.socket.bytesWritten === 0
}

/**
 * Decides on the first request of a new connection two turns of the event
 * loop after it was read, and only if its client is still there; for pools
 * whose work holds the loop (`maxEventLoopDelay`).
 *
 * Node accepts one connection per turn. While turns are long, connections
 * wait in the kernel's accept queue, their clients give up, and a request
 * read from one of them is often followed by the connection's end: Node
 * reads that end a turn after the request (a reset, in the same turn), and
 * the socket is destroyed by the next turn's check phase. Serving such
 * requests would spend the loop on clients that left while others wait
 * behind them: the turns stay long, and the next connections go the same
 * way. A connection already answered was read within a turn or so of its
 * request, so its requests are decided at once.
 *
 * The decision itself waits too, not only the handler: requests of many new
 * connections can be read in one turn, and each is judged against the turn
 * in which its work would run, as any other arrival.
 */
export function decideAfterTwoTurns (decide: Decide, admission: Admission, request: FastifyRequest, reply: FastifyReply, done: Done, payload: unknown): void {
  setImmediate(secondTurn, decide, admission, request, reply, done, payload, performance.now())
}

function secondTurn (decide: Decide, admission: Admission, request: FastifyRequest, reply: FastifyReply, done: Done, payload: unknown, readAt: number): void {
  setImmediate(decideIfThere, decide, admission, request, reply, done, payload, readAt)
}

function decideIfThere (decide: Decide, admission: Admission, request: FastifyRequest, reply: FastifyReply, done: Done, payload: unknown, readAt: number): void {
  if (clientGone(request, reply)) {
    // Nothing was taken: no slot to give back, no answer to send.
    admission.limiter.countAbandoned()
    admission.reporter.abandoned(request, admission.limiter.name, performance.now() - readAt)
    return
  }
  decide(request, reply, done, payload)
}
