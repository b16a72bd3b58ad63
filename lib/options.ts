import { STATUS_CODES } from 'node:http'
import type { FastifyRequest, RouteOptions } from 'fastify'
import { InvalidOptionError } from './errors.js'
import { showValue } from './show-value.js'
import type { AdaptiveSettings, LimiterSettings, RejectReason } from './limiter.js'
import { checkStore, sameStore, type StoreOptions, type StoreSettings } from './store/options.js'

/** The lifecycle stage at which a request asks for a slot. */
export type HookName = 'onRequest' | 'preParsing' | 'preValidation' | 'preHandler'

/** Settings of an adaptive limit (`adaptive: true` takes every default). */
export interface AdaptiveOptions {
  /** The limit never goes below this. Integer >= 1. Default 1. */
  minConcurrency?: number
  /** The limit before the first measure. Integer >= 1. Default 20, within [minConcurrency, maxConcurrency]. */
  initialConcurrency?: number
  /**
   * How much slower than its baseline (its latency without queueing) the
   * work may get before the limit comes down: 0.25 = 25%. Number > 0, at most 10. Default 0.25.
   */
  tolerance?: number
  /**
   * Milliseconds the baseline may go unconfirmed while the pool is busy
   * before it is measured again (one window at a lower limit). Integer >= 1. Default 10000.
   */
  baselineInterval?: number
}

/**
 * The part of a prom-client (>= 15) `Registry` the plugin uses: pass a
 * `new Registry()` or prom-client's global `register`.
 */
export interface MetricsRegistry {
  registerMetric (metric: object): void
  getSingleMetric (name: string): unknown
  removeSingleMetric (name: string): void
  metrics (): Promise<string>
}

/** Prometheus metrics, with prom-client >= 15 installed. */
export interface MetricsOptions {
  /** The registry the metrics are registered on. */
  registry: MetricsRegistry
  /**
   * Start of every metric name. Default 'fastify_concurrency_limit_'. A second
   * registration of the plugin on the same registry needs its own.
   */
  prefix?: string
}

/** A level of Fastify's logger. */
export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace'

/** Settings of one pool of slots. */
export interface PoolOptions {
  /**
   * Requests of this pool in flight at once. Integer >= 1. Default 100.
   * With `adaptive`: the ceiling of the limit, default 1000.
   */
  maxConcurrency?: number
  /**
   * Requests waiting for a slot. Integer >= 0, 0 = no queue. Default:
   * maxConcurrency; with `adaptive`, the limit in force.
   */
  maxQueue?: number
  /**
   * Move the limit with the latency of the requests admitted: `true` or the
   * algorithm's settings. `false`: a fixed limit, whatever the plugin's
   * options say. Default false.
   */
  adaptive?: boolean | AdaptiveOptions
  /** Milliseconds a request may wait in the queue before it is answered. Integer >= 0. Default 1000. */
  queueTimeout?: number
  /**
   * Event-loop delay, in milliseconds, that the pool sheds for: once the
   * loop's turns have run longer than this for 100 ms, requests arriving
   * late in a turn are refused at once (503, `FST_CONCURRENCY_LIMIT_OVERLOADED`)
   * so that the turns stay near it; a single turn past twice this refuses
   * too. For CPU-bound work. Integer >= 0, 0 = off. Default 0.
   */
  maxEventLoopDelay?: number
  /**
   * The priority class of the requests (plugin: every route's default;
   * group: its routes' default; route config: the route's), or a function
   * of the request that returns it. Under overload, sheddable requests are
   * refused first, critical ones last. Default 'normal'. Not a pool setting:
   * routes of several classes share one pool.
   */
  priority?: PriorityOption
  /**
   * Share maxConcurrency with every instance whose pool of the same name
   * uses the same Redis and nameSpace (see "Fleet-wide limits" in the README).
   * The queue stays each instance's own. Not with `adaptive`.
   */
  store?: StoreOptions
}

/** A priority class, most important first. */
export type Priority = 'critical' | 'normal' | 'sheddable'
/** A fixed class, or a function that picks one per request (from a header, the user...). */
export type PriorityOption = Priority | ((request: FastifyRequest) => Priority)

