import type { Cut } from './drain.js'

/** Why a worker is replaced. */
export type RecycleReason = 'requests' | 'memory' | 'crash'

// Every message between primary and workers carries this tag, so that the
// application's own messages on the same channel are left alone.
export const TAG = 'fastify-concurrency-limit/cluster'

/** The port a worker listens on, when the options said 0 and the first worker has been given one. */
export const PORT_ENV = 'FASTIFY_CONCURRENCY_LIMIT_CLUSTER_PORT'

export type WorkerMessage =
  | { tag: typeof TAG, type: 'listening', address: string, port: number | null, requestLimit: number, keepAliveCapped: number | null }
  | { tag: typeof TAG, type: 'failed', error: string }
  | { tag: typeof TAG, type: 'stats', rss: number, requests: number, inFlight: number }
  | { tag: typeof TAG, type: 'recycle', reason: Exclude<RecycleReason, 'crash'> }
  | { tag: typeof TAG, type: 'cut', cut: Cut }
  | { tag: typeof TAG, type: 'drained' }
  | { tag: typeof TAG, type: 'exiting' }

export type PrimaryMessage = { tag: typeof TAG, type: 'drain' | 'exit' }

export function isMessage<T extends { tag: string }> (message: unknown): message is T {
  return message !== null && typeof message === 'object' && (message as { tag?: unknown }).tag === TAG
}
