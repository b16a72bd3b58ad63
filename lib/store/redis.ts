import { createHash, randomBytes } from 'node:crypto'
import type { Limiter, PermitSource } from '../limiter.js'
import type { RedisClient, RedisSubscriber, StoreSettings } from './options.js'

/** The shared store's state for one pool, in its stats. */
export interface StoreStats {
  /** Redis key of the pool's leases. */
  key: string
  /** Leases this instance holds now (one per admitted request, unless Redis failed). */
  leases: number
  /** Permits out across every instance at the last answer from Redis. */
  fleetInFlight: number
  /** False from a failed Redis call until Redis answers again. */
  available: boolean
  /** Redis calls that failed or took longer than `timeout`. */
  errors: number
  /** Requests refused because Redis was unavailable (onStoreError 'refuse'). */
  refused: number
  /** Requests admitted without a lease while Redis was unavailable ('allow' or 'local'). */
  unleased: number
}

interface Script {
  lua: string
  sha: string
}

function script (lua: string): Script {
  return { lua, sha: createHash('sha1').update(lua).digest('hex') }
}

// The clock of every lease is Redis's own (TIME), never an instance's: the
// instances' clocks may disagree, the store's is one. Leases are the members
// of one sorted set per pool, scored by their expiry in milliseconds.
const NOW = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`

/**
 * KEYS[1] leases; ARGV[1] the limit, ARGV[2] leaseMs, ARGV[3] how many of
 * the ids are for requests already running, ARGV[4..] new lease ids.
 * Purges expired leases; adds the ids of running requests whatever the count
 * (requests admitted while Redis was unavailable: they hold a permit, the
 * other instances must see it); then as many of the other ids as the limit
 * has room for, in order. Returns { other ids added, leases out now }.
 */
const ACQUIRE = script(NOW + `redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[2])
local running = tonumber(ARGV[3])
for i = 4, 3 + running do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
local count = redis.call('ZCARD', KEYS[1])
local free = tonumber(ARGV[1]) - count
local added = 0
for i = 4 + running, #ARGV do
  if added >= free then break end
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  added = added + 1
end
if count + added > 0 then redis.call('PEXPIRE', KEYS[1], lease * 2) end
return { added, count + added }
`)

/**
 * KEYS[1] leases; ARGV[1] the channel, ARGV[2..] lease ids. Removes them and
 * tells every instance that permits are free. Returns how many were held,
 * and the permits out across the fleet now.
 */
const RELEASE = script(`local n = redis.call('ZREM', KEYS[1], unpack(ARGV, 2))
if n > 0 then redis.call('PUBLISH', ARGV[1], n) end
return { n, redis.call('ZCARD', KEYS[1]) }
`)

/**
 * KEYS[1] leases; ARGV[1] leaseMs, ARGV[2..] lease ids. Extends them, and
 * puts back any that Redis lost (a restart without persistence): their
 * requests still run, so they still count against the limit.
 */
const RENEW = script(NOW + `local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return #ARGV - 1
`)

class StoreTimeoutError extends Error {
  constructor (ms: number) {
    super(`Redis did not answer within ${ms} ms`)
  }
}

function isNoScript (err: unknown): boolean {
  return err instanceof Error && err.message.startsWith('NOSCRIPT')
}

/** Runs a script by its digest, loading it if Redis does not have it (after a restart). */
async function run (redis: RedisClient, s: Script, key: string, args: Array<string | number>): Promise<unknown> {
  try {
    return await redis.evalsha(s.sha, 1, key, ...args)
  } catch (err) {
    if (!isNoScript(err)) throw err
    return await redis.eval(s.lua, 1, key, ...args)
  }
}

/**
 * A call that fails after `ms`. ioredis queues commands while it reconnects
 * and retries them for long after: without a timer of our own, a request
 * could wait on a Redis that is down. `late` receives the answer of a call
 * that timed out but went through after all.
 */
function timed (call: Promise<unknown>, ms: number, late?: (value: unknown) => void): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      reject(new StoreTimeoutError(ms))
    }, ms)
    timer.unref()
    call.then((value) => {
      if (!timedOut) {
        clearTimeout(timer)
        resolve(value)
      } else {
        late?.(value)
      }
    }, (err: unknown) => {
      clearTimeout(timer)
      reject(err)
    })
  })
}

/**
 * A pool's permits as leases in Redis, shared by every instance whose pool
 * has the same key. One instance asks for permits for its waiters in one
 * call at a time: waiters that arrive meanwhile are asked for together in
 * the next. A permit freed anywhere is announced on the pool's channel and
 * wakes the instances with waiters; a poll every min(leaseMs / 4, 250) ms
 * covers a lost message and leases that expired.
 *
 * Leases are interchangeable: a request does not carry its own, the
 * instance keeps the ids it holds and gives one back per permit released
 * (after the response closed and the handler settled, as for a local pool).
 * One timer renews every lease the instance holds, in one call.
 */
export class RedisPermits implements PermitSource {
  readonly #limiter: Limiter
  readonly #redis: RedisClient
  readonly #settings: StoreSettings
  readonly #key: string
  readonly #channel: string
  readonly #idPrefix = randomBytes(9).toString('base64url') + ':'
  #nextId = 0
  readonly #pollMs: number
  /** While Redis fails: the most permits this instance admits without one. */
  readonly #fallbackLimit: number
  #subscriber: RedisSubscriber | null = null

  /** Lease ids held for admitted requests. */
  readonly #held: string[] = []
  /** An acquiring call is out; `asking`: for how many waiters. */
  #calling = false
  #asking = 0
  #askAgain = false
  #wakeScheduled = false
  /** The last answer found no free permit: wait for one to be announced. */
  #full = false
  #available = true
  #settleUntil = 0
  #pollTimer: NodeJS.Timeout | null = null
  #renewTimer: NodeJS.Timeout | null = null

  #fleetInFlight = 0
  #errors = 0
  #refused = 0
  #unleased = 0

  constructor (limiter: Limiter, settings: StoreSettings) {
    this.#limiter = limiter
    this.#settings = settings
    this.#redis = settings.redis
    this.#key = settings.nameSpace + limiter.name
    this.#channel = this.#key + ':freed'
    this.#pollMs = Math.max(1, Math.min(250, Math.floor(settings.leaseMs / 4)))
    this.#fallbackLimit = settings.onStoreError === 'allow'
      ? limiter.maxConcurrency
      : Math.max(1, Math.floor(limiter.maxConcurrency / settings.instances))
    this.#subscribe()
  }

  #subscribe (): void {
    const subscriber = this.#subscriber = this.#redis.duplicate()
    subscriber.on('message', this.#onMessage)
    // The subscriber reconnects and subscribes again by itself; until then
    // the poll wakes the waiters. Its errors are the client's to log.
    subscriber.on('error', noop)
    subscriber.subscribe(this.#channel).then(undefined, noop)
  }

  // The subscriber is this pool's own: every message is a permit freed.
  #onMessage = (): void => {
    this.#full = false
    this.#pump()
  }

  // Called from inside `enqueue`: the waiter is admitted or refused after
  // its caller has seen it queued, never during the call.
  wake (): void {
    if (this.#wakeScheduled) return
    this.#wakeScheduled = true
    process.nextTick(this.#wakePump)
  }

  #wakePump = (): void => {
    this.#wakeScheduled = false
    this.#pump()
  }

  headroom (): number {
    if (this.#full || !this.#available) return this.#asking
    return this.#limiter.limit - this.#limiter.inFlight
  }

  released (): void {
    // A permit admitted without a lease (Redis was down) goes first: the
    // leases then still count every request that holds one. A lease given
    // back is announced to every instance at once, this one included: its
    // own waiters ask then, with no head start on the others'.
    if (this.#trim() && this.#available) return
    // A local slot freed without a permit, or Redis is down: a waiter may fit now.
    if (this.#limiter.queued > 0) this.#pump()
  }

  /**
   * Gives back the leases no running request needs, the oldest first (ids
   * turn over). True if it gave any back.
   */
  #trim (): boolean {
    const surplus = this.#held.length - this.#limiter.inFlight
    if (surplus <= 0) return false
    const ids = this.#held.splice(0, surplus)
    this.#call(RELEASE, [this.#channel, ...ids]).then(this.#releasedAll, this.#failed)
    return true
  }

  #releasedAll = (reply: unknown): void => {
    this.#fleetInFlight = (reply as [number, number])[1]
  }

  close (): void {
    this.#subscriber?.disconnect()
    this.#subscriber = null
  }

  stats (): StoreStats {
    return {
      key: this.#key,
      leases: this.#held.length,
      fleetInFlight: this.#fleetInFlight,
      available: this.#available,
      errors: this.#errors,
      refused: this.#refused,
      unleased: this.#unleased
    }
  }

  #call (s: Script, args: Array<string | number>, late?: (value: unknown) => void): Promise<unknown> {
    return timed(run(this.#redis, s, this.#key, args), this.#settings.timeout, late)
  }

  /** Asks Redis for permits for the waiters not asked for yet. */
  #pump (): void {
    if (this.#calling) {
      this.#askAgain = true
      return
    }
    const limiter = this.#limiter
    if (!this.#available) {
      this.#fallback()
      return
    }
    // Requests admitted without a lease while Redis was unavailable.
    const running = limiter.inFlight - this.#held.length
    // Just back: the other instances put their running requests back first.
    const settling = this.#settleUntil > performance.now()
    const wanted = settling ? 0 : Math.min(limiter.queued, limiter.limit - limiter.inFlight)
    if (wanted <= 0 && running <= 0) {
      if (settling && limiter.queued > 0) {
        this.#fallback()
        this.#poll()
      }
      return
    }
    const ids: string[] = []
    for (let i = 0; i < running + wanted; i++) ids.push(this.#idPrefix + (this.#nextId++).toString(36))
    this.#calling = true
    this.#asking = wanted
    this.#askAgain = false
    this.#call(ACQUIRE, [limiter.maxConcurrency, this.#settings.leaseMs, running, ...ids], (late) => {
      // The call timed out but went through: give back what it took.
      const added = running + (late as [number, number])[0]
      if (added > 0) this.#call(RELEASE, [this.#channel, ...ids.slice(0, added)]).then(noop, noop)
    }).then((reply) => {
      const [added, inFlight] = reply as [number, number]
      this.#calling = false
      this.#asking = 0
      this.#fleetInFlight = inFlight
      this.#full = added < wanted
      for (let i = 0; i < running + added; i++) this.#held.push(ids[i])
      // Waiters may have left (timed out, client gone) while Redis answered.
      let granted = 0
      while (granted < added && limiter.grant()) granted++
      // Leases nobody needs now: those of waiters that left, and of running
      // requests that ended while Redis answered.
      this.#trim()
      if (this.#held.length > 0 && this.#renewTimer === null) this.#startRenewing()
      if (limiter.queued > 0) {
        if (this.#askAgain || !this.#full) {
          this.#pump()
        } else {
          // No permit for them anywhere: the queue's bound applies.
          limiter.trimQueue()
          this.#poll()
        }
      }
    }, (err: unknown) => {
      this.#calling = false
      this.#asking = 0
      this.#failed(err)
      this.#fallback()
    })
  }

  /** Redis is unavailable: admit or refuse the waiters as `onStoreError` says. */
  #fallback (): void {
    const limiter = this.#limiter
    if (this.#settings.onStoreError === 'refuse') {
      this.#refused += limiter.queued
      limiter.refuseWaiters()
      return
    }
    while (limiter.inFlight < this.#fallbackLimit && limiter.grant()) this.#unleased++
    limiter.trimQueue()
  }

  #failed = (_err: unknown): void => {
    this.#errors++
    if (!this.#available) return
    this.#available = false
    this.#probe()
    // Waiters get what onStoreError says now, not at their timeout.
    if (this.#limiter.queued > 0) this.#pump()
  }

  /** While Redis is unavailable, asks it every poll interval whether it is back. */
  #probe (): void {
    const timer = setTimeout(() => {
      this.#call(ACQUIRE, [this.#limiter.maxConcurrency, this.#settings.leaseMs, 0]).then((reply) => {
        this.#fleetInFlight = (reply as [number, number])[1]
        this.#available = true
        // Each instance finds Redis back at its own probe, within a poll
        // interval of the others: until they all have put back the leases of
        // the requests they admitted without one, new permits would be
        // counted against a fleet that looks emptier than it is.
        if (this.#settings.onStoreError !== 'refuse') this.#settleUntil = performance.now() + this.#pollMs
        this.#full = false
        this.#pump()
      }, () => {
        this.#errors++
        this.#probe()
      })
    }, this.#pollMs)
    timer.unref()
  }

  /** Asks again after a poll interval: a permit may have expired, or its message been lost. */
  #poll (): void {
    if (this.#pollTimer !== null) return
    this.#pollTimer = setTimeout(() => {
      this.#pollTimer = null
      this.#full = false
      this.#pump()
    }, this.#pollMs)
    this.#pollTimer.unref()
  }

  #startRenewing (): void {
    const every = Math.max(1, Math.floor(this.#settings.leaseMs / 3))
    this.#renewTimer = setInterval(() => {
      if (this.#held.length === 0) {
        clearInterval(this.#renewTimer as NodeJS.Timeout)
        this.#renewTimer = null
        return
      }
      this.#call(RENEW, [this.#settings.leaseMs, ...this.#held]).then(noop, this.#failed)
    }, every)
    this.#renewTimer.unref()
  }
}

function noop (): void {}