/** What a rejected request is told, passed to `retryAfter` and `errorResponseBuilder`. */
export interface Rejection {
  reason: RejectReason
  code: string
  statusCode: number
  message: string
  /** Name of the pool that refused the request. */
  pool: string
  inFlight: number
  queued: number
  maxConcurrency: number
  maxQueue: number
  queueTimeout: number
}

/** A rejection with the Retry-After value (seconds) that goes out with it. */
export interface RejectionWithRetry extends Rejection {
  retryAfter: number
}

export interface ConcurrencyLimitOptions extends PoolOptions {
  /** Limit every route unless its config says `concurrencyLimit: false`. Default true. */
  global?: boolean
  /**
   * Stage at which requests are admitted. Default 'preParsing': after every
   * onRequest hook (rate limits, authentication, under-pressure), before the
   * body is read.
   */
  hook?: HookName
  /**
   * Routes never limited although their config does not say so, typically
   * the routes of other plugins (health checks, metrics, docs): URLs as
   * registered (a string matches exactly, a RegExp is tested), or a predicate
   * on the route's options. A route whose config sets `concurrencyLimit`
   * follows its config.
   */
  exempt?: ReadonlyArray<string | RegExp> | ((route: RouteOptions) => boolean)
  /** Status of a rejection: a 4xx or 5xx code. Default 503. */
  statusCode?: number
  /**
   * Retry-After in seconds (0 to 2147483647), or a function of the rejection
   * that returns it synchronously. Default: from the drain rate.
   */
  retryAfter?: number | ((request: FastifyRequest, rejection: Rejection) => number)
  /** Builds the body of a rejection instead of Fastify's error body; may return a promise of it. */
  errorResponseBuilder?: (request: FastifyRequest, rejection: RejectionWithRetry) => unknown
  /** Named pools that routes join with `config.concurrencyLimit.group`. */
  groups?: Record<string, PoolOptions>
  /**
   * Most milliseconds a repeated refusal on one HTTP/1 connection is held
   * back while refusals saturate the event loop (a retry-storm brake);
   * integer, 0 turns it off. Default 4000 (holds of 1 s, 2 s, then 4 s).
   */
  rejectDelay?: number
  /** Most refusals held back at once; past it, refusals are answered at once. Default 10000. */
  maxHeldRejections?: number
  /** Send `Connection: close` with every refusal. Default false. */
  closeOnReject?: boolean
  /**
   * Most open connections of the server; one more gets a canned 503 and is
   * closed. Integer >= 1. Default: no bound.
   */
  maxConnections?: number
  /**
   * Prometheus metrics on your prom-client registry (prom-client is loaded
   * only with this option). Default: none.
   */
  metrics?: MetricsOptions
  /**
   * Add `Server-Timing: queue;dur=<ms>` (the time spent in the queue) to
   * every admitted response. Default false: it tells clients about the server.
   */
  serverTiming?: boolean
  /** Log each refusal, with its pool and reason, at this level. Default false: not logged. */
  logRefusals?: false | LogLevel
}

/** `config.concurrencyLimit` of a route. */
export interface RouteConcurrencyLimitConfig extends PoolOptions {
  /** Join the named pool (shared by every route naming it). */
  group?: string
  /** Stage at which this route's requests are admitted. */
  hook?: HookName
}

type WithKey<K extends keyof RouteConcurrencyLimitConfig> = RouteConcurrencyLimitConfig & { [P in K]-?: RouteConcurrencyLimitConfig[P] }

/**
 * What `config.concurrencyLimit` accepts, typed for route options. Fastify
 * infers each route's config type from the object literal and intersects it
 * with this one, which defeats excess-property checks on an all-optional
 * interface: `{ gruop: 'x' }` or `'off'` would type-check. As a union of
 * shapes that each require one known key, they do not. (A typo beside a valid
 * key still type-checks; registration refuses it.)
 */
