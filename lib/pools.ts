import { InvalidOptionError, UnknownPoolError } from './errors.js'
import { Limiter, type LimiterStats } from './limiter.js'
import { LoopTurn } from './loop-turn.js'
import { poolSettings, samePool, type PoolOptions, type ResolvedOptions, type ResolvedRouteConfig } from './options.js'
import { RedisPermits } from './store/redis.js'

export const DEFAULT_POOL = 'default'

/**
 * Every pool of one plugin instance, by name: the default pool, the named
 * groups, and the pools of routes that carry their own settings.
 */
export class Pools {
  readonly #options: ResolvedOptions
  readonly #byName = new Map<string, Limiter>()
  // A route's own pool is keyed by its config object, which Fastify shares
  // between a GET route and the HEAD route it adds for it, and by its URL:
  // an application may give one config constant to several routes.
  readonly #byConfig = new WeakMap<object, Map<string, Limiter>>()
  /** Marks the event loop's turns for the pools with `maxEventLoopDelay`. */
  readonly #turn = new LoopTurn()

  constructor (options: ResolvedOptions) {
    this.#options = options
    this.#add(DEFAULT_POOL, {})
    for (const [name, group] of options.groups) {
      if (name === DEFAULT_POOL) {
        throw new InvalidOptionError(`groups.${DEFAULT_POOL} is the plugin's own pool: set its options at the top level`)
      }
      this.#add(name, group, `group "${name}": `)
    }
  }

  /** The pool a route's requests take their slots from. */
  forRoute (route: string, url: string, config: object, resolved: ResolvedRouteConfig): Limiter {
    const { group, pool } = resolved
    if (group !== undefined) {
      const existing = this.#byName.get(group)
      if (existing === undefined) {
        // Naming a group that does not exist, without limits, is most likely
        // a typo: it must not silently mean a pool of default limits.
        if (pool === null) {
          throw new InvalidOptionError(`route ${route}: config.concurrencyLimit.group "${group}" is not defined; ` +
            `define it in the groups option${this.#options.groups.size > 0 ? ` (defined: ${[...this.#options.groups.keys()].join(', ')})` : ''}, or give the route its limits`)
        }
        return this.#add(group, pool, `group "${group}": `)
      }
      if (pool !== null && !samePool(existing.settings, poolSettings(pool, this.#options.pool, `route ${route}: `))) {
        throw new InvalidOptionError(`route ${route}: config.concurrencyLimit sets other limits for group "${group}" than it already has; set them in one place`)
      }
      return existing
    }
    if (pool === null) return this.#byName.get(DEFAULT_POOL) as Limiter
    let byUrl = this.#byConfig.get(config)
    if (byUrl === undefined) this.#byConfig.set(config, byUrl = new Map())
    let limiter = byUrl.get(url)
    if (limiter === undefined) {
      let name = route
      for (let n = 2; this.#byName.has(name); n++) name = `${route} (${n})`
      limiter = this.#add(name, pool, `route ${route}: `)
      byUrl.set(url, limiter)
    }
    return limiter
  }

  stats (name: string): LimiterStats {
    const limiter = this.#byName.get(name)
    if (limiter === undefined) throw new UnknownPoolError(name)
    return limiter.stats()
  }

  all (): LimiterStats[] {
    return Array.from(this.#byName.values(), (limiter) => limiter.stats())
  }

  /** Every pool so far (route pools are added as routes are). */
  limiters (): IterableIterator<Limiter> {
    return this.#byName.values()
  }

  /** Settles when every pool's store has given up the turns it held. */
  async close (): Promise<void> {
    const closing = Array.from(this.#byName.values(), (limiter) => limiter.close())
    this.#turn.stop()
    await Promise.all(closing)
  }

  /** `label` names the pool in an error about its settings. */
  #add (name: string, own: PoolOptions, label = ''): Limiter {
    const settings = poolSettings(own, this.#options.pool, label)
    const { store } = settings
    const limiter = new Limiter(name, settings, this.#turn, store == null ? null : (pool) => new RedisPermits(pool, store))
    this.#byName.set(name, limiter)
    return limiter
  }
}
