import { InvalidOptionError } from '../errors.js'
import { showValue } from '../show-value.js'

/**
 * The few methods of an ioredis client that a shared pool calls. The plugin
 * never imports ioredis: the application passes its own client (`new Redis()`
 * of ioredis 5 or later), and any object with these methods will do.
 */
export interface RedisClient {
  evalsha (sha1: string, numkeys: number, ...args: Array<string | number>): Promise<unknown>
  eval (script: string, numkeys: number, ...args: Array<string | number>): Promise<unknown>
  /** A second connection for the pub/sub channel on which freed permits are announced. */
  duplicate (): RedisSubscriber
}

export interface RedisSubscriber {
  subscribe (...channels: string[]): Promise<unknown>
  on (event: string, listener: (...args: any[]) => void): unknown
  disconnect (): void
}

/** What a shared pool does when Redis fails or does not answer in time. */
export type OnStoreError = 'refuse' | 'allow' | 'local'

/** A pool whose limit is shared by every instance that names it in one Redis. */
export interface StoreOptions {
  /** An ioredis client (the application's; the plugin never closes it). */
  redis: RedisClient
  /**
   * Milliseconds a permit lives in Redis unless renewed. Held permits are
   * renewed every leaseMs / 3 while their requests run, so a permit of an
   * instance that died is free again within leaseMs. Integer >= 100. Default 10000.
   */
  leaseMs?: number
  /**
   * When Redis fails or is slow: `'refuse'` answers 503
   * (FST_CONCURRENCY_LIMIT_STORE_UNAVAILABLE); `'allow'` admits up to
   * maxConcurrency per instance (fail open); `'local'` admits up to
   * maxConcurrency / instances per instance. Default 'refuse'.
   */
  onStoreError?: OnStoreError
  /** With onStoreError 'local': how many instances share the pool. Integer >= 1. */
  instances?: number
  /** Prefix of the pool's Redis key and channel. Default 'fastify-concurrency-limit:'. */
  nameSpace?: string
  /**
   * Milliseconds each Redis call may take before it counts as failed.
   * Integer >= 1. Default 500. More than two thirds of leaseMs is warned of:
   * a renewal could outlast the leases it renews.
   */
  timeout?: number
}

/** Store options, checked and filled in. */
export interface StoreSettings {
  redis: RedisClient
  leaseMs: number
  onStoreError: OnStoreError
  instances: number
  nameSpace: string
  timeout: number
}

export const DEFAULT_LEASE_MS = 10_000
export const DEFAULT_NAMESPACE = 'fastify-concurrency-limit:'
export const DEFAULT_STORE_TIMEOUT = 500
const MAX_TIMEOUT = 2 ** 31 - 1
const KEYS = ['redis', 'leaseMs', 'onStoreError', 'instances', 'nameSpace', 'timeout']
const MODES: readonly OnStoreError[] = ['refuse', 'allow', 'local']

function invalid (where: string, key: string, expected: string, value: unknown): never {
  throw new InvalidOptionError(`${where}store.${key} must be ${expected}, received ${showValue(value)}`)
}

function isClient (value: unknown): value is RedisClient {
  if (value === null || typeof value !== 'object') return false
  const client = value as Record<string, unknown>
  return typeof client.evalsha === 'function' && typeof client.eval === 'function' && typeof client.duplicate === 'function'
}

/**
 * Checks a pool's `store` option; `where` names the pool as the other
 * messages do. What is valid but likely a mistake goes into `warnings`.
 */
export function checkStore (where: string, store: unknown, warnings: string[]): StoreSettings {
  if (store === null || typeof store !== 'object' || Array.isArray(store)) {
    throw new InvalidOptionError(`${where}store must be an object such as { redis }, received ${showValue(store)}`)
  }
  const given = store as Record<string, unknown>
  for (const key of Object.keys(given)) {
    if (!KEYS.includes(key)) throw new InvalidOptionError(`${where}store.${key} is not an option (expected one of ${KEYS.join(', ')})`)
  }
  const { redis, leaseMs, onStoreError, instances, nameSpace, timeout } = given
  if (!isClient(redis)) invalid(where, 'redis', 'an ioredis client (with evalsha, eval and duplicate)', redis === undefined ? redis : typeof redis)
  if (leaseMs !== undefined && !(Number.isInteger(leaseMs) && (leaseMs as number) >= 100 && (leaseMs as number) <= MAX_TIMEOUT)) {
    invalid(where, 'leaseMs', `an integer number of milliseconds from 100 to ${MAX_TIMEOUT}`, leaseMs)
  }
  if (onStoreError !== undefined && !MODES.includes(onStoreError as OnStoreError)) {
    invalid(where, 'onStoreError', `one of ${MODES.join(', ')}`, onStoreError)
  }
  const mode = (onStoreError as OnStoreError | undefined) ?? 'refuse'
  if (instances !== undefined && !(Number.isSafeInteger(instances) && (instances as number) >= 1)) {
    invalid(where, 'instances', 'an integer >= 1', instances)
  }
  if (mode === 'local' && instances === undefined) {
    throw new InvalidOptionError(`${where}store.instances must be set with onStoreError 'local': ` +
      'each instance then admits maxConcurrency / instances while Redis is unavailable')
  }
  if (mode !== 'local' && instances !== undefined) {
    throw new InvalidOptionError(`${where}store.instances is only read with onStoreError 'local', received onStoreError '${mode}'`)
  }
  if (nameSpace !== undefined && typeof nameSpace !== 'string') invalid(where, 'nameSpace', 'a string', nameSpace)
  if (timeout !== undefined && !(Number.isInteger(timeout) && (timeout as number) >= 1 && (timeout as number) <= MAX_TIMEOUT)) {
    invalid(where, 'timeout', `an integer number of milliseconds from 1 to ${MAX_TIMEOUT}`, timeout)
  }
  const settings: StoreSettings = {
    redis,
    leaseMs: (leaseMs as number | undefined) ?? DEFAULT_LEASE_MS,
    onStoreError: mode,
    instances: (instances as number | undefined) ?? 1,
    nameSpace: (nameSpace as string | undefined) ?? DEFAULT_NAMESPACE,
    timeout: (timeout as number | undefined) ?? DEFAULT_STORE_TIMEOUT
  }
  // Leases are renewed every leaseMs / 3: a renewal that may take longer
  // than the rest of its leases' life can be waiting still when they expire,
  // unseen, and other instances then take permits whose requests still run.
  const longest = Math.floor(settings.leaseMs * 2 / 3)
  if (settings.timeout > longest) {
    warnings.push(`${where}store.timeout is ${settings.timeout} ms${timeout === undefined ? ' (the default)' : ''}, ` +
      `more than two thirds of leaseMs (${settings.leaseMs} ms): a slow renewal can outlast the leases it renews, ` +
      `and other instances then take permits whose requests still run; keep timeout at or under ${longest} ms`)
  }
  return settings
}

export function sameStore (a: StoreSettings | null, b: StoreSettings | null): boolean {
  if (a === null || b === null) return a === b
  return a.redis === b.redis && a.leaseMs === b.leaseMs && a.onStoreError === b.onStoreError &&
    a.instances === b.instances && a.nameSpace === b.nameSpace && a.timeout === b.timeout
}