export type RouteConcurrencyLimitSetting =
  | boolean
  | Record<string, never>
  | WithKey<'maxConcurrency'>
  | WithKey<'maxQueue'>
  | WithKey<'queueTimeout'>
  | WithKey<'maxEventLoopDelay'>
  | WithKey<'priority'>
  | WithKey<'adaptive'>
  | WithKey<'store'>
  | WithKey<'group'>
  | WithKey<'hook'>

export interface ResolvedOptions {
  global: boolean
  hook: HookName
  exempt: ((route: RouteOptions) => boolean) | null
  statusCode: number
  retryAfter: number | ((request: FastifyRequest, rejection: Rejection) => number) | undefined
  errorResponseBuilder: ((request: FastifyRequest, rejection: RejectionWithRetry) => unknown) | undefined
  rejectDelay: number
  maxHeldRejections: number
  closeOnReject: boolean
  maxConnections: number | undefined
  metrics: { registry: MetricsRegistry, prefix: string } | null
  serverTiming: boolean
  logRefusals: LogLevel | null
  /** Pool settings as given at plugin level; unset fields are filled per pool. */
  pool: PoolOptions
  groups: Map<string, PoolOptions>
  /** The plugin's priority, and each group's that sets one. */
  priority: PriorityOption | undefined
  groupPriorities: Map<string, PriorityOption>
  /** Values that are valid but probably not what was meant, to log once at registration. */
  warnings: string[]
}

export const DEFAULT_MAX_CONCURRENCY = 100
/** The ceiling of an adaptive limit unless maxConcurrency is set. */
export const DEFAULT_ADAPTIVE_MAX_CONCURRENCY = 1000
export const DEFAULT_ADAPTIVE: AdaptiveSettings = Object.freeze({
  minConcurrency: 1,
  initialConcurrency: 20,
  tolerance: 0.25,
  baselineInterval: 10_000
})
export const DEFAULT_QUEUE_TIMEOUT = 1000
export const DEFAULT_MAX_HELD_REJECTIONS = 10_000
// Holds of 1, 2, then 4 s for a connection that keeps retrying while the
// brake is engaged: against a storm of 5,000 connections, half the
// refusals and 84-97% of capacity in eight lab repeats, against 80-92%
// when every hold was 1 s.
export const DEFAULT_REJECT_DELAY = 4000
export const DEFAULT_METRICS_PREFIX = 'fastify_concurrency_limit_'
// setTimeout clamps anything longer to 1 ms, which would turn a long timeout into none.
const MAX_TIMEOUT = 2 ** 31 - 1
/**
 * Largest Retry-After sent. Its delay-seconds (RFC 9110 §10.2.3) are a
 * delta-seconds, which recipients may not read past 2^31 (RFC 9111 §1.2.2);
 * a larger number would also be written in exponent form (1e+21), which is
 * no delta-seconds at all.
 */
export const MAX_RETRY_AFTER = 2 ** 31 - 1
// Below this, a duration in milliseconds was most likely meant in seconds.
const PLAUSIBLE_MS = 100
// Below this, an event-loop delay bound trips on the loop's ordinary pauses.
const MIN_LOOP_DELAY = 10

const HOOKS: readonly HookName[] = ['onRequest', 'preParsing', 'preValidation', 'preHandler']
const POOL_KEYS = ['maxConcurrency', 'maxQueue', 'queueTimeout', 'maxEventLoopDelay', 'adaptive', 'store'] as const
const ADAPTIVE_KEYS = new Set<string>(['minConcurrency', 'initialConcurrency', 'tolerance', 'baselineInterval'])
const PLUGIN_KEYS = new Set<string>([...POOL_KEYS, 'priority', 'global', 'hook', 'exempt', 'statusCode', 'retryAfter', 'errorResponseBuilder', 'groups', 'rejectDelay', 'maxHeldRejections', 'closeOnReject', 'maxConnections', 'metrics', 'serverTiming', 'logRefusals'])
const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace']
const METRICS_KEYS = new Set<string>(['registry', 'prefix'])
// Prometheus's metric names (a prefix is the start of one).
const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/
const ROUTE_KEYS = new Set<string>([...POOL_KEYS, 'priority', 'group', 'hook'])
const GROUP_KEYS = new Set<string>([...POOL_KEYS, 'priority'])
const PRIORITIES: readonly string[] = ['critical', 'normal', 'sheddable']

