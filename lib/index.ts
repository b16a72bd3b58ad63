import type {
  FastifyInstance,
  FastifyPluginAsync,
  FastifyReply,
  FastifyRequest,
  HTTPMethods,
  RouteOptions
} from 'fastify'
import fp from 'fastify-plugin'
import { guardEveryServer, type ConnectionGuard, type ConnectionStats } from './connection-guard.js'
import { Reporter, type RequestConcurrencyLimit } from './diagnostics.js'
import { InvalidOptionError } from './errors.js'
import { LEVELS, type Level, type LimiterStats } from './limiter.js'
import {
  checkPriorityResult,
  resolveOptions,
  resolveRouteConfig,
  type ConcurrencyLimitOptions,
  type HookName,
  type PriorityOption,
  type RouteConcurrencyLimitSetting
} from './options.js'
import { registerMetrics } from './metrics.js'
import { decideAfterTwoTurns, isFirstOfConnection, type Decide } from './first-request.js'
import { DEFAULT_POOL, Pools } from './pools.js'
import { Rejecter } from './rejection.js'
import { closeListener, streamEndListener, streamFinishListener, Ticket, ticketOf, type Admission, type Done } from './ticket.js'

export type { ConnectionStats } from './connection-guard.js'
export { channels } from './diagnostics.js'
export type { AbandonMessage, AdmitMessage, QueueMessage, RefuseMessage, ReleaseMessage, RequestConcurrencyLimit } from './diagnostics.js'
export {
  ClosingError,
  ConnectionLimitError,
  InvalidOptionError,
  OverloadedError,
  QueueFullError,
  QueueTimeoutError,
  StoreUnavailableError,
  UnknownPoolError
} from './errors.js'
export type { RejectReason } from './limiter.js'
export type { AdaptiveState } from './limits/limit.js'
export type {
  AdaptiveOptions,
  ConcurrencyLimitOptions,
  HookName,
  LogLevel,
  MetricsOptions,
  MetricsRegistry,
  PoolOptions,
  Priority,
  PriorityOption,
  Rejection,
  RejectionWithRetry,
  RouteConcurrencyLimitConfig,
  RouteConcurrencyLimitSetting
} from './options.js'
export type { OnStoreError, RedisClient, RedisSubscriber, StoreOptions } from './store/options.js'
export type { StoreStats } from './store/redis.js'

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
  interface FastifyRequest {
    /** The pool that admitted the request and how long it waited; null until a pool admits it. */
    concurrencyLimit: RequestConcurrencyLimit | null
  }
  interface FastifyContextConfig {
    /** `false`: never limited. `true` or `{}`: the plugin's pool. Limits: a pool of its own. */
    concurrencyLimit?: RouteConcurrencyLimitSetting
  }
}

type Handler = (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply) => unknown

