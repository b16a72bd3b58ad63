import type {
  FastifyInstance,
  FastifyPluginAsync,
  FastifyReply,
  FastifyRequest,
  RouteOptions
} from 'fastify'
import fp from 'fastify-plugin'
import { ConnectionGuard, type ConnectionStats } from './connection-guard.js'
import { InvalidOptionError } from './errors.js'
import type { LimiterStats } from './limiter.js'
import { resolveOptions, resolveRouteConfig, type ConcurrencyLimitOptions, type HookName, type RouteConcurrencyLimitConfig } from './options.js'
import { DEFAULT_POOL, Pools } from './pools.js'
import { Rejecter } from './rejection.js'
import { Ticket, ticketOf } from './ticket.js'

export type { ConnectionStats } from './connection-guard.js'
export {
  ClosingError,
  ConnectionLimitError,
  InvalidOptionError,
  QueueFullError,
  QueueTimeoutError,
  UnknownPoolError
} from './errors.js'
export type { RejectReason } from './limiter.js'
export type {
  ConcurrencyLimitOptions,
  HookName,
  PoolOptions,
  Rejection,
  RejectionWithRetry,
  RouteConcurrencyLimitConfig
} from './options.js'

/** Counters and settings of one pool. */
export type PoolStats = LimiterStats

export interface ConcurrencyLimitDecorator {
  /** Stats of the named pool (default: the plugin's own pool). */
  stats (pool?: string): PoolStats
  /** Stats of every pool: the plugin's, each group and each route with its own settings. */
  pools (): PoolStats[]
  /** Open and refused connections, with `maxConnections` set; else null. */
  connections (): ConnectionStats | null
}

declare module 'fastify' {
  interface FastifyInstance {
    concurrencyLimit: ConcurrencyLimitDecorator
  }
  interface FastifyContextConfig {
    /** `false`: never limited. `true` or `{}`: the plugin's pool. Limits: a pool of its own. */
    concurrencyLimit?: boolean | RouteConcurrencyLimitConfig
  }
}

type Done = (err?: Error | null, payload?: unknown) => void
type Handler = (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply) => unknown

const plugin: FastifyPluginAsync<ConcurrencyLimitOptions> = async (fastify, opts) => {
  const options = resolveOptions(opts)
  const pools = new Pools(options)
  const rejecter = new Rejecter(options)

  let guard: ConnectionGuard | null = null
  if (options.maxConnections !== undefined) {
    if (fastify.initialConfig.http2 === true) {
      throw new InvalidOptionError('maxConnections works with HTTP/1 servers only: an HTTP/2 connection carries many requests')
    }
    guard = new ConnectionGuard(fastify.server, options.maxConnections, options.statusCode)
  }

  const decorator: ConcurrencyLimitDecorator = {
    stats: (pool = DEFAULT_POOL) => pools.stats(pool),
    pools: () => pools.all(),
    connections: () => guard?.stats() ?? null
  }
  fastify.decorate('concurrencyLimit', decorator)

  // Waiters must be answered before the server waits for in-flight requests
  // to end, or close() would wait on requests that wait on it.
  fastify.addHook('preClose', (done) => {
    pools.close()
    rejecter.drain()
    guard?.close()
    done()
  })

  fastify.addHook('onRoute', (route: RouteOptions) => {
    const routeName = `${[route.method].flat().join(',')} ${route.url}`
    const config = route.config?.concurrencyLimit
    const resolved = resolveRouteConfig(routeName, config, options.global)
    if (resolved === null) return
    const limiter = pools.forRoute(routeName, config as object, resolved)
    const stage: HookName = resolved.hook ?? options.hook

    // Route-level hooks run after the instance's own hooks of the same stage;
    // ours goes first among them so that a refused request costs no more.
    // A request refused at once costs no allocation and no listener.
    const admit = stage === 'preParsing'
      ? (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: Done) => {
          const reason = limiter.refuse()
          if (reason === null) new Ticket(limiter, rejecter, request, reply, done, payload).start()
          else rejecter.reject(limiter, request, reply, reason)
        }
      : (request: FastifyRequest, reply: FastifyReply, done: Done) => {
          const reason = limiter.refuse()
          if (reason === null) new Ticket(limiter, rejecter, request, reply, done, undefined).start()
          else rejecter.reject(limiter, request, reply, reason)
        }
    const existing = route[stage] as unknown
    const hooks = existing === undefined ? [] : Array.isArray(existing) ? existing : [existing]
    ;(route as unknown as Record<HookName, unknown[]>)[stage] = [admit, ...hooks]
    route.handler = limitHandler(route.handler as Handler) as RouteOptions['handler']
  })
}

function limitHandler (handler: Handler): Handler {
  return function limited (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply): unknown {
    const ticket = ticketOf(reply) as Ticket
    // The client left while the request was admitted but before the handler
    // began (during an async hook or the body read): skip work no one awaits.
    if (ticket.responseClosed) return undefined
    const result = handler.call(this, request, reply)
    if (result !== null && typeof result === 'object' && typeof (result as PromiseLike<unknown>).then === 'function') {
      ticket.handlerStarted(result as PromiseLike<unknown>)
    }
    return result
  }
}

export const fastifyConcurrencyLimit = fp(plugin, {
  fastify: '5.x',
  name: 'fastify-concurrency-limit'
})

export default fastifyConcurrencyLimit