function fail (where: string, key: string, expected: string, value: unknown): never {
  throw new InvalidOptionError(`${where}${key} must be ${expected}, received ${showValue(value)}`)
}

function isPlainObject (value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return false
  const proto = Object.getPrototypeOf(value)
  return proto === Object.prototype || proto === null
}

function checkKeys (where: string, value: Record<string, unknown>, allowed: Set<string>): void {
  for (const key of Object.keys(value)) {
    if (!allowed.has(key)) {
      throw new InvalidOptionError(`${where}${key} is not an option (expected one of ${[...allowed].join(', ')})`)
    }
  }
}

/**
 * A duration in whole milliseconds. A fraction, or a value too short to do
 * its job, is almost always seconds written where milliseconds are meant:
 * the first is refused, the second noted in `warnings`.
 */
function checkMilliseconds (where: string, key: string, value: unknown, tooShort: string, warnings: string[]): void {
  if (!(Number.isInteger(value) && (value as number) >= 0 && (value as number) <= MAX_TIMEOUT)) {
    fail(where, key, `an integer number of milliseconds from 0 to ${MAX_TIMEOUT}`, value)
  }
  const ms = value as number
  if (ms > 0 && ms < PLAUSIBLE_MS) {
    warnings.push(`${where}${key} is in milliseconds: ${ms} ms ${tooShort}; for ${ms} second${ms === 1 ? '' : 's'} write ${ms * 1000}`)
  }
}

function checkAdaptive (where: string, adaptive: unknown): false | AdaptiveOptions {
  if (typeof adaptive === 'boolean') return adaptive ? {} : false
  if (!isPlainObject(adaptive)) fail(where, 'adaptive', 'true, false or an object of adaptive settings', adaptive)
  const at = `${where}adaptive.`
  checkKeys(at, adaptive, ADAPTIVE_KEYS)
  const { minConcurrency, initialConcurrency, tolerance, baselineInterval } = adaptive
  const options: AdaptiveOptions = {}
  if (minConcurrency !== undefined) {
    if (!(Number.isSafeInteger(minConcurrency) && (minConcurrency as number) >= 1)) fail(at, 'minConcurrency', 'an integer >= 1', minConcurrency)
    options.minConcurrency = minConcurrency as number
  }
  if (initialConcurrency !== undefined) {
    if (!(Number.isSafeInteger(initialConcurrency) && (initialConcurrency as number) >= 1)) fail(at, 'initialConcurrency', 'an integer >= 1', initialConcurrency)
    options.initialConcurrency = initialConcurrency as number
  }
  if (tolerance !== undefined) {
    if (!(typeof tolerance === 'number' && tolerance > 0 && tolerance <= 10)) fail(at, 'tolerance', 'a number > 0 and <= 10 (0.25 = 25% slower than the baseline)', tolerance)
    options.tolerance = tolerance
  }
  if (baselineInterval !== undefined) {
    if (!(Number.isInteger(baselineInterval) && (baselineInterval as number) >= 1 && (baselineInterval as number) <= MAX_TIMEOUT)) {
      fail(at, 'baselineInterval', `an integer number of milliseconds from 1 to ${MAX_TIMEOUT}`, baselineInterval)
    }
    options.baselineInterval = baselineInterval as number
  }
  if (options.minConcurrency !== undefined && options.initialConcurrency !== undefined && options.initialConcurrency < options.minConcurrency) {
    fail(at, 'initialConcurrency', `>= minConcurrency (${options.minConcurrency})`, options.initialConcurrency)
  }
  return options
}

