import { availableParallelism } from 'node:os'
import type { FastifyInstance, FastifyListenOptions } from 'fastify'
import { InvalidOptionError } from '../errors.js'
import { showValue } from '../show-value.js'

/** Where the cluster writes its log lines (one line a call). */
export interface ClusterLogger {
  info (message: string): void
  warn (message: string): void
  error (message: string): void
}

export interface ClusterOptions {
  /** Worker processes serving at once. Integer >= 1. Default: `os.availableParallelism()`. */
  workers?: number
  /** Recycle a worker once it has received this many requests. Integer >= 1. Default: never. */
  maxRequests?: number
  /**
   * Plus a random 0..maxRequestsJitter drawn for each worker, so that workers
   * started together do not recycle together. Integer >= 0. Default 0.
   */
  maxRequestsJitter?: number
  /** Recycle a worker once its resident set passes this many MiB. Number > 0. Default: never. */
  maxRssMb?: number
  /** How often, in ms, each worker reads its RSS and reports to the primary. Integer >= 10. Default 1000. */
  statsInterval?: number
  /**
   * Milliseconds a draining worker has to finish what it accepted; still
   * alive after this, it is killed and the cut is logged. Integer >= 1. Default 30000.
   */
  drainTimeout?: number
  /** Passed to each worker's `app.listen()`. Default `{ port: 3000 }`. */
  listen?: FastifyListenOptions
  /** Log lines of the primary (recycles, crashes, cuts). `false`: silent. Default: stderr. */
  logger?: ClusterLogger | false
}

/**
 * Runs in each worker: builds the app and returns it, not listening. Any
 * Fastify instance: HTTP or HTTPS, its own logger, a type provider.
 */
type AnyFastifyInstance = FastifyInstance<any, any, any, any, any>
export type AppFactory = () => AnyFastifyInstance | Promise<AnyFastifyInstance>

export interface ResolvedClusterOptions {
  workers: number
  maxRequests: number
  maxRequestsJitter: number
  maxRssBytes: number
  statsInterval: number
  drainTimeout: number
  listen: FastifyListenOptions
  logger: ClusterLogger
}

const KEYS = new Set(['workers', 'maxRequests', 'maxRequestsJitter', 'maxRssMb', 'statsInterval', 'drainTimeout', 'listen', 'logger'])
// setTimeout's ceiling: a longer delay fires at once.
const MAX_DELAY = 2_147_483_647

function fail (key: string, expected: string, value: unknown): never {
  throw new InvalidOptionError(`runCluster: ${key} must be ${expected}, received ${showValue(value)}`)
}

function integer (options: Record<string, unknown>, key: string, min: number, max: number): number | undefined {
  const value = options[key]
  if (value === undefined) return undefined
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    fail(key, `an integer from ${min} to ${max}`, value)
  }
  return value
}

const stderrLogger: ClusterLogger = {
  info: (message) => { process.stderr.write(`fastify-concurrency-limit/cluster: ${message}\n`) },
  warn: (message) => { process.stderr.write(`fastify-concurrency-limit/cluster: warning: ${message}\n`) },
  error: (message) => { process.stderr.write(`fastify-concurrency-limit/cluster: error: ${message}\n`) }
}

const silent: ClusterLogger = { info: () => {}, warn: () => {}, error: () => {} }

export function resolveClusterOptions (options: unknown, factory: unknown): ResolvedClusterOptions {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) fail('options', 'an object', options)
  const opts = options as Record<string, unknown>
  for (const key of Object.keys(opts)) {
    if (!KEYS.has(key)) throw new InvalidOptionError(`runCluster: ${key} is not an option (expected one of ${[...KEYS].join(', ')})`)
  }
  if (typeof factory !== 'function') fail('the second argument', 'a function that builds and returns the Fastify app', factory)

  const workers = integer(opts, 'workers', 1, 1024) ?? availableParallelism()
  const maxRequests = integer(opts, 'maxRequests', 1, Number.MAX_SAFE_INTEGER)
  const maxRequestsJitter = integer(opts, 'maxRequestsJitter', 0, Number.MAX_SAFE_INTEGER) ?? 0
  if (maxRequestsJitter > 0 && maxRequests === undefined) {
    throw new InvalidOptionError(`runCluster: maxRequestsJitter (${maxRequestsJitter}) needs maxRequests`)
  }
  const maxRssMb = opts.maxRssMb
  if (maxRssMb !== undefined && (typeof maxRssMb !== 'number' || !Number.isFinite(maxRssMb) || maxRssMb <= 0)) {
    fail('maxRssMb', 'a number of MiB > 0', maxRssMb)
  }
  const statsInterval = integer(opts, 'statsInterval', 10, MAX_DELAY) ?? 1000
  const drainTimeout = integer(opts, 'drainTimeout', 1, MAX_DELAY) ?? 30_000

  const listen = opts.listen === undefined ? { port: 3000 } : opts.listen
  if (listen === null || typeof listen !== 'object' || Array.isArray(listen)) fail('listen', 'an object of app.listen() options', listen)
  const port = (listen as Record<string, unknown>).port
  if (port !== undefined && (typeof port !== 'number' || !Number.isInteger(port) || port < 0 || port > 65535)) {
    fail('listen.port', 'an integer from 0 to 65535', port)
  }

  let logger = silent
  if (opts.logger === undefined) logger = stderrLogger
  else if (opts.logger !== false) {
    const candidate = opts.logger as Record<string, unknown> | null
    if (candidate === null || typeof candidate !== 'object' || !['info', 'warn', 'error'].every((level) => typeof candidate[level] === 'function')) {
      fail('logger', 'false or an object with info, warn and error functions', opts.logger)
    }
    logger = opts.logger as ClusterLogger
  }

  return {
    workers,
    maxRequests: maxRequests ?? Infinity,
    maxRequestsJitter,
    maxRssBytes: maxRssMb === undefined ? Infinity : (maxRssMb as number) * 1024 * 1024,
    statsInterval,
    drainTimeout,
    listen: listen as FastifyListenOptions,
    logger
  }
}
