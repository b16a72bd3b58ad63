/**
 * A limit algorithm: the number of requests a pool lets in at once, moved by
 * what the requests it let in tell about the work behind it. The limiter
 * admits against `limit` and reports every admitted request that completed
 * normally to `onSample`; the limit decides what the sample means.
 *
 * Shaped like Netflix concurrency-limits' `Limit`. Requests whose outcome says
 * nothing about the work's latency (the response is an error) are not
 * reported (Netflix's `onIgnore`); `didDrop` is for outcomes that mean the
 * work behind the pool is overloaded (Netflix's `onDropped`). A request whose
 * client left is reported apart, for the limit to judge.
 */
export interface Limit {
  /** Requests admitted at once now: an integer >= 1. */
  readonly limit: number
  /** True if `onSample` may move the limit: the limiter times requests only then. */
  readonly adaptive: boolean
  /**
   * One admitted request has completed.
   * @param startMs when it was admitted (performance.now() clock; the queue wait is not part of it)
   * @param rttMs milliseconds from admission to release
   * @param inFlight requests in flight when it completed, itself included
   * @param didDrop the outcome says the work behind the pool is overloaded
   */
  onSample (startMs: number, rttMs: number, inFlight: number, didDrop: boolean): void
  /**
   * One admitted request has completed after its client left: its time is
   * no sample (a handler that stops when its client leaves ends early), but
   * a client gave up on it. Parameters as for `onSample`.
   */
  onClientLeft (startMs: number, rttMs: number, inFlight: number): void
  /** What the algorithm knows, for stats; null for a fixed limit. */
  state (): AdaptiveState | null
}

export interface AdaptiveState {
  /** Latency of the work without queueing, as last measured; null before the first measure. */
  baselineMs: number | null
  /** Mean latency over the last closed window; null before the first window closes. */
  recentMs: number | null
}