function checkPool (where: string, value: Record<string, unknown>, warnings: string[]): PoolOptions {
  const { maxConcurrency, maxQueue, queueTimeout, maxEventLoopDelay, adaptive } = value
  if (maxConcurrency !== undefined && !(Number.isSafeInteger(maxConcurrency) && (maxConcurrency as number) >= 1)) {
    fail(where, 'maxConcurrency', 'an integer >= 1', maxConcurrency)
  }
  if (maxQueue !== undefined && !(Number.isSafeInteger(maxQueue) && (maxQueue as number) >= 0)) {
    fail(where, 'maxQueue', 'an integer >= 0', maxQueue)
  }
  if (queueTimeout !== undefined) {
    checkMilliseconds(where, 'queueTimeout', queueTimeout, 'is shorter than most queue waits', warnings)
  }
  if (maxEventLoopDelay !== undefined) {
    if (!(Number.isInteger(maxEventLoopDelay) && (maxEventLoopDelay as number) >= 0 && (maxEventLoopDelay as number) <= MAX_TIMEOUT)) {
      fail(where, 'maxEventLoopDelay', `an integer number of milliseconds from 0 (off) to ${MAX_TIMEOUT}`, maxEventLoopDelay)
    }
    const ms = maxEventLoopDelay as number
    if (ms > 0 && ms < MIN_LOOP_DELAY) {
      warnings.push(`${where}maxEventLoopDelay is ${ms} ms: a single garbage collection or one slow request takes longer, ` +
        `so requests will be refused at loads the server carries; ${MIN_LOOP_DELAY} ms or more is usual`)
    }
  }
  const pool: PoolOptions = {}
  if (maxConcurrency !== undefined) pool.maxConcurrency = maxConcurrency as number
  if (maxEventLoopDelay !== undefined) pool.maxEventLoopDelay = maxEventLoopDelay as number
  if (maxQueue !== undefined) pool.maxQueue = maxQueue as number
  if (queueTimeout !== undefined) pool.queueTimeout = queueTimeout as number
  if (adaptive !== undefined) {
    pool.adaptive = checkAdaptive(where, adaptive)
    const { minConcurrency: min, initialConcurrency: initial } = pool.adaptive === false ? {} : pool.adaptive
    if (min !== undefined && pool.maxConcurrency !== undefined && min > pool.maxConcurrency) {
      fail(where, 'adaptive.minConcurrency', `<= maxConcurrency (${pool.maxConcurrency}), the ceiling of the limit`, min)
    }
    if (initial !== undefined && pool.maxConcurrency !== undefined && initial > pool.maxConcurrency) {
      fail(where, 'adaptive.initialConcurrency', `<= maxConcurrency (${pool.maxConcurrency}), the ceiling of the limit`, initial)
    }
  }
  if (value.store !== undefined) pool.store = checkStore(where, value.store, warnings)
  return pool
}

function checkPriority (where: string, priority: unknown): PriorityOption | undefined {
  if (priority === undefined || typeof priority === 'function') return priority as PriorityOption | undefined
  if (typeof priority === 'string' && PRIORITIES.includes(priority)) return priority as Priority
  fail(where, 'priority', "'critical', 'normal', 'sheddable' or a function of the request that returns one", priority)
}

/** What a `priority` function returned, checked: a wrong value is the application's bug, told as such. */
export function checkPriorityResult (value: unknown): Priority {
  if (typeof value === 'string' && PRIORITIES.includes(value)) return value as Priority
  if (value !== null && typeof value === 'object' && typeof (value as PromiseLike<unknown>).then === 'function') {
    // An async function, from JavaScript. Its rejection would go unhandled,
    // and end the process, if no one listened.
    Promise.resolve(value).catch(() => {})
    throw new InvalidOptionError('priority() must return \'critical\', \'normal\' or \'sheddable\' synchronously, returned a promise (an async function cannot set a priority)')
  }
  throw new InvalidOptionError(`priority() must return 'critical', 'normal' or 'sheddable', returned ${showValue(value)}`)
}

function checkExempt (exempt: unknown): ((route: RouteOptions) => boolean) | null {
  if (exempt === undefined) return null
  if (typeof exempt === 'function') return exempt as (route: RouteOptions) => boolean
  const expected = 'an array of URLs (strings or RegExps) or a function of the route'
  if (!Array.isArray(exempt)) fail('', 'exempt', expected, exempt)
  const urls = new Set<string>()
  const patterns: RegExp[] = []
  for (const url of exempt) {
    if (typeof url === 'string' && url.length > 0) urls.add(url)
    else if (url instanceof RegExp) patterns.push(url)
    else fail('', 'exempt', expected, exempt)
  }
  // A global or sticky RegExp keeps its lastIndex between tests: copy it without those flags.
  const tests = patterns.map((re) => new RegExp(re.source, re.flags.replace(/[gy]/g, '')))
  return (route) => urls.has(route.url) || tests.some((re) => re.test(route.url))
}

