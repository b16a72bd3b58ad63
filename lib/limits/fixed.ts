import type { AdaptiveState, Limit } from './limit.js'

/** `maxConcurrency`, whatever the samples say. The limiter never times its requests. */
export class FixedLimit implements Limit {
  readonly limit: number
  readonly adaptive = false

  constructor (limit: number) {
    this.limit = limit
  }

  onSample (): void {}

  onClientLeft (): void {}

  state (): AdaptiveState | null {
    return null
  }
}