const plugin: FastifyPluginAsync<ConcurrencyLimitOptions> = async (fastify, opts) => {
  // A second registration on the same instance would stand in front of the
  // first on every route; a child context may have its own (see `key`).
  if (Object.prototype.hasOwnProperty.call(fastify, 'concurrencyLimit')) {
    throw new InvalidOptionError('the plugin is registered twice on the same instance: register it once and use groups or ' +
      'route config for other limits, or register the second one inside a child context (fastify.register(async (child) => ...))')
  }
  const options = resolveOptions(opts)
  for (const warning of options.warnings) fastify.log.warn(warning)
  const pools = new Pools(options)
  const rejecter = new Rejecter(options)

  let guard: ConnectionGuard | null = null
  if (options.maxConnections !== undefined) {
    if (fastify.initialConfig.http2 === true) {
      throw new InvalidOptionError('maxConnections works with HTTP/1 servers only: an HTTP/2 connection carries many requests')
    }
    guard = guardEveryServer(fastify, options.maxConnections, options.statusCode)
  }

  const decorator: ConcurrencyLimitDecorator = {
    stats: (pool = DEFAULT_POOL) => pools.stats(pool),
    pools: () => pools.all(),
    connections: () => guard?.stats() ?? null
  }
  fastify.decorate('concurrencyLimit', decorator)
  // A registration in a child context finds it made by the one at the root.
  if (!fastify.hasRequestDecorator('concurrencyLimit')) fastify.decorateRequest('concurrencyLimit', null)
  if (options.metrics !== null) await registerMetrics(fastify, options.metrics, pools, guard)
  const reporter = new Reporter(options)

  // Waiters must be answered before the server waits for in-flight requests
  // to end, or close() would wait on requests that wait on it.
  // A pool on a shared store gives up its turn there before the user's
  // onClose hooks may quit the Redis client.
  fastify.addHook('preClose', async () => {
    const closed = pools.close()
    rejecter.drain()
    guard?.close()
    await closed
  })

  // One key per registration: a request that passes through two of them
  // (one at the root, another in a child context) holds a ticket of each.
  const key = Symbol('fastify-concurrency-limit.ticket')
  const onClose = closeListener(key)
  const onStreamEnd = streamEndListener(key)
  const onStreamFinish = streamFinishListener(key)
  // Child contexts inherit it: a route sees the registration nearest to it.
  ;(fastify as unknown as Record<symbol, symbol>)[kNearest] = key
  const seen = new Set<string>()

  fastify.addHook('onRoute', function (this: FastifyInstance, route: RouteOptions) {
    const methods = [route.method].flat()
    for (const method of methods) seen.add(`${method} ${route.url}`)
    const routeName = `${methods.join(',')} ${route.url}`
    // A route's config speaks to the registration nearest to it; an outer one
    // limits the route with its own pool, unless the config says `false`.
    const own = (this as unknown as Record<symbol, symbol>)[kNearest] === key
    const config = own || route.config?.concurrencyLimit === false ? route.config?.concurrencyLimit : undefined
    // A route's own config is the more specific word: it wins over `exempt`.
    if (config === undefined && options.exempt !== null && options.exempt(route)) return
    const resolved = resolveRouteConfig(routeName, config, options.global)
    if (resolved === null) return
    if (own) for (const warning of resolved.warnings) fastify.log.warn(warning)
    const limiter = pools.forRoute(routeName, route.url, config as object, resolved)
    const atOnce = Object.freeze(reporter.facts(limiter.name, 0))
    const admission: Admission = { limiter, rejecter, key, reporter, onClose, onStreamEnd, onStreamFinish, atOnce }
    const stage: HookName = resolved.hook ?? options.hook
    const priority = levelOrPicker(resolved.priority ??
      (resolved.group === undefined ? undefined : options.groupPriorities.get(resolved.group)) ?? options.priority)

    const decide: Decide = (request, reply, done, payload) => {
      const level = typeof priority === 'number' ? priority : levelOf(priority, request)
      if (typeof level !== 'number') {
        done(level)
        return
      }
      const reason = admission.limiter.refuse(level)
      if (reason === null) new Ticket(admission, request, reply, done, payload, level).start()
      else {
        reporter.refused(request, admission.limiter.name, reason)
        rejecter.reject(admission.limiter, request, reply, reason)
      }
    }
    const admit: Decide = limiter.watchesLoop
      ? (request, reply, done, payload) => {
          if (isFirstOfConnection(request)) decideAfterTwoTurns(decide, admission, request, reply, done, payload)
          else decide(request, reply, done, payload)
        }
      : decide
    // Route-level hooks run after the instance's own hooks of the same stage;
    // ours goes first among them so that a refused request costs no more.
    // A request refused at once costs no allocation and no listener. The
    // hook's name is what route printouts show.
    const hook = stage === 'preParsing'
      ? function concurrencyLimit (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: Done): void {
        admit(request, reply, done, payload)
      }
      : function concurrencyLimit (request: FastifyRequest, reply: FastifyReply, done: Done): void {
        admit(request, reply, done, undefined)
      }
    const existing = route[stage] as unknown
    const hooks = existing === undefined ? [] : Array.isArray(existing) ? existing : [existing]
    ;(route as unknown as Record<HookName, unknown[]>)[stage] = [hook, ...hooks]
    route.handler = limitHandler(route.handler as Handler, key, routeName) as RouteOptions['handler']
  })

  // Routes added before the plugin was registered (without `await`, or
  // another plugin's routes) are never seen by it: say so rather than leave
  // them unlimited in silence. Only the root sees every route of the app.
  fastify.addHook('onReady', function (done) {
    const unseen = Object.getPrototypeOf(fastify) === Object.prototype
      ? routesOf(fastify).filter((route) => !seen.has(route))
      : []
    if (seen.size === 0 && unseen.length > 0) {
      fastify.log.warn('fastify-concurrency-limit limits no route: it was registered after the routes were added. ' +
        'Register it with `await fastify.register(...)` before adding routes.')
    } else if (unseen.length > 0) {
      fastify.log.warn(`fastify-concurrency-limit does not limit ${unseen.length} route${unseen.length === 1 ? '' : 's'} added before it was registered: ` +
        `${unseen.slice(0, 10).join(', ')}${unseen.length > 10 ? ` and ${unseen.length - 10} more` : ''}. Register it with \`await fastify.register(...)\` before ` +
        'every route, and leave out the ones you mean with its exempt option.')
    }
    done()
  })
}

const kNearest = Symbol('fastify-concurrency-limit.nearest')

type Picker = (request: FastifyRequest) => string

/** A fixed class as its level; a function stays, to be asked per request. */
function levelOrPicker (priority: PriorityOption | undefined): Level | Picker {
  if (priority === undefined) return 1
  if (typeof priority === 'function') return priority
  return LEVELS.indexOf(priority) as Level
}

/** The level a request's `priority` function gives it, or the error to answer with. */
function levelOf (pick: Picker, request: FastifyRequest): Level | Error {
  try {
    return LEVELS.indexOf(checkPriorityResult(pick(request))) as Level
  } catch (err) {
    return err instanceof Error ? err : new Error(String(err))
  }
}

/**
 * Every route of the app as `METHOD /url`. Fastify lists no routes but
 * prints them as a tree: one node a line, its depth in its indent, its
 * methods in parentheses. The printout is meant for people (a wildcard can
 * print apart from its parent), so only what Fastify confirms is a route
 * of that method and URL is kept.
 */
function routesOf (fastify: FastifyInstance): string[] {
  const routes: string[] = []
  const path: string[] = []
  for (const line of fastify.printRoutes({ commonPrefix: false }).split('\n')) {
    const node = /^([│ ]*)[├└]── (.*?) \(([A-Z, -]+)\)/.exec(line)
    if (node === null) continue
    path.length = node[1].length / 4
    path.push(node[2])
    const url = path.join('')
    for (const method of node[3].split(', ')) {
      if (fastify.hasRoute({ method: method as HTTPMethods, url })) routes.push(`${method} ${url}`)
    }
  }
  return routes
}

function limitHandler (handler: Handler, key: symbol, routeName: string): Handler {
  let warned = false
  return function limited (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply): unknown {
    const ticket = ticketOf(reply, key)
    if (ticket === undefined) {
      // Another plugin's onRoute hook replaced the route's hooks after ours
      // ran, and the admission hook with them: serve, unlimited, and say so.
      if (!warned) {
        warned = true
        request.log.warn(`fastify-concurrency-limit: route ${routeName} lost its admission hook ` +
          '(another onRoute hook replaced the route\'s hooks); its requests are not limited')
      }
      return handler.call(this, request, reply)
    }
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