function checkMetrics (metrics: unknown): ResolvedOptions['metrics'] {
  if (metrics === undefined) return null
  if (!isPlainObject(metrics)) fail('', 'metrics', 'an object ({ registry, prefix? })', metrics)
  checkKeys('metrics.', metrics, METRICS_KEYS)
  const { registry, prefix } = metrics
  const methods = ['registerMetric', 'getSingleMetric', 'removeSingleMetric', 'metrics'] as const
  if (registry === null || typeof registry !== 'object' ||
    methods.some((method) => typeof (registry as Record<string, unknown>)[method] !== 'function')) {
    throw new InvalidOptionError('metrics.registry must be a prom-client Registry (new Registry(), or prom-client\'s register), ' +
      `received ${registry === null || typeof registry !== 'object' ? showValue(registry) : 'an object without its methods'}`)
  }
  if (prefix !== undefined && !(typeof prefix === 'string' && METRIC_NAME.test(prefix))) {
    fail('', 'metrics.prefix', 'the start of a Prometheus metric name (letters, digits, _ and :, not a digit first)', prefix)
  }
  return { registry: registry as MetricsRegistry, prefix: (prefix as string | undefined) ?? DEFAULT_METRICS_PREFIX }
}

function checkHook (where: string, hook: unknown): HookName | undefined {
  if (hook === undefined) return undefined
  if (!HOOKS.includes(hook as HookName)) fail(where, 'hook', `one of ${HOOKS.join(', ')}`, hook)
  return hook as HookName
}

/** Validates the plugin's options and fills in defaults. Throws on the first invalid value. */
export function resolveOptions (options: unknown): ResolvedOptions {
  const opts = options
  if (!isPlainObject(opts)) fail('', 'the options', 'an object', opts)
  checkKeys('', opts, PLUGIN_KEYS)

  const { global, exempt, statusCode, retryAfter, errorResponseBuilder, groups, rejectDelay, maxHeldRejections, closeOnReject, maxConnections, serverTiming, logRefusals } = opts
  const warnings: string[] = []
  const pool = checkPool('', opts, warnings)
  if (global !== undefined && typeof global !== 'boolean') fail('', 'global', 'a boolean', global)
  const isExempt = checkExempt(exempt)
  if (statusCode !== undefined &&
    !(Number.isInteger(statusCode) && (statusCode as number) >= 400 && (statusCode as number) <= 599 &&
      STATUS_CODES[statusCode as number] !== undefined)) {
    fail('', 'statusCode', 'a known 4xx or 5xx status code (503 or 429 are usual)', statusCode)
  }
  if (retryAfter !== undefined && typeof retryAfter !== 'function' &&
    !(typeof retryAfter === 'number' && retryAfter >= 0 && retryAfter <= MAX_RETRY_AFTER)) {
    fail('', 'retryAfter', `a number of seconds from 0 to ${MAX_RETRY_AFTER} or a function`, retryAfter)
  }
  if (errorResponseBuilder !== undefined && typeof errorResponseBuilder !== 'function') {
    fail('', 'errorResponseBuilder', 'a function', errorResponseBuilder)
  }
  if (rejectDelay !== undefined) {
    checkMilliseconds('', 'rejectDelay', rejectDelay, 'is too short to slow a retry storm', warnings)
  }
  if (maxHeldRejections !== undefined && !(Number.isSafeInteger(maxHeldRejections) && (maxHeldRejections as number) >= 0)) {
    fail('', 'maxHeldRejections', 'an integer >= 0', maxHeldRejections)
  }
  if (closeOnReject !== undefined && typeof closeOnReject !== 'boolean') fail('', 'closeOnReject', 'a boolean', closeOnReject)
  if (maxConnections !== undefined && !(Number.isSafeInteger(maxConnections) && (maxConnections as number) >= 1)) {
    fail('', 'maxConnections', 'an integer >= 1', maxConnections)
  }

  if (serverTiming !== undefined && typeof serverTiming !== 'boolean') fail('', 'serverTiming', 'a boolean', serverTiming)
  if (logRefusals !== undefined && logRefusals !== false && !LOG_LEVELS.includes(logRefusals as LogLevel)) {
    fail('', 'logRefusals', `false or a log level (${LOG_LEVELS.join(', ')})`, logRefusals)
  }

  const priority = checkPriority('', opts.priority)
  const groupPriorities = new Map<string, PriorityOption>()
  const resolvedGroups = new Map<string, PoolOptions>()
  if (groups !== undefined) {
    if (!isPlainObject(groups)) fail('', 'groups', 'an object of pool settings by name', groups)
    for (const [name, group] of Object.entries(groups)) {
      const where = `groups.${name}.`
      if (!isPlainObject(group)) fail('', `groups.${name}`, 'an object', group)
      checkKeys(where, group, GROUP_KEYS)
      resolvedGroups.set(name, checkPool(where, group, warnings))
      const own = checkPriority(where, group.priority)
      if (own !== undefined) groupPriorities.set(name, own)
    }
  }

  return {
    global: global ?? true,
    hook: checkHook('', opts.hook) ?? 'preParsing',
    exempt: isExempt,
    statusCode: (statusCode as number | undefined) ?? 503,
    retryAfter: retryAfter as ResolvedOptions['retryAfter'],
    errorResponseBuilder: errorResponseBuilder as ResolvedOptions['errorResponseBuilder'],
    rejectDelay: (rejectDelay as number | undefined) ?? DEFAULT_REJECT_DELAY,
    maxHeldRejections: (maxHeldRejections as number | undefined) ?? DEFAULT_MAX_HELD_REJECTIONS,
    closeOnReject: (closeOnReject as boolean | undefined) ?? false,
    maxConnections: maxConnections as number | undefined,
    metrics: checkMetrics(opts.metrics),
    serverTiming: (serverTiming as boolean | undefined) ?? false,
    logRefusals: logRefusals === undefined || logRefusals === false ? null : logRefusals as LogLevel,
    pool,
    groups: resolvedGroups,
    priority,
    groupPriorities,
    warnings
  }
}

/** A route's `config.concurrencyLimit`, checked. `null` = the route is not limited. */
export interface ResolvedRouteConfig {
  /** Pool settings given on the route: a pool of its own unless `group` is set. */
  pool: PoolOptions | null
  group: string | undefined
  hook: HookName | undefined
  priority: PriorityOption | undefined
  /** Values that are valid but probably not what was meant, to log once. */
  warnings: readonly string[]
}

const NO_WARNINGS: readonly string[] = Object.freeze([])
// Fastify hands a GET route's HEAD twin (and the twins of a prefixed '/') the
// same config object: one warning serves them all.
const warnedConfigs = new WeakSet<object>()

export function resolveRouteConfig (route: string, config: unknown, global: boolean): ResolvedRouteConfig | null {
  const where = `route ${route}: config.concurrencyLimit.`
  if (config === undefined) return global ? { pool: null, group: undefined, hook: undefined, priority: undefined, warnings: NO_WARNINGS } : null
  if (config === false) return null
  if (config === true) return { pool: null, group: undefined, hook: undefined, priority: undefined, warnings: NO_WARNINGS }
  if (!isPlainObject(config)) {
    throw new InvalidOptionError(`route ${route}: config.concurrencyLimit must be an object, true or false, received ${showValue(config)}`)
  }
  checkKeys(where, config, ROUTE_KEYS)
  const { group } = config
  if (group !== undefined && !(typeof group === 'string' && group.length > 0)) {
    fail(where, 'group', 'a non-empty string', group)
  }
  const warnings: string[] = []
  const pool = checkPool(where, config, warnings)
  const hook = checkHook(where, config.hook)
  const seen = warnedConfigs.has(config)
  if (warnings.length > 0) warnedConfigs.add(config)
  return {
    pool: Object.keys(pool).length > 0 ? pool : null,
    group: group as string | undefined,
    hook,
    priority: checkPriority(where, config.priority),
    warnings: seen ? NO_WARNINGS : warnings
  }
}

/**
 * Fills a pool's unset settings: the pool's own value, else the plugin's,
 * else the default. maxQueue defaults to the pool's maxConcurrency: by
 * Little's law a full queue then adds about one service time of waiting.
 */
export function poolSettings (own: PoolOptions, plugin: PoolOptions, label = ''): LimiterSettings {
  // A pool's own adaptive settings go over the plugin's, key by key: a route
  // with `adaptive: true` takes the plugin's knobs, one with `{ tolerance }`
  // changes that one knob.
  const on = (own.adaptive ?? plugin.adaptive ?? false) !== false
  const adaptive = on ? { ...DEFAULT_ADAPTIVE, ...knobs(plugin.adaptive), ...knobs(own.adaptive) } : null
  // Checked by checkPool: the settings, filled in.
  const store = (own.store ?? plugin.store ?? null) as StoreSettings | null
  if (store !== null && adaptive !== null) {
    throw new InvalidOptionError(`${label}store shares a fixed maxConcurrency between instances: it does not work with adaptive; set adaptive: false on the pool`)
  }
  const maxConcurrency = own.maxConcurrency ?? plugin.maxConcurrency ??
    (adaptive === null ? DEFAULT_MAX_CONCURRENCY : DEFAULT_ADAPTIVE_MAX_CONCURRENCY)
  if (adaptive !== null) {
    // An adaptive limit starts and stays within [minConcurrency, maxConcurrency].
    if (adaptive.minConcurrency > maxConcurrency) {
      throw new InvalidOptionError(`${label}adaptive.minConcurrency must be <= maxConcurrency (${maxConcurrency}), the ceiling of the limit, received ${adaptive.minConcurrency}`)
    }
    // A start the pool sets itself must fit under its ceiling. One it
    // inherits (the plugin's, for every pool) yields to a pool whose own
    // maxConcurrency is lower: the pool's word is the more specific one.
    const ownStart = (own.adaptive as AdaptiveOptions | undefined)?.initialConcurrency
    if (ownStart !== undefined && ownStart > maxConcurrency) {
      throw new InvalidOptionError(`${label}adaptive.initialConcurrency must be <= maxConcurrency (${maxConcurrency}), received ${ownStart}`)
    }
    // The start within the pool's bounds.
    adaptive.initialConcurrency = Math.min(maxConcurrency, Math.max(adaptive.minConcurrency, adaptive.initialConcurrency))
  }
  return {
    maxConcurrency,
    maxQueue: own.maxQueue ?? plugin.maxQueue ?? (adaptive === null ? maxConcurrency : null),
    queueTimeout: own.queueTimeout ?? plugin.queueTimeout ?? DEFAULT_QUEUE_TIMEOUT,
    maxEventLoopDelay: own.maxEventLoopDelay ?? plugin.maxEventLoopDelay ?? 0,
    adaptive,
    ...(store === null ? {} : { store })
  }
}

/** The settings an `adaptive` option carries (`true`: none of its own). */
function knobs (adaptive: boolean | AdaptiveOptions | undefined): AdaptiveOptions {
  return typeof adaptive === 'object' ? adaptive : {}
}

export function samePool (a: LimiterSettings, b: LimiterSettings): boolean {
  return a.maxConcurrency === b.maxConcurrency && a.maxQueue === b.maxQueue && a.queueTimeout === b.queueTimeout &&
    a.maxEventLoopDelay === b.maxEventLoopDelay && sameAdaptive(a.adaptive ?? null, b.adaptive ?? null) && sameStore(a.store ?? null, b.store ?? null)
}

function sameAdaptive (a: AdaptiveSettings | null, b: AdaptiveSettings | null): boolean {
  if (a === null || b === null) return a === b
  return a.minConcurrency === b.minConcurrency && a.initialConcurrency === b.initialConcurrency &&
    a.tolerance === b.tolerance && a.baselineInterval === b.baselineInterval
}
